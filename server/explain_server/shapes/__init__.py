"""The known-answer ``shapes`` model: generated scenes whose ground truth is known, and its training.

- :mod:`.scenes`: the scene generator (objects, boxes, captions with phrase spans, colour swaps).
- :mod:`.dataset`: writing scenes in the ``explain-eval`` dataset format; ``shapes-scenes`` CLI.
- :mod:`.traffic`: monitoring traffic samples with known faults (wrong colours, distractors); ``shapes-traffic`` CLI.
- :mod:`.training`: contrastive training behind ``make known-answer-model``.
- :mod:`.model`: where the shipped config and weights live, and their open_clip names.
- :mod:`.symmetry`: the tie that makes the image tower commute with mirrors and quarter turns.

What the model is for, its figures and how it was trained: the model card, docs/shapes-model.md.
"""
