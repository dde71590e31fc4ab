"""The attribution engine in-process: brute force, completeness, quadrature, tower splits, load checks."""

from __future__ import annotations

import copy
import json

import numpy as np
import open_clip
import pytest
import torch
from conftest import TINY, seeded_model
from torch.autograd.functional import jacobian

from explain_server.engine.attribution import ChunkBudget, PathIntegral, choose_mode, forward_factors, reverse_factors
from explain_server.engine.explainer import Explainer, NonFiniteError, Side
from explain_server.engine.quadrature import METHODS, nodes_and_weights
from explain_server.engine.towers import ImageTower, TextTower
from explain_server.loading import ModelLoadError, load_model, resolve_device
from explain_server.model_spec import ModelSpec

pytestmark = pytest.mark.unit

CAPTION = "a red circle and a blue square"


def make_explainer(model) -> Explainer:
    tok = open_clip.get_tokenizer(TINY)
    return Explainer.for_clip(
        model, sot_token_id=tok.sot_token_id, eot_token_id=tok.eot_token_id, budget=ChunkBudget(1 << 20)
    )


def caption_ids(text: str = CAPTION) -> torch.Tensor:
    ids = open_clip.get_tokenizer(TINY)([text])[0]
    return ids[: int(ids.argmax()) + 1].long()


def random_pixels(seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn((3, 64, 64), generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def tiny64():
    """The tiny model in float64, so that comparisons test the method, not rounding."""
    return seeded_model(TINY).double().requires_grad_(False)


def test_towers_reproduce_open_clip_embeddings(tiny64):
    """upper(lower(x)) at every layer equals open_clip's own encode_text / encode_image."""
    ids = caption_ids()
    pixels = random_pixels(dtype=torch.float64)[None]
    text, image = TextTower(tiny64), ImageTower(tiny64)
    full_ids = open_clip.get_tokenizer(TINY)([CAPTION])
    with torch.no_grad():
        want_t = tiny64.encode_text(full_ids)
        want_v = tiny64.encode_image(pixels)
        for layer in range(text.n_layers):
            got_t = text.upper(text.lower(ids[None], layer), layer)
            torch.testing.assert_close(got_t, want_t, rtol=1e-10, atol=1e-12)
        for layer in range(image.n_layers):
            got_v = image.upper(image.lower(pixels, layer), layer)
            torch.testing.assert_close(got_v, want_v, rtol=1e-10, atol=1e-12)


def _open_clip_text_upper(model, layer: int, seq: int):
    """f_hi built from open_clip's own modules (reverse-mode friendly), independent of towers.py."""

    def f(h):
        x = h[None]
        for block in model.transformer.resblocks[layer:]:
            x = block(x, attn_mask=model.attn_mask[:seq, :seq])
        return model.ln_final(x)[0, seq - 1] @ model.text_projection

    return f


def _open_clip_image_upper(model, layer: int):
    def f(h):
        x = h[None]
        for block in model.visual.transformer.resblocks[layer:]:
            x = block(x)
        return model.visual.ln_post(x[0, 0]) @ model.visual.proj

    return f


@pytest.mark.parametrize("layers", [(1, 1), (0, 1), (1, 0)])
def test_equals_brute_force_feature_pair_matrix(tiny64, layers):
    """Token x patch matrix == the full (S_t d_t) x (S_v d_v) matrix of method.md summed over features."""
    text_layer, image_layer = layers
    explainer = make_explainer(tiny64)
    ids, pixels = caption_ids(), random_pixels(dtype=torch.float64)
    got = explainer.explain(
        ids, pixels, text_layer=text_layer, image_layer=image_layer, method="riemann_right", n_steps=4
    )

    alphas, weights = nodes_and_weights("riemann_right", 4)
    seq = len(ids)
    with torch.no_grad():
        h_t = explainer.text.lower(ids[None], text_layer)[0]
        r_t = explainer.text.lower(explainer._text_reference_ids, text_layer)[0, :seq]
        h_v = explainer.image.lower(pixels[None], image_layer)[0]
        r_v = explainer.image.lower(torch.zeros_like(pixels)[None], image_layer)[0]
    f_t = _open_clip_text_upper(tiny64, text_layer, seq)
    f_v = _open_clip_image_upper(tiny64, image_layer)
    with torch.enable_grad():
        j_t = sum(w * jacobian(f_t, r_t + a * (h_t - r_t)) for a, w in zip(alphas, weights))  # (D, S_t, d_t)
        j_v = sum(w * jacobian(f_v, r_v + a * (h_v - r_v)) for a, w in zip(alphas, weights))  # (D, S_v, d_v)
    d_t, d_v = (h_t - r_t).reshape(-1), (h_v - r_v).reshape(-1)
    pairs = d_t[:, None] * (j_t.reshape(j_t.shape[0], -1).T @ j_v.reshape(j_v.shape[0], -1)) * d_v[None, :]
    token_patch = pairs.reshape(seq, h_t.shape[1], h_v.shape[0], h_v.shape[1]).sum(dim=(1, 3))
    with torch.no_grad():
        norm = f_t(h_t).norm() * f_v(h_v).norm()
    want = (token_patch / norm).numpy()
    assert np.linalg.norm(got.interactions - want) <= 1e-5 * np.linalg.norm(want)


def dense_factor(upper, hidden, reference, alphas, weights) -> torch.Tensor:
    """The plain method, one full-sequence JVP per column and node: the oracle for the fast paths."""
    delta = hidden - reference
    columns = []
    for s in range(hidden.shape[0]):
        tangent = torch.zeros_like(hidden)
        tangent[s] = delta[s]
        column = sum(
            w * torch.func.jvp(upper, ((reference + a * delta)[None],), (tangent[None],))[1][0]
            for a, w in zip(alphas, weights)
        )
        columns.append(column)
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("tower_name", ["text", "image"])
@pytest.mark.parametrize("layer", [0, 1])
def test_row_sparse_forward_and_reverse_mode_equal_the_dense_jvp(tiny64, tower_name, layer):
    """Every supported layer of both towers: the three ways to compute a factor agree."""
    explainer = make_explainer(tiny64)
    tower = getattr(explainer, tower_name)
    with torch.no_grad():
        if tower_name == "text":
            ids = caption_ids()
            hidden = tower.lower(ids[None], layer)[0]
            reference = explainer._reference(explainer.text, layer)[: len(ids)]
        else:
            hidden = tower.lower(random_pixels(dtype=torch.float64)[None], layer)[0]
            reference = explainer._reference(explainer.image, layer)
        alphas, weights = nodes_and_weights("gausslegendre", 3)
        oracle = dense_factor(lambda h: tower.upper(h, layer), hidden, reference, alphas, weights)
        for factors in (forward_factors, reverse_factors):
            (got,) = factors(tower, layer, [PathIntegral(hidden, reference, alphas, weights)], ChunkBudget(1 << 16))
            torch.testing.assert_close(got, oracle, rtol=1e-9, atol=1e-12, msg=factors.__name__)


@pytest.mark.parametrize("factors", [forward_factors, reverse_factors])
@pytest.mark.parametrize("layer", [0, 1])
def test_batched_integrals_are_summed_apart_and_stopped_ones_dropped(tiny64, factors, layer):
    """Several requests' nodes share each pass, yet each factor equals its solo computation,
    whatever the batch's mix of quadrature rules and however memory splits it into groups; an
    integral whose stop check turns true comes back None without disturbing the others."""
    explainer = make_explainer(tiny64)
    tower = explainer.image
    with torch.no_grad():
        pixels = torch.stack([random_pixels(seed=seed, dtype=torch.float64) for seed in range(4)])
        hidden = tower.lower(pixels, layer)
        reference = explainer._reference(explainer.image, layer)
        rules = [("gausslegendre", 3), ("riemann_right", 5), ("riemann_trapezoid", 2), ("gausslegendre", 4)]
        integrals = [PathIntegral(h, reference, *nodes_and_weights(*rule)) for h, rule in zip(hidden, rules)]
        solo = [factors(tower, layer, [item], ChunkBudget(1 << 30))[0] for item in integrals]
        for memory_bytes in (1 << 30, 1 << 16):  # one group, then many groups and chunks
            for got, want in zip(factors(tower, layer, integrals, ChunkBudget(memory_bytes)), solo):
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        calls = {"n": 0}

        def stops_after_first_poll() -> bool:
            calls["n"] += 1
            return calls["n"] > 1

        stopping = PathIntegral(hidden[1], reference, *nodes_and_weights("gausslegendre", 3), stops_after_first_poll)
        got = factors(tower, layer, [integrals[0], stopping, integrals[2]], ChunkBudget(1 << 14))
        assert got[1] is None
        torch.testing.assert_close(got[0], solo[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got[2], solo[2], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("factors", [forward_factors, reverse_factors])
@pytest.mark.parametrize("layer", [0, 1])
def test_captions_of_different_lengths_share_a_padded_pass(tiny64, factors, layer):
    """Captions padded to the longest in one pass get the factors of their unpadded solo
    computations, with their own number of columns, whether the pass takes every column in
    one chunk or the shorter captions leave it part-way; a stopped one is dropped."""
    explainer = make_explainer(tiny64)
    tower = explainer.text
    captions = [caption_ids(text) for text in ("a cat", CAPTION, "a red circle", "a small green triangle on the left")]
    alphas, weights = nodes_and_weights("gausslegendre", 3)
    with torch.no_grad():
        reference = explainer._reference(explainer.text, layer)
        solo = [
            factors(
                tower,
                layer,
                [PathIntegral(tower.lower(ids[None], layer)[0], reference[: len(ids)], alphas, weights)],
                ChunkBudget(1 << 30),
            )[0]
            for ids in captions
        ]
        hidden = tower.lower(torch.nn.utils.rnn.pad_sequence(captions, batch_first=True), layer)
        padded = reference[: hidden.shape[1]]
        integrals = [PathIntegral(h, padded, alphas, weights, length=len(ids)) for h, ids in zip(hidden, captions)]
        for memory_bytes in (1 << 30, 1 << 13):  # every column at once; a few columns per chunk
            for got, want in zip(factors(tower, layer, integrals, ChunkBudget(memory_bytes)), solo):
                assert got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        polls = {"n": 0}

        def stops_after_first_poll() -> bool:
            polls["n"] += 1
            return polls["n"] > 1

        stopping = PathIntegral(hidden[3], padded, alphas, weights, stops_after_first_poll, length=len(captions[3]))
        got = factors(tower, layer, [integrals[0], integrals[1], stopping], ChunkBudget(1 << 13))
        assert got[2] is None
        for index in (0, 1):
            torch.testing.assert_close(got[index], solo[index], rtol=1e-9, atol=1e-12)


def test_explainer_pools_each_padded_caption_and_its_reference_at_its_own_end_token(tiny64):
    """Explainer.factors on captions of several lengths at once: each factor and both path
    endpoints (the caption's embedding, and the reference pooled at the caption's end token)
    equal those of the caption alone."""
    explainer = make_explainer(tiny64)
    captions = [caption_ids(text) for text in ("a cat", CAPTION, "a dog", "a red circle")]
    sides = [Side(ids, 1, "gausslegendre", 3) for ids in captions]
    together = explainer.factors(explainer.text, sides)
    for side, got in zip(sides, together):
        (want,) = explainer.factors(explainer.text, [side])
        torch.testing.assert_close(got.matrix, want.matrix, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.endpoints, want.endpoints, rtol=1e-9, atol=1e-12)


def test_cost_model_prefers_forward_mode_unless_sequences_dwarf_the_embedding(tiny64):
    explainer = make_explainer(tiny64)
    assert choose_mode(explainer.image, 1, seq=17, embed_dim=32) == "forward"
    assert choose_mode(explainer.text, 0, seq=9, embed_dim=32) == "forward"
    assert choose_mode(explainer.image, 0, seq=4096, embed_dim=32) == "reverse"


@pytest.fixture(scope="module")
def by_method(tiny64):
    """{method: {n_steps: Attribution}} for one pair on the tiny model."""
    explainer = make_explainer(tiny64)
    ids, pixels = caption_ids(), random_pixels(dtype=torch.float64)
    return {
        method: {
            n: explainer.explain(ids, pixels, text_layer=1, image_layer=1, method=method, n_steps=n)
            for n in (3, 12, 48)
        }
        for method in METHODS
    }


@pytest.mark.parametrize("method", METHODS)
def test_every_quadrature_method_converges(by_method, method):
    deltas = [abs(by_method[method][n].convergence_delta) for n in (3, 12, 48)]
    assert deltas[0] > deltas[1] > deltas[2]


def test_quadrature_methods_agree_at_high_n_steps(by_method):
    reference = by_method["gausslegendre"][48].interactions
    for method in METHODS:
        got = by_method[method][48].interactions
        assert np.linalg.norm(got - reference) <= 0.05 * np.linalg.norm(reference), method


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_steps", [2, 7])
def test_quadrature_weights_integrate_linear_functions_exactly(method, n_steps):
    alphas, weights = nodes_and_weights(method, n_steps)
    assert alphas.shape == weights.shape == (n_steps,)
    assert np.all((alphas >= 0) & (alphas <= 1))
    assert weights.sum() == pytest.approx(1.0)
    if method in ("riemann_middle", "riemann_trapezoid", "gausslegendre"):
        assert (weights * alphas).sum() == pytest.approx(0.5)  # exact for f(a) = a


def test_riemann_right_is_exclips_rule():
    """exclip: nodes 1, 1 - 1/N, ..., 1/N with weights 1/N (Captum's riemann_right)."""
    alphas, weights = nodes_and_weights("riemann_right", 10)
    np.testing.assert_allclose(np.sort(alphas), np.arange(1, 11) / 10)
    np.testing.assert_allclose(weights, 0.1)
    left, _ = nodes_and_weights("riemann_left", 10)
    np.testing.assert_allclose(left, np.arange(10) / 10)


@pytest.mark.parametrize("bad", [("simpson", 10), ("riemann_trapezoid", 1), ("gausslegendre", 0)])
def test_quadrature_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match="method|n_steps"):
        nodes_and_weights(*bad)


def test_chunking_does_not_change_the_result(tiny64):
    """One tangent per chunk and all tangents in one chunk give the same factors."""
    ids, pixels = caption_ids(), random_pixels(dtype=torch.float64)
    small = make_explainer(tiny64)
    small.budget = ChunkBudget(1)
    large = make_explainer(tiny64)
    large.budget = ChunkBudget(1 << 40)
    a = small.explain(ids, pixels, text_layer=0, image_layer=0, method="gausslegendre", n_steps=3)
    b = large.explain(ids, pixels, text_layer=0, image_layer=0, method="gausslegendre", n_steps=3)
    np.testing.assert_allclose(a.interactions, b.interactions, rtol=1e-10, atol=1e-14)


def test_no_hooks_left_and_model_unchanged(tiny64):
    explainer = make_explainer(tiny64)
    before = {k: v.clone() for k, v in tiny64.state_dict().items()}
    explainer.explain(
        caption_ids(),
        random_pixels(dtype=torch.float64),
        text_layer=1,
        image_layer=1,
        method="riemann_right",
        n_steps=3,
    )
    for module in tiny64.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    for k, v in tiny64.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not tiny64.training


def test_non_finite_results_are_errors():
    model = seeded_model(TINY).requires_grad_(False)
    model.visual.proj[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="not finite"):
        make_explainer(model).explain(
            caption_ids(), random_pixels(), text_layer=1, image_layer=1, method="riemann_right", n_steps=2
        )


def _register_variant(tmp_path, name: str, changes: dict) -> str:
    """Register a copy of the tiny config with ``changes`` (sections merged) as architecture ``name``."""
    config = copy.deepcopy(open_clip.get_model_config(TINY))
    for key, value in changes.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return name


@pytest.mark.parametrize(
    "variant, changes",
    [
        ("custom-text", {"custom_text": True}),
        ("attn-pool", {"vision_cfg": {"attentional_pool": True}}),
        ("first-pool", {"text_cfg": {"pool_type": "first"}}),
    ],
)
def test_variants_off_the_fast_path_load_and_explain(tmp_path, variant, changes):
    """Towers the fast path does not cover load and are explained by the generic path."""
    name = _register_variant(tmp_path, f"tiny-{variant}", changes)
    spec = ModelSpec(name="variant", architecture=name, pretrained="random:0")
    loaded = load_model(spec, device=torch.device("cpu"), dtype="float32", memory_bytes=1 << 20)
    got = loaded.explainer.explain(
        caption_ids(), random_pixels(), text_layer=1, image_layer=1, method="riemann_right", n_steps=2
    )
    assert np.isfinite(got.interactions).all()


def test_a_tower_without_one_embedding_is_refused_naming_model_and_reason(tmp_path):
    name = _register_variant(tmp_path, "tiny-no-pool", {"text_cfg": {"pool_type": "none"}})
    spec = ModelSpec(name="variant", architecture=name, pretrained="random:0")
    with pytest.raises(ModelLoadError, match="'variant'.*cannot be explained.*pool_type"):
        load_model(spec, device=torch.device("cpu"), dtype="float32", memory_bytes=1 << 20)


def test_missing_weights_file_names_model_and_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    spec = ModelSpec(name="b32", architecture="ViT-B-32", pretrained=str(missing))
    with pytest.raises(ModelLoadError, match=f"'b32'.*{missing}"):
        load_model(spec, device=torch.device("cpu"), dtype="float32", memory_bytes=1 << 20)


def test_unknown_architecture_is_refused():
    spec = ModelSpec(name="x", architecture="ViT-Q-99", pretrained="random:0")
    with pytest.raises(ModelLoadError, match="unknown open_clip architecture 'ViT-Q-99'"):
        load_model(spec, device=torch.device("cpu"), dtype="float32", memory_bytes=1 << 20)


@pytest.mark.parametrize("text", ["b32", "b32=ViT-B-32", "=ViT-B-32:openai", "b32=:openai", "b32=ViT-B-32:"])
def test_model_spec_rejects_malformed_entries(text):
    with pytest.raises(ValueError, match="NAME=ARCH:PRETRAINED"):
        ModelSpec.parse(text)


def test_model_spec_parses_tags_paths_and_seeds():
    assert ModelSpec.parse("b32=ViT-B-32:openai") == ModelSpec("b32", "ViT-B-32", "openai")
    assert ModelSpec.parse("w=ViT-B-16:/w/a:b.pt").pretrained == "/w/a:b.pt"
    assert ModelSpec.parse("r=ViT-B-32:random:7").random_seed == 7
    assert ModelSpec.parse("r=ViT-B-32:random").random_seed == 0
    assert ModelSpec.parse("b32=ViT-B-32:openai").random_seed is None


def test_model_spec_takes_default_settings_as_trailing_options():
    spec = ModelSpec.parse(
        "s=shapes-ViT:/w/a,b.safetensors,image_layer=0,method=riemann_trapezoid,text_layer=2,n_steps=8"
    )
    assert (spec.pretrained, spec.text_layer, spec.image_layer) == ("/w/a,b.safetensors", 2, 0)
    assert (spec.n_steps, spec.method) == (8, "riemann_trapezoid")
    plain = ModelSpec.parse("r=ViT-B-32:random:7,text_layer=0")
    assert plain == ModelSpec("r", "ViT-B-32", "random:7", text_layer=0)
    assert (plain.n_steps, plain.method) == (None, None)  # the family's, once the model is loaded
    assert ModelSpec.parse("w=ViT-B-32:/w/a,b=c/d.pt").pretrained == "/w/a,b=c/d.pt"


@pytest.mark.parametrize(
    "text, message",
    [
        ("r=ViT-B-32:random,text_layer=0,text_layer=1", "option text_layer is given twice"),
        ("r=ViT-B-32:random,nsteps=8", "unknown option 'nsteps'; options are text_layer, image_layer, n_steps, method"),
        ("r=ViT-B-32:random,n_steps=three", "n_steps must be a non-negative integer; got 'three'"),
        ("r=ViT-B-32:random,text_layer=-1", "text_layer must be a non-negative integer; got '-1'"),
        ("r=ViT-B-32:random,method=simpson", "method must be one of riemann_right, .*; got 'simpson'"),
        ("r=ViT-B-32:random,method=riemann_trapezoid,n_steps=1", "n_steps must be >= 2 for method riemann_trapezoid"),
        # no method given: the family's comes later, so the message names none
        ("r=ViT-B-32:random,n_steps=0", "^n_steps must be >= 1; got 0$"),
        ("r=ViT-B-32:,image_layer=0", "NAME=ARCH:PRETRAINED"),
        ("r=ViT-B-32:random,instances=0", "instances must be a positive integer; got 0"),
        ("r=ViT-B-32:random,device=tpu", "device must be auto, cpu, cuda or cuda:INDEX; got 'tpu'"),
    ],
)
def test_model_spec_refuses_bad_options(text, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec.parse(text)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("dtype, tolerance", [("float16", 1e-2), ("bfloat16", 6e-2)])
def test_half_precision_models_agree_with_float32(dtype, tolerance):
    """Weights and activations in half precision, path sums accumulated in float32."""
    ids, pixels = caption_ids(), random_pixels()
    results = {}
    for name in ("float32", dtype):
        loaded = load_model(
            ModelSpec("t", TINY, "random:0"), device=torch.device("cpu"), dtype=name, memory_bytes=1 << 20
        )
        assert loaded.explainer.dtype == getattr(torch, name)
        results[name] = loaded.explainer.explain(
            ids, pixels, text_layer=1, image_layer=1, method="gausslegendre", n_steps=3
        )
    want, got = results["float32"].interactions, results[dtype].interactions
    assert got.dtype == np.float64 and np.isfinite(got).all()
    assert np.linalg.norm(got - want) <= tolerance * np.linalg.norm(want)
