"""The ResNet family adapter splits open_clip's ModifiedResNet exactly, and torch.func differentiates it."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, seeded_model
from hypothesis import given, settings
from hypothesis import strategies as st
from resnets import seeded_resnet
from torch.func import jvp, vjp, vmap

from explain_server.engine import generic
from explain_server.engine.attribution import ChunkBudget, PathIntegral
from explain_server.engine.families import image_tower
from explain_server.engine.families.resnet import ResNetImageTower
from explain_server.engine.quadrature import nodes_and_weights
from explain_server.engine.split import UnsupportedModelError

pytestmark = pytest.mark.unit

NAMES = ("layer1", "layer2", "layer3", "layer4", "attnpool")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return seeded_resnet().double().requires_grad_(False)


@pytest.fixture(scope="module")
def tower(model) -> ResNetImageTower:
    return image_tower(model)


def pixels(batch: int, seed: int) -> torch.Tensor:
    return torch.randn((batch, 3, 64, 64), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def no_lengths(batch: int) -> torch.Tensor:
    return torch.zeros(batch, dtype=torch.long)


def test_layers_name_each_stage_input_and_the_pool_with_its_grid(tower):
    assert tuple(layer.name for layer in tower.layers) == NAMES
    assert [layer.grid for layer in tower.layers] == [(16, 16), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert all(layer.prefix == () for layer in tower.layers)
    assert tower.layers[tower.default_layer].name == "attnpool"
    assert tower.embed_dim == 64


def test_lower_presents_each_feature_map_row_major(model, tower):
    """Row r * W + c of lower's output is cell (r, c) of the stage input open_clip computes."""
    x = pixels(2, 1)
    maps = model.visual.forward_intermediates(x, intermediates_only=True)["image_intermediates"]
    for layer, feature_map in enumerate(maps):  # the stem's output, then each stage's
        hidden = tower.lower(x, layer, no_lengths(2))
        _, channels, height, width = feature_map.shape
        assert hidden.shape == (2, height * width, channels)
        assert (height, width) == tower.layers[layer].grid
        for row, col in [(0, 0), (0, width - 1), (height - 1, 0), (height // 2, width // 3)]:
            torch.testing.assert_close(hidden[:, row * width + col], feature_map[:, :, row, col], rtol=0, atol=0)


@settings(max_examples=12, deadline=None)
@given(layer=st.integers(0, len(NAMES) - 1), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_upper_of_lower_is_the_embedding_at_every_layer(model, tower, layer, batch, seed):
    x = pixels(batch, seed)
    got = tower.upper(tower.lower(x, layer, no_lengths(batch)), layer, no_lengths(batch))
    torch.testing.assert_close(got, model.encode_image(x), rtol=0, atol=1e-10)


def model_upper(model: torch.nn.Module, layer: int, hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """f_hi with the model's own modules (its fused attention pool included), for reverse-mode autograd."""
    x = hidden.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], *grid)
    for name in NAMES[layer:-1]:
        x = getattr(model.visual, name)(x)
    return model.visual.attnpool(x)


@settings(max_examples=8, deadline=None)
@given(layer=st.integers(0, len(NAMES) - 1), seed=st.integers(0, 2**16), alpha=st.floats(0.0, 1.0))
def test_batched_jvp_and_vjp_give_the_models_jacobian(model, tower, layer, seed, alpha):
    """The engine's per-cell tangents under vmap(jvp), and cotangents under vmap(vjp), at a path
    point, against autograd's Jacobian through the model's own modules."""
    lengths = no_lengths(1)
    hidden = tower.lower(pixels(1, seed), layer, lengths)
    reference = tower.lower(torch.zeros((1, 3, 64, 64), dtype=torch.float64), layer, lengths)
    point = reference + alpha * (hidden - reference)
    delta = (hidden - reference)[0]
    generator = torch.Generator().manual_seed(seed)
    # tangent j: the path delta on cell cells[j], zero elsewhere (engine/generic.py's columns);
    # 16 cells of the up to 256, for time
    cells = torch.randperm(delta.shape[0], generator=generator)[:16]
    tangents = torch.zeros((len(cells), *point.shape), dtype=torch.float64)
    tangents[torch.arange(len(cells)), 0, cells] = delta[cells]

    def upper(h: torch.Tensor) -> torch.Tensor:
        return tower.upper(h, layer, lengths)

    columns = vmap(lambda t: jvp(upper, (point,), (t,))[1])(tangents)[:, 0]  # (16, D)
    cotangents = torch.randn((3, 1, tower.embed_dim), dtype=torch.float64, generator=generator)
    _, pullback = vjp(upper, point)
    pulled = vmap(lambda u: pullback(u)[0])(cotangents)[:, 0]  # (3, S, C)

    grid = tower.layers[layer].grid
    leaf = point.clone().requires_grad_(True)
    embedding = model_upper(model, layer, leaf, grid)
    expected = torch.stack(
        [torch.autograd.grad(embedding, leaf, u, retain_graph=True)[0][0] for u in cotangents]
    )  # u^T J, (3, S, C)
    torch.testing.assert_close(pulled, expected, rtol=1e-9, atol=1e-12)
    # u^T (J tangent_s) = (u^T J)[s] . delta[s]: each forward-mode column against reverse mode
    torch.testing.assert_close(
        torch.einsum("kd,sd->ks", cotangents[:, 0], columns),
        torch.einsum("ksc,sc->ks", expected[:, cells], delta[cells]),
        rtol=1e-9,
        atol=1e-12,
    )


def test_other_image_towers_are_refused():
    with pytest.raises(UnsupportedModelError, match="VisionTransformer is not open_clip's ModifiedResNet"):
        ResNetImageTower(seeded_model(TINY).visual)


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 3), seed=st.integers(0, 2**16), subset=st.lists(st.integers(0, 3), min_size=1, max_size=4))
def test_the_pools_row_split_is_upper_and_gives_the_same_factors(tower, batch, seed, subset):
    """At ``attnpool``: rest(rows(h)) == upper(h), rows act on each cell alone, and the generic
    factors with the split equal those of the whole f_hi."""
    layer = len(NAMES) - 1
    split = tower.row_split(layer)
    assert all(tower.row_split(other) is None for other in range(layer))
    with torch.no_grad():
        hidden = tower.lower(pixels(batch, seed), layer, no_lengths(batch))
        reference = tower.lower(torch.zeros_like(pixels(1, 0)), layer, no_lengths(1))[0]
        positions = torch.arange(hidden.shape[1]).expand(batch, -1)
        rows = split.rows(hidden, positions)
        torch.testing.assert_close(split.rest(rows, None), tower.upper(hidden, layer, None), rtol=1e-10, atol=1e-12)
        some = torch.tensor(subset)
        torch.testing.assert_close(
            split.rows(hidden[:, some], positions[:, some]), rows[:, some], rtol=1e-12, atol=1e-12
        )
        alphas, weights = nodes_and_weights("gausslegendre", 2)
        paths = [PathIntegral(h, reference, alphas, weights) for h in hidden]
        got = generic._forward(tower, layer, paths, ChunkBudget(1 << 16))
        whole = generic._forward(_without_split(tower), layer, paths, ChunkBudget(1 << 30))
    for factor, expected in zip(got, whole):
        torch.testing.assert_close(factor, expected, rtol=1e-9, atol=1e-12)


class _without_split:
    """``tower`` with no row split: the generic path over the whole f_hi."""

    def __init__(self, tower):
        self._tower = tower

    def __getattr__(self, name):
        return getattr(self._tower, name)

    def row_split(self, layer):
        return None
