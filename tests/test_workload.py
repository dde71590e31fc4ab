"""Generated load inputs (explain_client.workload), and the parts of explain-loadgen that need no server."""

from __future__ import annotations

import asyncio
import collections
import io
import itertools

import numpy as np
import open_clip
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from explain_client.client import explain_request
from explain_client.loadgen import (
    PREFETCH,
    build_parser,
    build_requests,
    default_metrics_url,
    factor_cache_counts,
    generate_load,
)
from explain_client.workload import SIDES, WORDS, distinct_captions, distinct_images, distinct_requests, load_photos
from explain_server.launcher import free_port

pytestmark = pytest.mark.unit

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


def test_loadgen_sends_a_new_image_and_caption_with_every_request_by_default():
    args = build_parser().parse_args(["--requests", "40", "--model", "tiny", "--n-steps", "2"])
    requests = list(itertools.islice(build_requests(args, seed=9), 40))
    assert len({r.image for r in requests}) == 40 and len({r.caption for r in requests}) == 40
    assert {r.model for r in requests} == {"tiny"} and {r.n_steps for r in requests} == {2}
    assert {decoded(r.image).format for r in requests} == {"JPEG", "PNG"}


def test_loadgen_repeat_inputs_cycles_a_fixed_mix(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (70, 50), (10, 200, 30)).save(path)
    args = build_parser().parse_args(["--requests", "10", "--repeat-inputs"])
    mix = build_requests(args, seed=9)
    assert len(mix) == 80 and len({r.image for r in mix}) == 8 and len({r.caption for r in mix}) == 10
    given = build_parser().parse_args(["--requests", "10", "--repeat-inputs", "--image", str(path), "--caption", "a"])
    assert [(r.image, r.caption) for r in build_requests(given, seed=9)] == [(path.read_bytes(), "a")]


def test_loadgen_cuts_its_images_from_the_photos_given(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("RGB", (300, 200), (90, 90, 90)).save(path)
    args = build_parser().parse_args(["--requests", "5", "--image", str(path), "--caption", "a cat"])
    requests = list(itertools.islice(build_requests(args, seed=2), 5))
    assert len({r.image for r in requests}) == 5 and {r.caption for r in requests} == {"a cat"}
    assert all(roughness(decoded(r.image)) < 1 for r in requests)


def test_factor_cache_counts_agree_with_prometheus_clients_parser():
    """On a page prometheus-client writes, as the server does: two models, one with a name that
    needs escaping, and the _created samples and other series a page holds."""
    registry = CollectorRegistry()
    counters = {
        (side, outcome): Counter(f"explain_{side}_factor_cache_{outcome}", "lookups", ["model"], registry=registry)
        for side in ("text", "image")
        for outcome in ("hits", "misses")
    }
    Counter("explain_requests", "calls", ["model", "code"], registry=registry).labels("tiny", "OK").inc(5)
    rng = np.random.default_rng(0)
    for model in ("tiny", 'od}d "name", with\\ escapes'):
        for counter in counters.values():
            counter.labels(model).inc(float(rng.integers(0, 1000)))
    page = generate_latest(registry).decode()
    want = collections.Counter()
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name.endswith("_factor_cache_hits_total") or sample.name.endswith("_factor_cache_misses_total"):
                side, outcome = sample.name.split("_")[1], sample.name.split("_")[4]
                want[f"{side}_{outcome}"] += sample.value
    assert factor_cache_counts(page) == dict(want) and len(want) == 4


def test_the_metrics_url_follows_a_host_port_target():
    assert default_metrics_url("localhost:50051") == "http://localhost:9090/metrics"
    assert default_metrics_url("10.0.0.7:8443") == "http://10.0.0.7:9090/metrics"
    assert default_metrics_url("[::1]:50051") == "http://[::1]:9090/metrics"
    # forms that may name several servers, or none over TCP
    for target in ("dns:///explain:50051", "ipv4:10.0.0.1:50051,10.0.0.2:50051", "unix:/run/explain.sock", "localhost"):
        assert default_metrics_url(target) is None


def test_a_failing_request_source_ends_the_run_with_its_error():
    """After the requests drawn ahead, the generator fails: the run raises, rather than wait."""

    def requests():
        for _ in range(PREFETCH + 5):
            yield explain_request(b"not sent anywhere", "a cat")
        raise RuntimeError("the generator broke")

    with pytest.raises(RuntimeError, match="the generator broke"):  # nothing listens on the port
        asyncio.run(generate_load(f"127.0.0.1:{free_port()}", requests(), concurrency=2, duration=60))
