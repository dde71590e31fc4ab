"""``explain-loadgen``: a closed-loop load generator for the Explain service (asyncio, grpc.aio).

``--concurrency`` callers each send their next request as soon as the previous one is
answered, for ``--requests`` requests in all or for ``--duration`` seconds, cycling through a
mix of images and captions. The report gives throughput, latency percentiles of successful
calls and counts by gRPC status code, as text and optionally JSON. (ghz is the usual tool for
this; it cannot be installed everywhere this runs.)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import grpc
import numpy as np
from PIL import Image

from explain_client._proto import explain_pb2, explain_pb2_grpc
from explain_client.client import DEFAULT_MAX_RECEIVE_MESSAGE_BYTES, DEFAULT_MAX_SEND_MESSAGE_BYTES, explain_request

__all__ = ["LoadReport", "build_parser", "main", "run"]

CAPTIONS = (
    "a cat",
    "a dog on a sofa",
    "a red circle and a blue square",
    "two people walking along a beach at sunset",
    "a bowl of fruit on a wooden kitchen table next to a window",
    "a small green triangle",
    "a city street at night with cars, lights and tall buildings on both sides",
    "an empty room",
    "a yellow bus",
    "a child flying a kite in a park on a windy afternoon",
)


@dataclass(frozen=True)
class LoadReport:
    """What a load run measured.

    Attributes:
        requests: calls completed (any status).
        duration_seconds: wall time of the run, seconds.
        throughput_per_second: completed calls per second.
        ok_per_second: successful calls per second.
        latency_seconds: p50, p90, p99, mean and max latency of successful calls, seconds.
        codes: count of calls by final gRPC status code name, e.g. {"OK": 98, "RESOURCE_EXHAUSTED": 2}.
        concurrency: callers sending at once.
    """

    requests: int
    duration_seconds: float
    throughput_per_second: float
    ok_per_second: float
    latency_seconds: dict[str, float]
    codes: dict[str, int]
    concurrency: int

    def text(self) -> str:
        """A human-readable summary."""
        lat = self.latency_seconds
        codes = ", ".join(f"{code} {count}" for code, count in sorted(self.codes.items()))
        return (
            f"{self.requests} requests in {self.duration_seconds:.2f} s at concurrency {self.concurrency}: "
            f"{self.throughput_per_second:.2f} req/s ({self.ok_per_second:.2f} OK/s)\n"
            f"latency of OK calls: p50 {lat['p50'] * 1000:.1f} ms, p90 {lat['p90'] * 1000:.1f} ms, "
            f"p99 {lat['p99'] * 1000:.1f} ms, max {lat['max'] * 1000:.1f} ms\n"
            f"status codes: {codes}"
        )


def synthetic_images(count: int = 8, seed: int = 0, sides: tuple[int, int] = (64, 640)) -> list[bytes]:
    """``count`` random-noise PNGs, each side drawn from ``sides`` (pixels, inclusive), deterministic by ``seed``."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        width, height = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, "PNG")
        images.append(out.getvalue())
    return images


async def run(
    target: str,
    requests: list[explain_pb2.ExplainRequest],
    *,
    concurrency: int,
    total: int | None = None,
    duration: float | None = None,
    deadline: float | None = None,
    token: str | None = None,
) -> LoadReport:
    """Send ``requests`` round-robin from ``concurrency`` callers until ``total`` are done or ``duration`` passes.

    Args:
        target: gRPC target, e.g. ``localhost:50051`` or ``dns:///explain:50051``.
        requests: the mix to cycle through.
        concurrency: callers sending at once (each waits for its answer before sending again).
        total: requests in all; ``None`` = until ``duration``.
        duration: seconds to run; ``None`` = until ``total``.
        deadline: per-call deadline, seconds; ``None`` = none.
        token: bearer token, if the server requires one.

    Raises:
        ValueError: neither ``total`` nor ``duration`` given, or nothing to send.
    """
    if total is None and duration is None:
        raise ValueError("give a request count or a duration")
    if not requests:
        raise ValueError("no requests to send")
    options = [
        ("grpc.max_send_message_length", DEFAULT_MAX_SEND_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", DEFAULT_MAX_RECEIVE_MESSAGE_BYTES),
    ]
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    latencies: list[float] = []
    codes: collections.Counter[str] = collections.Counter()
    issued = 0
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = explain_pb2_grpc.ExplainStub(channel)
        start = time.perf_counter()
        stop_at = None if duration is None else start + duration

        async def caller() -> None:
            nonlocal issued
            while (total is None or issued < total) and (stop_at is None or time.perf_counter() < stop_at):
                request = requests[issued % len(requests)]
                issued += 1
                sent = time.perf_counter()
                try:
                    await stub.Explain(request, timeout=deadline, metadata=metadata)
                    latencies.append(time.perf_counter() - sent)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    codes[err.code().name] += 1

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    done = sum(codes.values())
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    return LoadReport(
        requests=done,
        duration_seconds=elapsed,
        throughput_per_second=done / elapsed,
        ok_per_second=codes["OK"] / elapsed,
        latency_seconds={
            "p50": float(np.percentile(lat, 50)),
            "p90": float(np.percentile(lat, 90)),
            "p99": float(np.percentile(lat, 99)),
            "mean": float(lat.mean()),
            "max": float(lat.max()),
        },
        codes=dict(codes),
        concurrency=concurrency,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``explain-loadgen``."""
    p = argparse.ArgumentParser(prog="explain-loadgen", description=__doc__.splitlines()[0])
    p.add_argument("--target", default="localhost:50051", help="gRPC target (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=4, help="callers sending at once (default: %(default)s)")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--requests", type=int, help="requests to send in all")
    amount.add_argument("--duration", type=float, help="seconds to run")
    p.add_argument("--image", action="append", dest="images", metavar="PATH",
                   help="an image file to send (repeatable; default: 8 synthetic noise images of varied sizes)")
    p.add_argument("--image-sides", type=int, nargs=2, default=(64, 640), metavar=("MIN", "MAX"),
                   help="side range of the synthetic images, pixels (default: 64 640)")
    p.add_argument("--caption", action="append", dest="captions", metavar="TEXT",
                   help=f"a caption to send (repeatable; default: {len(CAPTIONS)} built-in captions of varied length)")
    p.add_argument("--deadline", type=float, help="per-call deadline, seconds (default: none)")
    p.add_argument("--model", help="hosted model name (default: the server's default)")
    p.add_argument("--n-steps", type=int, help="quadrature nodes (default: the model's)")
    p.add_argument("--method", help="quadrature rule (default: the model's)")
    p.add_argument("--token", help="bearer token (default: $EXPLAIN_TOKEN)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' = stdout)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``explain-loadgen``; returns 0 when every call succeeded, 1 otherwise (2: bad arguments)."""
    args = build_parser().parse_args(argv)
    if args.concurrency < 1 or (args.requests is not None and args.requests < 1):
        print("explain-loadgen: --concurrency and --requests must be positive", file=sys.stderr)
        return 2
    images = [open(path, "rb").read() for path in args.images] if args.images else synthetic_images(sides=tuple(args.image_sides))
    captions = args.captions or list(CAPTIONS)
    # pairs cycle through both lists at different strides, so the mix covers many combinations
    mix = [
        explain_request(images[i % len(images)], captions[(i * 7) % len(captions)], model=args.model,
                        n_steps=args.n_steps, method=args.method)
        for i in range(len(images) * len(captions))
    ]
    report = asyncio.run(run(
        args.target, mix, concurrency=args.concurrency, total=args.requests, duration=args.duration,
        deadline=args.deadline, token=args.token or os.environ.get("EXPLAIN_TOKEN"),
    ))
    print(report.text())
    if args.json:
        text = json.dumps(asdict(report), indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0 if set(report.codes) == {"OK"} else 1


if __name__ == "__main__":
    sys.exit(main())
