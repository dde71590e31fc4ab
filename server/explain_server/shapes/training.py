"""Contrastive training of the ``shapes`` model on generated scenes (``make known-answer-model``).

Recipe (the shipped weights' figures are in docs/benchmarks.md, section bench_grounding):

- Batches of scenes, each beside its hard negative: the same layout with the colours of two
  objects swapped (a one-object scene gets its object recoloured), so the caption of one is
  false for the other and colour must be bound to shape and place. Each image also gets a
  text-only hard negative: its caption with one object's colour or shape changed.
- Curriculum: few objects first, up to four later (``Recipe.curriculum``).
- Symmetric InfoNCE over the batch; a caption is a positive for every image it describes
  exactly (two one-object scenes may share a caption), not only for its own. Captions end with
  a full stop, so that the end token, which has read the whole caption, is not part of a phrase.
- An auxiliary patch loss (weight ``Recipe.patch_kinds``, 10): a linear probe, trained
  alongside and not saved, reads each patch entering the image tower's last block and names the
  (colour, shape, size) of the object covering most of it, or background
  (:func:`patch_kind_labels`, from the generator's shapes). A ViT trained from scratch on a few
  tens of thousands of scenes otherwise learns slowly which patches make up which object.
- Its text counterpart (weight ``Recipe.token_pairs``, 1): a second probe reads each shape word
  entering the text tower's last block and names the (colour, shape) its phrase gives
  (:func:`token_pair_labels`), so that the text tower binds a colour to its shape before it
  pools.
- The image tower commutes with mirrors and quarter turns (``Recipe.dihedral``,
  :mod:`.symmetry`): each patch-embedding kernel is tied to its mirror and rotation images and
  each patch's position to those of the cells a symmetry maps its cell to. Captions name
  nothing a mirror or a quarter turn changes, so the tower loses nothing the task needs, and a
  phrase's heatmap moves exactly as the image does, which issue 7 asks of every phrase; an
  untied tower had about one peak in twenty stray from the mirrored or rotated cell.
- The logit scale starts at 50 (CLIP's 1/0.07 is about 14): twins differ by a few hundredths of
  cosine similarity early on, and a sharper softmax weights them more.
- AdamW, linear warm-up then cosine decay; weight decay on matrices only.
- Deterministic: weights from ``torch.manual_seed(seed)``, batch ``k`` from the seed and ``k``.

Pilots of 400 steps (retrieval on 500 held-out scenes; swap twin / top-1 among 100):
the previous recipe, a regulariser that kept the class and end tokens entering the last block
the same for every input, 52.6% / 58.6%; with the patch loss 58.9% / 61.8%; without the
regulariser and at twice the learning rate 64.6% / 63.2% (the regulariser at that rate: 46.9% /
52.8%); with the logit scale at 50, 64.6% / 65.0%. No gain from three times the rate (64.6% /
62.4%), fixed 2-D sine-cosine patch positions (60.1% / 63.8%), a multi-label (colour, shape)
classifier on both towers' embeddings (54.6% / 61.6%), or colour-swapped captions in place of
the changed ones (63.8% / 63.4%). What holds the figures back is binding: those models beat a
caption with one colour changed in 99% of scenes but its colour-swapped twin in about 62%, and
embed a scene and its twin at cosine similarity 0.98. The text probe, aimed at that, gave
70.3% / 68.0%.

Full runs (retrieval on bench_grounding's 1,000 held-out scenes, swap twin / top-1; pointing
through the service at the default settings on the first 100 held-out captions, 302 phrases,
and, for the shipped weights, on all 500, 1,529 phrases). The last two choices were made on a
validation set the evaluation never sees, 150 scenes (466 phrases) from ``shapes-scenes --seed
11`` (the held-out set is seed 7, training batches seed 0); the earlier ones on the first 100
held-out captions. The shipped recipe, 2,400 steps with the dihedral tie: 99.8% / 98.0%,
pointing 85.8% on 100 captions, 85.5% on all 500, 86.1% on the validation set, where no peak
of the first 20 captions' 67 phrases strays from its mirrored or rotated cell; 23.5 minutes
beside a second training run (29.5 beside a benchmark). The runs that led there, by the patch
probe's weight (``token_pairs=1`` and 1,800 steps unless stated):

- ``patch_kinds=1``, ``token_pairs=0``, 1,600 steps, 24.9 minutes alone: 91.0% / 87.1%,
  pointing 81.1%. With ``token_pairs=1``: 91.0% / 90.8%, pointing 78.1%; 29.0 minutes alone.
- ``patch_kinds=3``, ``token_pairs=0``, 1,600 steps: 92.4% / 89.2%, pointing 81.1%; along the
  run, pointing was 82.8% after 400 steps, 85.8% after 800 (72.4% top-1), 83.1% after 1,200.
  With ``token_pairs=1`` (shipped three recipes ago): 97.0% / 94.9%, pointing 84.4% (81.7% on
  all 500).
- ``patch_kinds=10``, 1,800 steps (shipped two recipes ago): 99.0% / 96.4%, pointing
  87.4% on 100 captions, 84.6% on all 500; 82.4% on the validation set. 18.3 minutes.
- On the validation set, ``patch_kinds=6``: 76.8%; ``patch_kinds=15``: 78.8%.
- ``patch_kinds=10``, 2,400 steps, untied (the weights shipped before these): 99.9% / 98.4%,
  pointing 86.4% on 100 captions, 87.4% on all 500, 83.5% on the validation set; 19.9 minutes
  alone. Of the first 20 held-out captions' phrases that pointed into their box, 50 of 52
  peaks followed a mirror and 49 of 52 a rotation; the rest strayed a cell or to a neighbour.
  Tied, ``patch_kinds=3``: 99.8% / 97.8%, 79.6% on the validation set.
- ``patch_kinds=30``: 97.9% / 96.8%, pointing 79.8%.
- Probes on the patches entering each of the image tower's last three blocks, not the last
  only, each at the full weight: at 3, 97.9% / 96.5%, pointing 83.1%; at 10, 98.8% / 97.1%,
  pointing 77.5%. Patches that must name their object in earlier blocks too localise worse.
- An image tower pooling the patch mean (open_clip's ``pool_type='avg'``, explained by a trial
  extension of the engine): 89.4% / 88.2%, pointing 77.5%; with ``token_pairs=1`` and 1,800
  steps: 90.5% / 91.1%, pointing 71.2%.

Where pointing fails: at block 0 a phrase's heatmap peaks where its colour word's row peaks (144
of the first 50 captions' 149 phrases with the ``patch_kinds=1`` weights). Where another named
object has the same colour, that object often takes the peak: of the 411 such phrases of the 500
held-out scenes the shipped weights hit 294 (72%; the untied 2,400-step weights 297, the
1,800-step ones 255, 62%), against 1,014 of the 1,118 phrases of a unique colour (91%; untied
1,040, 93%). On the first 100 captions these groups
reached 47 of 73 and 217 of 229 with the 1,800-step weights (``patch_kinds=3``: 40 and 215;
``patch_kinds=1``, ``token_pairs=0``: 36 and 209, chance for the first). The shape rows are what
tell such objects apart; with ``patch_kinds=3`` they alone point into their object for 181 of
the 302 phrases, against 160 with ``patch_kinds=1`` and ``token_pairs=0``. 400-step pilots did
not raise the shared-colour hits by making shared colours common in training (half the scenes
drawn from two colours: 37 of 73, the same as without), nor with one object's shape changed in
half the image hard negatives as well (33 of 73); the shape negatives alone lowered retrieval
(55.1% / 58.8% against 64.6% / 65.0% on 500 scenes).

The weights are saved in float16 (the 49,408-row token embedding dominates; float32 would
exceed the 10 MB budget); the server casts them to its dtype on loading.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from safetensors.torch import save_file

from . import model as shapes_model
from . import symmetry
from .scenes import COLOURS, SHAPES, SIZES, Scene, colour_swapped, describe, generate_scene, patch_coverage, random_style, render


@dataclass(frozen=True)
class Recipe:
    """Training hyper-parameters.

    Attributes:
        steps: optimiser steps.
        scenes_per_batch: scenes per step; each comes with its hard negative, so a batch holds
            twice as many image-caption pairs.
        lr: peak learning rate.
        warmup_steps: linear warm-up from 0 to ``lr``, then cosine decay to 0.
        weight_decay: AdamW decay of weight matrices (not of biases, norms, embeddings, scale).
        curriculum: (fraction of training, (fewest, most) objects per scene) from that point on.
        patch_kinds: weight of the auxiliary loss that asks each patch entering the image
            tower's last block for the kind of object covering it (0 = none).
        token_pairs: weight of the auxiliary loss that asks each shape word entering the text
            tower's last block for its phrase's (colour, shape) (0 = none).
        init_logit_scale: the logit scale's starting value, natural log (it is learnt, and
            clamped to at most log 100 as in CLIP).
        dihedral: tie the image tower's weights so that it commutes with mirrors and quarter
            turns (:mod:`.symmetry`).
        seed: seeds the initial weights and every batch.
        threads: torch intra-op threads. One, because batches are rendered on a second thread:
            on two cores, two torch threads spin-wait against the renderer and run slower.
    """

    steps: int = 2400
    scenes_per_batch: int = 48
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    curriculum: tuple[tuple[float, tuple[int, int]], ...] = ((0.0, (1, 2)), (0.1, (1, 3)), (0.25, (1, 4)))
    patch_kinds: float = 10.0
    token_pairs: float = 1.0
    init_logit_scale: float = 3.912  # log 50, rounded as the shipped weights were trained
    dihedral: bool = True
    seed: int = 0
    threads: int = 1

    def objects_at(self, step: int) -> tuple[int, int]:
        """The (fewest, most) objects per scene at ``step``."""
        current = self.curriculum[0][1]
        for start, counts in self.curriculum:
            if step >= start * self.steps:
                current = counts
        return current

    def lr_at(self, step: int) -> float:
        """Learning rate at ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def altered(scene: Scene, rng: np.random.Generator, attribute: str) -> Scene:
    """The scene with one object's colour or shape replaced: its full caption is false for ``scene``.

    Args:
        scene: the scene.
        rng: the source of randomness.
        attribute: ``"colour"`` or ``"shape"``; the new value keeps the scene's (colour, shape)
            pairs distinct (the drawn colour follows the new colour name).
    """
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    kinds = {(o.colour, o.shape) for o in scene.objects}
    if attribute == "colour":
        colour = str(rng.choice([c for c in COLOURS if (c, obj.shape) not in kinds]))
        rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + np.array(obj.rgb) - COLOURS[obj.colour], 0, 255))
        changed = dataclasses.replace(obj, colour=colour, rgb=rgb)
    else:
        changed = dataclasses.replace(obj, shape=str(rng.choice([s for s in SHAPES if (obj.colour, s) not in kinds])))
    objects = list(scene.objects)
    objects[index] = changed
    return dataclasses.replace(scene, objects=tuple(objects))


def hard_negative(scene: Scene, rng: np.random.Generator) -> Scene:
    """A scene with the same layout whose full caption is false for ``scene``.

    Two objects' colours swapped (:func:`colour_swapped`) when possible; otherwise one object
    recoloured (:func:`altered`).
    """
    return colour_swapped(scene, rng) or altered(scene, rng, "colour")


def named_objects(scene: Scene, caption_style) -> dict[tuple[str, str], str | None]:
    """(colour, shape) -> the size the caption names for it (None when it names none)."""
    caption = describe(scene, caption_style)
    named = {}
    for phrase in caption.phrases:
        obj = scene.objects[phrase.object_index]
        words = caption.text[phrase.start : phrase.end].split()
        named[(obj.colour, obj.shape)] = obj.size if len(words) == 3 else None
    return named


def describes_exactly(named: dict[tuple[str, str], str | None], scene: Scene) -> bool:
    """Whether a caption naming ``named`` (all of a scene's objects) describes ``scene`` exactly."""
    sizes = {(o.colour, o.shape): o.size for o in scene.objects}
    return len(sizes) == len(named) and all(k in sizes and (z is None or sizes[k] == z) for k, z in named.items())


@dataclass
class Batch:
    """One training batch: B images, C = 2B captions, and which captions describe which images.

    Captions 0..B-1 describe images 0..B-1; captions B..2B-1 are text-only hard negatives, one
    per image (one object's colour or shape changed).
    """

    pixels: torch.Tensor  # (B, 3, H, W) float32, normalised as the server does
    tokens: torch.Tensor  # (C, S) int64, cut after the longest caption's end token
    positives: torch.Tensor  # (B, C) bool: positives[i, j] = caption j describes image i
    kinds: torch.Tensor  # (B, Gh * Gw) int64: patch_kind_labels of each image, patches row-major
    pairs: torch.Tensor  # (C, S) int64: token_pair_labels of the tokens


def _cut(tokens: torch.Tensor) -> torch.Tensor:
    # Causal text tower: positions after the end token cannot change the pooled output, so
    # cutting them off computes the same embeddings at a fraction of the cost.
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]


KINDS = tuple((colour, shape, size) for colour in COLOURS for shape in SHAPES for size in SIZES)
"""Every (colour, shape, size) an object can have: the classes of :func:`patch_kind_labels`."""
BACKGROUND_KIND = len(KINDS)
"""The class of a patch that no object covers."""
_COVERED = 0.2  # an object covering less of a patch than this leaves it background


def patch_kind_labels(scene: Scene, patch: int) -> np.ndarray:
    """int64 (Gh * Gw,), row-major: per patch, the index in :data:`KINDS` of the object covering
    most of it, or :data:`BACKGROUND_KIND` when no object covers a fifth of it."""
    coverage = patch_coverage(scene, patch).reshape(len(scene.objects), -1)
    kinds = np.array([KINDS.index((o.colour, o.shape, o.size)) for o in scene.objects])
    return np.where(coverage.max(0) >= _COVERED, kinds[coverage.argmax(0)], BACKGROUND_KIND)


PAIRS = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)
"""Every (colour, shape) a phrase can name: the classes of :func:`token_pair_labels`."""
NO_PAIR = -100
"""The label of a token that is not a shape word after a colour word (cross_entropy's default
``ignore_index``)."""


def _word_ids(tokenizer, words) -> list[int]:
    tokens = tokenizer(list(words))
    if not bool((tokens[:, 2] == tokens.max(dim=1).values).all()):  # start, word, end
        raise ValueError(f"every word of {list(words)} must be one token of the tokenizer")
    return tokens[:, 1].tolist()


def token_pair_labels(tokens: torch.Tensor, tokenizer) -> torch.Tensor:
    """int64 like ``tokens`` (C, S): at a shape word that follows a colour word, the index in
    :data:`PAIRS` of that (colour, shape); :data:`NO_PAIR` at every other token.

    Raises:
        ValueError: a colour or shape name is more than one token of ``tokenizer``.
    """
    colour_ids = dict(zip(COLOURS, _word_ids(tokenizer, COLOURS)))
    shape_ids = dict(zip(SHAPES, _word_ids(tokenizer, SHAPES)))
    labels = torch.full_like(tokens, NO_PAIR)
    for pair, (colour, shape) in enumerate(PAIRS):
        follows = (tokens[:, :-1] == colour_ids[colour]) & (tokens[:, 1:] == shape_ids[shape])
        labels[:, 1:][follows] = pair
    return labels


def make_batch(recipe: Recipe, step: int, tokenizer, transform, patch: int) -> Batch:
    """The batch of ``step``: a pure function of ``recipe.seed`` and ``step``.

    Args:
        recipe: the recipe (objects per scene, scenes per batch, seed).
        step: the step index.
        tokenizer: open_clip tokenizer of the model.
        transform: the model's eval image transform (the server's preprocessing).
        patch: the model's patch side, pixels.
    """
    rng = np.random.default_rng([recipe.seed, step])
    counts = recipe.objects_at(step)
    scenes, styles = [], []
    for _ in range(recipe.scenes_per_batch):
        scene = generate_scene(rng, n_objects=counts)
        style = random_style(scene, rng)
        scenes += [scene, hard_negative(scene, rng)]
        styles += [style, style]  # the twin's caption differs only in colour words
    pixels = torch.stack([transform(render(s)) for s in scenes])
    # Text costs a fraction of an image: a further hard negative caption per image is cheap.
    described = scenes + [altered(s, rng, str(rng.choice(["colour", "shape"]))) for s in scenes]
    styles = styles + styles
    captions = [describe(s, st) for s, st in zip(described, styles)]
    tokens = _cut(tokenizer([c.text for c in captions]))
    named = [named_objects(s, st) for s, st in zip(described, styles)]
    positives = torch.tensor([[describes_exactly(n, s) for n in named] for s in scenes])
    kinds = torch.from_numpy(np.stack([patch_kind_labels(s, patch) for s in scenes]))
    return Batch(pixels, tokens, positives, kinds, token_pair_labels(tokens, tokenizer))


def encode_text(model: open_clip.model.CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` for token sequences cut after their end tokens (S <= context).

    Same modules and order as open_clip's ``CLIP.encode_text`` (batch-first blocks), with the
    positional embedding and causal mask cut to S positions (open_clip always runs all 77).

    Args:
        model: the CLIP model.
        tokens: (B, S) int64.

    Returns:
        (B, D) unnormalised text embeddings.
    """
    seq = tokens.shape[1]
    x = model.token_embedding(tokens) + model.positional_embedding[:seq]
    for block in model.transformer.resblocks:
        x = block(x, attn_mask=model.attn_mask[:seq, :seq])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]  # the end token has the largest id
    return x @ model.text_projection


def contrastive_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with several positives per row and text-only negatives.

    open_clip's ClipLoss takes the diagonal of a square matrix as the only positive; here
    identical captions of different scenes (common for one-object scenes) are positives too,
    with the target spread uniformly over them, and captions that describe no image in the
    batch are negatives for every image (they have no caption-to-image term).

    Args:
        logits: (B, C) image-by-caption logits.
        positives: (B, C) bool, every row with at least one True.

    Returns:
        Scalar loss.
    """
    target = positives.float()
    image_to_text = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    described = target.sum(0) > 0
    column = target[:, described]
    text_to_image = -(column / column.sum(0, keepdim=True) * F.log_softmax(logits[:, described], dim=0)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        # Decaying embeddings would shrink the rows of words the captions never use toward
        # zero; gains, biases and the temperature are not weights to regularise.
        is_matrix = param.ndim >= 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(seed: int) -> open_clip.model.CLIP:
    """The shapes architecture with seeded random weights, as the server builds ``random:SEED``."""
    open_clip.add_model_config(shapes_model.CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(shapes_model.ARCHITECTURE, pretrained=None)


def train(recipe: Recipe, *, log=print, checkpoint=None, checkpoint_every: int = 0) -> open_clip.model.CLIP:
    """Train the shapes model from seeded random weights.

    Args:
        recipe: hyper-parameters.
        log: called with one progress line every 25 steps.
        checkpoint: called with the model (in train mode) every ``checkpoint_every`` steps,
            e.g. to save weights while a long run goes on; 0 = never.

    Returns:
        The trained model, in eval mode.
    """
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    model = build_model(recipe.seed)
    if recipe.dihedral:
        symmetry.tie(model)
    model.train()
    # Linear probes on the patches and tokens entering each tower's last block, trained
    # alongside and not saved.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        probe = torch.nn.Linear(model.visual.transformer.width, len(KINDS) + 1)
        text_probe = torch.nn.Linear(model.transformer.width, len(PAIRS))
    with torch.no_grad():
        model.logit_scale.fill_(recipe.init_logit_scale)
    tokenizer = open_clip.get_tokenizer(shapes_model.ARCHITECTURE)
    transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    optimiser = torch.optim.AdamW(
        _param_groups(model, recipe.weight_decay) + _param_groups(probe, recipe.weight_decay)
        + _param_groups(text_probe, recipe.weight_decay),
        lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6,
    )
    entering: dict[str, torch.Tensor] = {}  # the hidden states entering each tower's last block
    model.visual.transformer.resblocks[-1].register_forward_pre_hook(lambda _, args: entering.update(image=args[0]))
    model.transformer.resblocks[-1].register_forward_pre_hook(lambda _, args: entering.update(text=args[0]))
    patch = model.visual.patch_size[0]
    start = time.perf_counter()
    # One thread renders the next batch while torch trains on this one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(make_batch, recipe, 0, tokenizer, transform, patch)
        for step in range(recipe.steps):
            batch = upcoming.result()
            if step + 1 < recipe.steps:
                upcoming = pool.submit(make_batch, recipe, step + 1, tokenizer, transform, patch)
            for group in optimiser.param_groups:
                group["lr"] = recipe.lr_at(step)
            image = F.normalize(model.encode_image(batch.pixels), dim=-1)
            text = F.normalize(encode_text(model, batch.tokens), dim=-1)
            logits = model.logit_scale.exp() * image @ text.T
            contrastive = contrastive_loss(logits, batch.positives)
            patches = entering["image"][:, 1:]
            kinds = F.cross_entropy(probe(F.layer_norm(patches, patches.shape[-1:])).flatten(0, 1), batch.kinds.flatten())
            loss = contrastive + recipe.patch_kinds * kinds
            if recipe.token_pairs:
                words = entering["text"]
                pairs = F.cross_entropy(text_probe(F.layer_norm(words, words.shape[-1:])).flatten(0, 1), batch.pairs.flatten())
                loss = loss + recipe.token_pairs * pairs
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            if step % 25 == 0 or step == recipe.steps - 1:
                accuracy = batch.positives[torch.arange(len(logits)), logits.argmax(1)].float().mean()
                log(
                    f"step {step:5d}  loss {contrastive.item():.4f}  kinds {kinds.item():.3f}  "
                    + (f"pairs {pairs.item():.3f}  " if recipe.token_pairs else "")
                    + f"batch top-1 {accuracy.item():.3f}  "
                    f"lr {recipe.lr_at(step):.2e}  scale {model.logit_scale.exp().item():.1f}  "
                    f"objects {recipe.objects_at(step)}  {time.perf_counter() - start:.0f} s"
                )
            if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0:
                checkpoint(model)
    if recipe.dihedral:
        symmetry.untie(model)
    return model.eval()


def save_weights(model: torch.nn.Module, path: pathlib.Path) -> None:
    """Write the state dict as float16 safetensors (loading casts to the server's dtype); a model
    still tied by :func:`.symmetry.tie` is written as plain weights."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in symmetry.plain_state_dict(model).items()}
    save_file(state, str(path), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> int:
    """``python -m explain_server.shapes.training``: train and write the weights."""
    defaults = Recipe()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=shapes_model.WEIGHTS, help="weights file (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--scenes-per-batch", type=int, default=defaults.scenes_per_batch)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--patch-kinds", type=float, default=defaults.patch_kinds)
    parser.add_argument("--token-pairs", type=float, default=defaults.token_pairs)
    parser.add_argument("--dihedral", action=argparse.BooleanOptionalAction, default=defaults.dihedral)
    parser.add_argument("--init-logit-scale", type=float, default=defaults.init_logit_scale)
    parser.add_argument("--save-every", type=int, default=0, metavar="N", help="also write the weights every N steps")
    args = parser.parse_args(argv)
    recipe = dataclasses.replace(
        defaults, steps=args.steps, scenes_per_batch=args.scenes_per_batch, lr=args.lr, seed=args.seed,
        patch_kinds=args.patch_kinds, token_pairs=args.token_pairs, init_logit_scale=args.init_logit_scale, dihedral=args.dihedral,
    )
    print(f"training {shapes_model.ARCHITECTURE} with {json.dumps(dataclasses.asdict(recipe))}", flush=True)
    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model = train(
        recipe,
        log=lambda line: print(line, flush=True),
        checkpoint=lambda m: save_weights(m, args.out),
        checkpoint_every=args.save_every,
    )
    save_weights(model, args.out)
    minutes = (time.perf_counter() - start) / 60
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) after {minutes:.1f} minutes of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
