"""``explain-eval``: grounding figures (pointing game, relevance mass, box to text) of a dataset
explained through a running service with the thin client. Needs the ``eval`` extra (tqdm).

- the dataset format and its loader are :mod:`explain_api.grounding`, shared with the server;
- :mod:`.scoring`: the three grounding scores of one explanation, and phrase spans to token rows;
- :mod:`.runner`: concurrent evaluation through :class:`explain_client.ExplainClient`;
- :mod:`.report`: overall and per-class aggregation, JSON and Markdown;
- :mod:`.convert`: COCO and Flickr30k Entities converters (``explain-eval-convert``);
- :mod:`.cli`: the ``explain-eval`` command.
"""
