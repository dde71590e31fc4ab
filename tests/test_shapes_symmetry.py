"""The dihedral tie of the shapes image tower: mirrors and quarter turns commute with it."""

from __future__ import annotations

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from explain_server.shapes import model as shapes_model
from explain_server.shapes import symmetry, training

pytestmark = pytest.mark.unit


def _is_tied(state: dict[str, torch.Tensor]) -> bool:
    # Tied up to rounding: the mean of an orbit's values is summed in a different order at each
    # of its members, and float16 storage rounds again.
    kernels = state["visual.conv1.weight"].float()
    grid = state["visual.positional_embedding"][1:].float().T.reshape(-1, 8, 8)
    return all(
        torch.allclose(t, x, rtol=0, atol=1e-3 * x.abs().max())
        for x in (kernels, grid)
        for t in symmetry.dihedral_images(x)
    )


def test_a_tied_image_tower_embeds_every_mirror_and_quarter_turn_alike():
    model = training.build_model(0)
    symmetry.tie(model)
    model.eval()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        embeddings = [model.encode_image(x) for x in symmetry.dihedral_images(images)]
    for other in embeddings[1:]:
        torch.testing.assert_close(other, embeddings[0], rtol=0, atol=1e-5)
    untied = training.build_model(0).eval()
    with torch.no_grad():
        assert (untied.encode_image(images.flip(-1)) - untied.encode_image(images)).abs().max() > 0.01


def test_untie_and_plain_state_dict_give_the_tied_values_under_open_clip_names():
    model = training.build_model(0)
    symmetry.tie(model)
    plain = symmetry.plain_state_dict(model)
    untied = training.build_model(0).state_dict()
    assert set(plain) == set(untied)
    assert _is_tied(plain) and not _is_tied(untied)
    symmetry.untie(model)
    state = model.state_dict()
    assert set(state) == set(plain) and all(torch.equal(state[k], plain[k]) for k in plain)


def test_tie_refuses_a_grid_that_is_not_square():
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_image_size=(224, 160))
    with pytest.raises(ValueError, match="square"):
        symmetry.tie(model)


def test_the_shipped_weights_are_tied():
    assert _is_tied(load_file(str(shapes_model.WEIGHTS)))
