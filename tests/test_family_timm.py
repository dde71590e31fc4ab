"""The timm-trunk image towers (engine/families/timm_trunks.py) on scaled-down open_clip architectures.

One architecture per trunk family that ``open_clip.list_pretrained()`` uses (tests/scaled_models.py
keeps each trunk's module types, pooling, prefix tokens and rope), built in float64 with seeded
random weights. The weights are then perturbed so that layer scales (initialised near zero) and
batch-norm statistics (initialised to the identity) matter: a block skipped or run twice, or a
reparameterisation that lost a branch, moves the embedding far beyond the tolerances.
"""

from __future__ import annotations

import open_clip
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.timm_model import TimmModel
from scaled_models import add_scaled_architecture, register_scaled_timm
from torch.func import jvp, vjp, vmap

from explain_server.engine import generic
from explain_server.engine.attribution import ChunkBudget, PathIntegral
from explain_server.engine.families import image_tower
from explain_server.engine.families.timm_trunks import TimmConvTower, TimmTransformerTower
from explain_server.engine.quadrature import nodes_and_weights
from explain_server.engine.split import PoolSplit, UnsupportedModelError

pytestmark = pytest.mark.unit

# architecture -> what it stands for
ARCHITECTURES = {
    "ViT-B-16-SigLIP": "ViT, MAP pooling, no class token, no projection (SigLIP, SigLIP2)",
    "MobileCLIP2-L-14": "ViT with class token, token pooling (vit_large_patch14_clip)",
    "MobileCLIP-B": "hybrid ViT: conv stem as patch embedding (vit_base_mci)",
    "ViTamin-S": "ViTamin: MbConv stages as patch embedding, average pooling, fc norm, linear projection",
    "EVA01-g-14": "Eva without rope (EVA01)",
    "EVA02-B-16": "Eva with rope, SwiGLU, class token (EVA02)",
    "EVA02-E-14": "Eva with residual post-norm (EVA02-E)",
    "PE-Core-B-16": "Eva with rope, class token and MAP pooling (PE-Core)",
    "PE-Core-bigG-14-448": "Eva with rope, MAP pooling, no class token (PE-Core bigG)",
    "convnext_base": "ConvNeXt, linear projection",
    "convnext_large_d": "ConvNeXt, MLP projection",
    "MobileCLIP-S1": "FastViT-MCi, four stages (MobileCLIP S0-S2)",
    "MobileCLIP2-S3": "FastViT-MCi, five stages (MobileCLIP2 S3, S4)",
}
TOL = dict(rtol=1e-10, atol=1e-12)
EXAMPLES = max(3, settings.default.max_examples // 4)


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every parameter and batch-norm statistic off its initial value (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))


def build(architecture: str, directory) -> torch.nn.Module:
    """The scaled-down ``architecture``, seeded, perturbed, float64, eval mode."""
    name = add_scaled_architecture(architecture, directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None)
    model = model.double().eval()
    perturb(model)
    return model


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """architecture -> (model, its image tower's adapter), built on first use."""
    directory = tmp_path_factory.mktemp("scaled")
    cache = {}

    def get(architecture: str):
        if architecture not in cache:
            model = build(architecture, directory)
            cache[architecture] = model, image_tower(model)
        return cache[architecture]

    return get


def images(model: torch.nn.Module, batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.visual.image_size, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_split_recomposes_the_embedding_at_every_layer(towers, architecture):
    model, tower = towers(architecture)
    x = images(model, 2)
    with torch.no_grad():
        want = model.encode_image(x)
        assert tower.embed_dim == want.shape[-1]
        for index, layer in enumerate(tower.layers):
            hidden = tower.lower(x, index, None)
            assert hidden.shape[:2] == (2, layer.positions), layer
            torch.testing.assert_close(tower.upper(hidden, index, None), want, **TOL)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_layers_name_blocks_or_stages_then_the_pooling_input(towers, architecture):
    model, tower = towers(architecture)
    trunk = model.visual.trunk
    x = images(model, 1)
    names = [layer.name for layer in tower.layers]
    # a class-token pool reads one row: its input is no layer to explain
    one_row = isinstance(tower, TimmTransformerTower) and trunk.attn_pool is None and trunk.global_pool == "token"
    assert (names[-1] == "head") != one_row
    units = len(trunk.blocks) if isinstance(tower, TimmTransformerTower) else len(trunk.stages)
    # the head's input where there is one, else the last block's
    assert tower.default_layer == len(names) - 1
    with torch.no_grad():
        features = trunk.forward_features(x)
        head = tower.lower(x, units, None)
    if isinstance(tower, TimmTransformerTower):
        assert names[:units] == [f"block {i}" for i in range(len(trunk.blocks))]
        prefix = tower.layers[0].prefix
        assert len(prefix) == trunk.num_prefix_tokens
        assert prefix[:1] == (("cls",) if trunk.cls_token is not None else ())
        assert all(layer.grid == tuple(trunk.patch_embed.grid_size) for layer in tower.layers)
        torch.testing.assert_close(head, features, **TOL)
    else:
        assert isinstance(tower, TimmConvTower)
        assert names[:-1] == [f"stages.{i}" for i in range(len(trunk.stages))]
        assert all(layer.prefix == () for layer in tower.layers)
        assert tower.layers[-1].grid == tuple(features.shape[-2:])
        torch.testing.assert_close(head, features.flatten(2).transpose(1, 2), **TOL)
        grids = [layer.grid for layer in tower.layers[:-1]]
        assert grids == sorted(grids, reverse=True) and grids[0] > grids[-1]  # stages downsample


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_forward_and_reverse_derivatives_of_upper_agree(towers, architecture, data):
    """<u, J t> by vmapped JVPs equals <J^T u, t> by vmapped VJPs, and J t matches finite differences."""
    model, tower = towers(architecture)
    layer = data.draw(st.integers(0, len(tower.layers) - 1), label="layer")
    batch = data.draw(st.integers(1, 3), label="batch")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    hidden = tower.lower(images(model, batch, seed), layer, None).detach()
    generator = torch.Generator().manual_seed(seed)
    tangents = torch.randn(3, *hidden.shape, generator=generator, dtype=hidden.dtype)
    cotangents = torch.randn(2, batch, tower.embed_dim, generator=generator, dtype=hidden.dtype)

    def upper(h):
        return tower.upper(h, layer, None)

    forward = vmap(lambda t: jvp(upper, (hidden,), (t,))[1])(tangents)
    _, pullback = vjp(upper, hidden)
    (reverse,) = vmap(pullback)(cotangents)
    assert forward.shape == (3, batch, tower.embed_dim) and reverse.shape == (2, *hidden.shape)
    torch.testing.assert_close(
        torch.einsum("kbd,cbd->kc", cotangents, forward),
        torch.einsum("kbsd,cbsd->kc", reverse, tangents),
        rtol=1e-9,
        atol=1e-12,
    )
    step = 1e-5
    with torch.no_grad():
        central = (upper(hidden + step * tangents[0]) - upper(hidden - step * tangents[0])) / (2 * step)
    torch.testing.assert_close(forward[0], central, rtol=1e-5, atol=1e-7 * central.abs().max().item())


@pytest.mark.parametrize("architecture", ["MobileCLIP-S1", "MobileCLIP2-S3", "ViT-B-16-SigLIP", "PE-Core-B-16"])
def test_preparing_for_forward_mode_keeps_the_embeddings(tmp_path, architecture):
    """Explicit attention, and FastViT's reparameterisation into its inference form, compute the same
    embeddings as the model as built; the FastViT trunk's branches are gone afterwards."""
    model = build(architecture, tmp_path)
    x = images(model, 2)
    with torch.no_grad():
        before = model.encode_image(x)
        image_tower(model)
        after = model.encode_image(x)
    torch.testing.assert_close(after, before, **TOL)
    assert not any(getattr(module, "fused_attn", False) for module in model.visual.modules())
    fused = [hasattr(m, "reparam_conv") for m in model.visual.modules() if hasattr(m, "reparameterize")]
    assert all(fused)
    assert bool(fused) == architecture.startswith("MobileCLIP")  # FastViT trunks have branches to fuse


@pytest.mark.parametrize(
    ("name", "prefix"),
    [
        ("vit_base_patch16_reg4_gap_256", ("reg0", "reg1", "reg2", "reg3")),
        ("vit_small_patch16_rope_mixed_224", ("cls",)),
    ],
)
def test_registers_and_depth_dependent_rope_beyond_open_clips_trunks(name, prefix):
    """Register tokens are labelled after the class token, and an Eva whose rope differs per block
    ("mixed") is split correctly: timm trunks no pretrained open_clip model uses yet."""
    small, size = register_scaled_timm(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        visual = TimmModel(small, embed_dim=32, image_size=size)
    perturb(visual)
    visual = visual.double().eval()
    tower = image_tower(_holding(visual))
    assert all(layer.prefix == prefix for layer in tower.layers)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = visual(x)
        for index in range(len(tower.layers)):
            torch.testing.assert_close(tower.upper(tower.lower(x, index, None), index, None), want, **TOL)


def _holding(visual: torch.nn.Module) -> torch.nn.Module:
    """A bare module whose ``visual`` is ``visual``: what image_tower reads of a dual encoder."""
    model = torch.nn.Module()
    model.visual = visual
    return model


def test_an_unknown_trunk_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="ResNet"):
        image_tower(_holding(TimmModel("test_resnet", embed_dim=16, image_size=32)))


@pytest.mark.parametrize(
    "name",
    [
        "vit_so400m_patch14_siglip_224",
        "vit_large_patch14_clip_224",
        "vit_base_mci_224",
        "vitamin_large2_224",
        "vitamin_xlarge_256",
        "eva_giant_patch14_224",
        "eva02_enormous_patch14_clip_224",
        "vit_pe_core_gigantic_patch14_448",
        "convnext_xxlarge",
        "fastvit_mci4",
    ],
)
def test_scaled_trunks_keep_the_module_types_and_tokens(name):
    """The scaled trunk is built from the same module classes, with the same prefix tokens and
    pooling, as the full-size one (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        full = timm.create_model(name)
    small = timm.create_model(register_scaled_timm(name)[0])
    assert {type(m) for m in small.modules()} == {type(m) for m in full.modules()}
    for attribute in ("num_prefix_tokens", "global_pool", "no_embed_class", "rope_mixed"):
        assert getattr(small, attribute, None) == getattr(full, attribute, None), attribute
    assert (getattr(small, "rope", None) is None) == (getattr(full, "rope", None) is None)


# architecture -> whether its pool reads the class token alone (else all rows: MAP or average)
LAST_BLOCK = {
    "EVA02-B-16": True,
    "EVA01-g-14": True,
    "EVA02-E-14": True,
    "MobileCLIP2-L-14": True,
    "MobileCLIP-B": True,
    "PE-Core-B-16": False,
    "ViTamin-S": False,
}


def _check_last_block_split(tower, hidden: torch.Tensor, want: torch.Tensor, subset: torch.Tensor) -> None:
    """rest(rows(h, all positions)) is the embedding ``want``, and rows is row-wise: any ``subset`` of
    positions, each with its own index, gives those rows of the full evaluation."""
    last = len(tower.trunk.blocks) - 1
    split = tower.row_split(last)
    assert isinstance(split, PoolSplit) and split.query_rows == 1  # the class row's query
    batch, seq = hidden.shape[:2]
    positions = torch.arange(seq).expand(batch, -1)
    rows = split.whole.rows(hidden, positions)
    torch.testing.assert_close(split.whole.rest(rows, None), want, **TOL)
    torch.testing.assert_close(split.upper(hidden, None), want, **TOL)
    torch.testing.assert_close(tower.upper(hidden, last, None), want, **TOL)
    picked = split.whole.rows(hidden[:, subset], subset.expand(batch, -1))
    torch.testing.assert_close(picked, rows[:, subset], **TOL)
    keys, values = split.keys_values(hidden, positions)
    some_keys, some_values = split.keys_values(hidden[:, subset], subset.expand(batch, -1))
    torch.testing.assert_close(some_keys, keys[:, subset], **TOL)
    torch.testing.assert_close(some_values, values[:, subset], **TOL)


@pytest.mark.parametrize("architecture", LAST_BLOCK)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_the_last_block_of_a_class_token_pool_splits_off_its_rows(towers, architecture, data):
    """At the last block, f_hi = rest o rows where the pool reads the class token alone; no split
    where it reads every row."""
    model, tower = towers(architecture)
    last = len(model.visual.trunk.blocks) - 1
    if not LAST_BLOCK[architecture]:
        assert tower.row_split(last) is None
        return
    batch = data.draw(st.integers(1, 3), label="batch")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    seq = tower.layers[last].positions
    subset = torch.tensor(data.draw(st.lists(st.integers(0, seq - 1), min_size=1, max_size=5), label="subset"))
    x = images(model, batch, seed)
    with torch.no_grad():
        _check_last_block_split(tower, tower.lower(x, last, None), model.encode_image(x), subset)


def test_the_last_block_splits_with_depth_dependent_rope():
    """A class-token pool on an Eva whose rope differs per block ("mixed", AttentionRope): each row
    takes its own block's rope entry."""
    small, size = register_scaled_timm("vit_small_patch16_rope_mixed_224")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        visual = TimmModel(small, embed_dim=32, image_size=size, pool="token")
    perturb(visual)
    visual = visual.double().eval()
    tower = image_tower(_holding(visual))
    assert visual.trunk.rope_mixed and tower.row_split(len(visual.trunk.blocks) - 1) is not None
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = tower.lower(x, len(visual.trunk.blocks) - 1, None)
        _check_last_block_split(tower, hidden, visual(x), torch.tensor([5, 0, 16, 3]))


@pytest.mark.parametrize("architecture", [name for name, one_row in LAST_BLOCK.items() if one_row])
def test_the_last_block_split_changes_the_cost_not_the_factors(tmp_path, architecture):
    """The generic path's factors at the last block are the same with and without the row split."""
    model = build(architecture, tmp_path).requires_grad_(False)
    tower = image_tower(model)
    last = len(model.visual.trunk.blocks) - 1
    x = images(model, 2)
    with torch.no_grad():
        hidden = tower.lower(x, last, None)
        reference = tower.lower(torch.zeros_like(x[:1]), last, None)[0]
        alphas, weights = nodes_and_weights("gausslegendre", 3)
        paths = [PathIntegral(h, reference, alphas, weights) for h in hidden]
        assert tower.row_split(last) is not None
        got = generic._forward(tower, last, paths, ChunkBudget(1 << 16))
        tower.row_split = lambda layer: None  # the same tower without the split
        want = generic._forward(tower, last, paths, ChunkBudget(1 << 30))
    for factor, expected in zip(got, want):
        torch.testing.assert_close(factor, expected, rtol=1e-9, atol=1e-12)
