"""Generated load inputs (explain_client.workload)."""

from __future__ import annotations

import collections
import io
import itertools

import numpy as np
import open_clip
import pytest
from PIL import Image

from explain_client.workload import SIDES, WORDS, distinct_captions, distinct_images, distinct_requests, load_photos

TOKENIZER = open_clip.get_tokenizer("ViT-B-32")


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def roughness(image: Image.Image) -> float:
    """Mean absolute difference of horizontally adjacent grey levels: about 57 for RGB noise."""
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    return float(np.abs(np.diff(gray, axis=1)).mean())


@pytest.fixture(scope="module")
def pairs() -> list[tuple[bytes, str]]:
    return list(distinct_requests(120, seed=3))


def test_no_image_and_no_caption_repeats(pairs):
    images, captions = zip(*pairs)
    assert len(set(images)) == len(images) == 120
    assert len(set(captions)) == len(captions)


def test_images_are_photo_like_in_several_sizes_and_formats(pairs):
    images = [decoded(data) for data, _ in pairs]
    assert collections.Counter(image.format for image in images).keys() == {"JPEG", "PNG"}
    sides = np.array([image.size for image in images])
    assert sides.min() >= SIDES[0] and sides.max() <= SIDES[1]
    assert sides.min() < 200 and sides.max() > 600  # small and large ones
    aspects = sides[:, 0] / sides[:, 1]
    assert aspects.min() < 0.8 and aspects.max() > 1.25 and ((0.5 <= aspects) & (aspects <= 2)).all()
    assert all(image.mode == "RGB" for image in images)
    assert max(roughness(image) for image in images) < 30  # noise: about 57; photos: a few units


def test_images_are_cut_from_the_given_photos():
    grey = Image.new("RGB", (300, 200), (90, 90, 90))
    for data in itertools.islice(distinct_images(1, photos=[grey], sides=(64, 96)), 10):
        pixels = np.asarray(decoded(data), dtype=np.int16)
        # a grey photo stays grey through crops, mirroring and colour jitter (up to JPEG rounding)
        assert np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max() <= 3


def test_the_same_seed_gives_the_same_inputs_and_another_seed_others(pairs):
    assert list(distinct_requests(5, seed=3)) == pairs[:5]
    other = list(distinct_requests(5, seed=4))
    assert not {image for image, _ in other} & {image for image, _ in pairs}


def test_captions_vary_in_length_and_fit_the_clip_context():
    captions = list(itertools.islice(distinct_captions(5), 600))
    lengths = collections.Counter(len(text.split()) for text in captions)
    assert set(lengths) == set(range(WORDS[0], WORDS[1] + 1))
    for text in captions:
        # every word is one token: 30 words and the start and end tokens fit CLIP's 77
        assert len(TOKENIZER.encode(text)) == len(text.split())


def test_short_captions_never_repeat_once_used_up():
    """Only so many one-word captions exist: when they are used up, longer ones follow."""
    captions = list(itertools.islice(distinct_captions(0, words=(1, 4)), 3000))
    assert len(set(captions)) == 3000
    assert all(1 <= len(text.split()) <= 4 for text in captions)


@pytest.mark.parametrize("words", [(0, 5), (5, 4), (1, 3)])
def test_caption_ranges_with_too_few_captions_are_refused(words):
    with pytest.raises(ValueError, match="words must be"):
        next(distinct_captions(0, words=words))


def test_shipped_photos_load():
    photos = load_photos()
    assert len(photos) == 2 and all(photo.mode == "RGB" and min(photo.size) >= 300 for photo in photos)
