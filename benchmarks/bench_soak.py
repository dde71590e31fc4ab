"""`make bench` (soak): 2,000 sequential requests against one server; does anything grow?

20 noise images of varied sizes and 20 captions of varied length, cycled, on the tiny test
architecture (tests/data/tiny-ViT.json, seeded random weights) so that 2,000 requests take
minutes, not hours: a leak per request shows the same on any model. Reports the server's RSS
after request 100 and at the end, and the p50 latency of requests 100-200 against the last 100.

``--record FILE`` replaces this benchmark's section in FILE (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import io
import pathlib
import statistics
import sys
import time

import numpy as np
from bench_engine import Server, record, rss_bytes
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "tests" / "data" / "tiny-ViT.json"
BEGIN, END = "<!-- BEGIN bench_soak -->", "<!-- END bench_soak -->"
WORDS = "a red circle and a small blue square next to green triangles on a wooden table in the morning light".split()


def inputs(count: int = 20) -> tuple[list[bytes], list[str]]:
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        array = rng.integers(0, 256, size=(48 + 16 * i, 300 - 8 * i, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(array).save(out, format="PNG")
        images.append(out.getvalue())
    captions = [" ".join(WORDS[: 2 + i % len(WORDS)]) for i in range(count)]
    return images, captions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--record", type=pathlib.Path, help="markdown file whose section to replace")
    args = parser.parse_args()
    # cache off: the 400 pairs repeat, and cache hits would hide the engine's own growth
    # One torch thread: the client shares the two cores, and OpenMP workers spinning at barriers
    # while the client runs make latency jump between runs by more than the drift looked for.
    server = Server(
        [
            "--model-config",
            str(TINY_CONFIG),
            "--model",
            "tiny=tiny-ViT:random:0",
            "--factor-cache-mb",
            "0",
            "--intra-op-threads",
            "1",
        ]
    )
    images, captions = inputs()
    latencies, rss = [], {}
    try:
        for i in range(args.requests):
            start = time.perf_counter()
            server.client.explain(images[i % len(images)], captions[(i * 7) % len(captions)])
            latencies.append(time.perf_counter() - start)
            if i + 1 in (100, args.requests):
                rss[i + 1] = rss_bytes(server.process.pid, "VmRSS")
    finally:
        server.close()
    growth = rss[args.requests] / rss[100] - 1
    early, late = statistics.median(latencies[100:200]), statistics.median(latencies[-100:])
    body = "\n".join(
        [
            "## Soak: 2,000 sequential requests (issue 4)",
            "",
            f"`benchmarks/bench_soak.py`, {time.strftime('%Y-%m-%d')}: {args.requests} sequential requests cycling 20 images "
            "(48-352 px high) and 20 captions (2-19 words) on the tiny test architecture; server with "
            "`--intra-op-threads 1 --factor-cache-mb 0`.",
            "",
            "| server RSS after 100 | after the last | growth | p50 requests 100-200 | p50 last 100 | change |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {rss[100] / 2**20:.0f} MiB | {rss[args.requests] / 2**20:.0f} MiB | {growth:+.1%} "
            f"| {early * 1000:.1f} ms | {late * 1000:.1f} ms | {late / early - 1:+.1%} |",
        ]
    )
    print(body)
    if args.record:
        record(args.record, body, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
