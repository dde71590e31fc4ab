"""Contrastive training of the ``shapes`` model on generated scenes (``make known-answer-model``).

:func:`train` builds the ``shapes-ViT`` architecture from seeded random weights and trains it
by a :class:`Recipe`; :func:`save_weights` writes the result as plain open_clip weights
(float16 safetensors, which the server casts to its dtype on loading). Training is
deterministic: the weights come from ``torch.manual_seed(recipe.seed)`` and batch ``k`` from
the seed and ``k`` alone (:func:`make_batch`), so the default recipe rewrites the shipped file
bit for bit.

What a training step does:

- Each scene of a batch comes with a hard negative: the same layout with the colours of two
  objects swapped (:func:`hard_negative`). Each image also gets a text-only hard negative, its
  caption with one object's colour or shape changed (:func:`altered`).
- The loss is a symmetric InfoNCE in which a caption is a positive for every image it describes
  exactly (:func:`contrastive_loss`).
- Two auxiliary losses use linear probes that are trained alongside and not saved. One names,
  for each patch entering the image tower's last block, the object covering it
  (:func:`patch_kind_labels`). The other names, for each shape word entering the text tower's
  last block, its phrase's (colour, shape) (:func:`token_pair_labels`).
- With ``Recipe.dihedral`` the image tower is tied to commute with mirrors and quarter turns
  (:mod:`.symmetry`).

The model card, docs/shapes-model.md, gives the reasons for each part of the recipe, the
figures of the shipped weights and the runs that led to them.
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
from .scenes import (
    COLOURS,
    SHAPES,
    SIZES,
    Scene,
    colour_swapped,
    describe,
    generate_scene,
    patch_coverage,
    random_style,
    render,
)


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
        rgb = tuple(
            int(v) for v in np.clip(np.array(COLOURS[colour]) + np.array(obj.rgb) - COLOURS[obj.colour], 0, 255)
        )
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
        _param_groups(model, recipe.weight_decay)
        + _param_groups(probe, recipe.weight_decay)
        + _param_groups(text_probe, recipe.weight_decay),
        lr=recipe.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
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
            kinds = F.cross_entropy(
                probe(F.layer_norm(patches, patches.shape[-1:])).flatten(0, 1), batch.kinds.flatten()
            )
            loss = contrastive + recipe.patch_kinds * kinds
            if recipe.token_pairs:
                words = entering["text"]
                pairs = F.cross_entropy(
                    text_probe(F.layer_norm(words, words.shape[-1:])).flatten(0, 1), batch.pairs.flatten()
                )
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
    parser.add_argument(
        "--out", type=pathlib.Path, default=shapes_model.WEIGHTS, help="weights file (default: %(default)s)"
    )
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
        defaults,
        steps=args.steps,
        scenes_per_batch=args.scenes_per_batch,
        lr=args.lr,
        seed=args.seed,
        patch_kinds=args.patch_kinds,
        token_pairs=args.token_pairs,
        init_logit_scale=args.init_logit_scale,
        dihedral=args.dihedral,
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
