"""``explain-loadgen``: a closed-loop load generator for the Explain service (asyncio, grpc.aio).

``--concurrency`` callers each send their next request as soon as the previous one is
answered, for ``--requests`` requests in all or for ``--duration`` seconds. By default every
request carries a new photo-like image and a new caption (:mod:`explain_client.workload`), as
production traffic does, so the server's factor cache never answers and the load measures
compute; ``--repeat-inputs`` cycles a fixed mix instead, which the cache answers. The report
gives throughput, latency percentiles of successful calls, counts by gRPC status code and,
when the server's /metrics page is reachable, its factor cache hit ratio over the run, as text
and optionally JSON. (ghz is the usual tool for this; it cannot be installed everywhere this
runs.)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import re
import secrets
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import grpc
import numpy as np

from explain_api import explain_pb2, explain_pb2_grpc
from explain_api.version import add_version_argument
from explain_client.cli import add_credential_arguments, connection_credentials, positive_float
from explain_client.client import (
    DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
    DEFAULT_MAX_SEND_MESSAGE_BYTES,
    bearer_metadata,
    explain_request,
    warn_if_plaintext_token,
)
from explain_client.workload import SIDES, distinct_captions, distinct_images, load_photos

__all__ = [
    "LoadReport",
    "build_parser",
    "build_requests",
    "default_metrics_url",
    "factor_cache_counts",
    "generate_load",
    "main",
]

# Requests generated ahead of the callers: enough that a burst of answers never waits for the
# generator, few enough that photo-sized images stay a few MiB.
PREFETCH = 64
# The server's default --metrics-port.
METRICS_PORT = 9090
# A Prometheus text-format sample of the factor cache counters: name, optional labels (quoted
# values may hold any character, escaped), value.
_CACHE_SAMPLE = re.compile(
    r'^explain_(text|image)_factor_cache_(hits|misses)_total(?:\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?[ \t]+(\S+)'
)


# Distinct server messages kept per failing status code.
_MESSAGES = 3


@dataclass(frozen=True)
class LoadReport:
    """What a load run measured.

    Attributes:
        requests: calls completed (any status).
        duration_seconds: wall time of the run, seconds.
        throughput_per_second: completed calls per second.
        ok_per_second: successful calls per second.
        latency_seconds: p50, p90, p99, mean and max latency of successful calls, seconds;
            empty when no call succeeded.
        codes: count of calls by final gRPC status code name, e.g. {"OK": 98, "RESOURCE_EXHAUSTED": 2}.
        concurrency: callers sending at once.
        input_wait_seconds: time callers spent waiting for the next request to be generated,
            summed over callers; near 0 unless the generator, not the server, limited the load.
        factor_cache: the server's factor cache lookups during the run, from its /metrics page
            (all models; other clients' calls count too): ``{"url": ..., "text": {"hits",
            "misses", "hit_ratio"}, "image": {...}, "hit_ratio": text and image together}``,
            a ratio None when there was no lookup; None when no page was read.
        inputs: "distinct" (a new image and caption per request) or "repeated" (a fixed mix
            cycled); set by :func:`main`.
        seed: the seed of the generated images and captions; set by :func:`main`.
        notes: remarks on the run, e.g. why the server's metrics were not read.
        messages: per failing status code, the first distinct messages the server gave (at most
            :data:`_MESSAGES` each), so that a report says why calls failed.
    """

    requests: int
    duration_seconds: float
    throughput_per_second: float
    ok_per_second: float
    latency_seconds: dict[str, float]
    codes: dict[str, int]
    concurrency: int
    input_wait_seconds: float = 0.0
    factor_cache: dict[str, Any] | None = None
    inputs: str | None = None
    seed: int | None = None
    notes: tuple[str, ...] = ()
    messages: dict[str, tuple[str, ...]] | None = None

    def text(self) -> str:
        """A human-readable summary."""
        lat = self.latency_seconds
        codes = ", ".join(f"{code} {count}" for code, count in sorted(self.codes.items()))
        lines = [
            f"{self.requests} requests in {self.duration_seconds:.2f} s at concurrency {self.concurrency}: "
            f"{self.throughput_per_second:.2f} req/s ({self.ok_per_second:.2f} OK/s)",
            f"latency of OK calls: p50 {lat['p50'] * 1000:.1f} ms, p90 {lat['p90'] * 1000:.1f} ms, "
            f"p99 {lat['p99'] * 1000:.1f} ms, max {lat['max'] * 1000:.1f} ms"
            if lat
            else "latency: no call succeeded",
            f"status codes: {codes}",
            *(f"  {code}: {message}" for code, kept in sorted((self.messages or {}).items()) for message in kept),
        ]
        if self.inputs:
            lines.append(f"inputs: {self.inputs}, seed {self.seed}")
        if self.factor_cache:
            cache = self.factor_cache
            sides = ", ".join(
                f"{side} {cache[side]['hits']:g} of {cache[side]['hits'] + cache[side]['misses']:g}"
                for side in ("text", "image")
            )
            lines.append(
                f"server factor cache, this run's lookups: hit ratio {_percent(cache['hit_ratio'])} "
                f"(hits: {sides}; {cache['url']})"
            )
        busy = self.concurrency * self.duration_seconds
        if busy and self.input_wait_seconds > 0.01 * busy:
            lines.append(
                f"note: callers waited for new inputs {self.input_wait_seconds / busy:.0%} of the time: generating "
                "them, not the server, limited the load (generate on a faster machine, or --repeat-inputs)"
            )
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _percent(ratio: float | None) -> str:
    return "n/a (no lookups)" if ratio is None else f"{ratio:.1%}"


def default_metrics_url(target: str) -> str | None:
    """``http://HOST:9090/metrics`` (the server's default metrics port) for a ``HOST:PORT``
    target; None for other target forms (``dns:///``, ``ipv4:``, ``unix:``, ...), which may
    name several servers."""
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):\d+", target)
    return f"http://{match.group(1)}:{METRICS_PORT}/metrics" if match else None


def factor_cache_counts(metrics_text: str) -> dict[str, float]:
    """The factor cache counters of a Prometheus text-format page, summed over models.

    The thin client does not depend on prometheus-client for these four counters; the tests
    check this against its parser on a real server's page.

    Returns:
        ``{"text_hits", "text_misses", "image_hits", "image_misses"}``; 0 for a counter the
        page lacks.
    """
    counts = dict.fromkeys(("text_hits", "text_misses", "image_hits", "image_misses"), 0.0)
    for line in metrics_text.splitlines():
        if match := _CACHE_SAMPLE.match(line):
            counts[f"{match.group(1)}_{match.group(2)}"] += float(match.group(3))
    return counts


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return factor_cache_counts(response.read().decode("utf-8", errors="replace"))


def _hit_ratios(url: str, before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    def side(hits: float, misses: float) -> dict[str, Any]:
        return {"hits": hits, "misses": misses, "hit_ratio": hits / (hits + misses) if hits + misses else None}

    added = {key: after[key] - before[key] for key in after}
    text, image = (side(added[f"{tower}_hits"], added[f"{tower}_misses"]) for tower in ("text", "image"))
    both = side(text["hits"] + image["hits"], text["misses"] + image["misses"])
    return {"url": url, "text": text, "image": image, "hit_ratio": both["hit_ratio"]}


async def generate_load(
    target: str,
    requests: Sequence[explain_pb2.ExplainRequest] | Iterable[explain_pb2.ExplainRequest],
    *,
    concurrency: int,
    total: int | None = None,
    duration: float | None = None,
    deadline: float | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    metrics_url: str | None = None,
) -> LoadReport:
    """Send requests from ``concurrency`` callers until ``total`` are done, ``duration`` passes,
    or the requests run out.

    Args:
        target: gRPC target, e.g. ``localhost:50051`` or ``dns:///explain:50051``.
        requests: a sequence (list, tuple) is a fixed mix, cycled round-robin; any other
            iterable is consumed once, each request sent once, and may be lazy (a generator).
            A background thread keeps up to :data:`PREFETCH` requests ready for the callers;
            the first ones are drawn before the clock starts.
        concurrency: callers sending at once (each waits for its answer before sending again).
        total: requests in all; ``None`` = until ``duration`` or the end of ``requests``.
        duration: seconds to run; ``None`` = until ``total`` or the end of ``requests``.
        deadline: per-call deadline, seconds; ``None`` = none.
        credentials: channel credentials for TLS (:func:`explain_client.tls_credentials`);
            ``None`` = plaintext.
        token: bearer token, if the server requires one; sent without ``credentials`` to a
            server off this machine, a :class:`~explain_client.client.PlaintextTokenWarning`.
        metrics_url: the server's /metrics page, read before and after the run for its factor
            cache hit ratio (:attr:`LoadReport.factor_cache`); unreadable, a note says why.

    Raises:
        ValueError: neither ``total`` nor ``duration`` given, or an empty sequence.
    """
    if total is None and duration is None:
        raise ValueError("give a request count or a duration")
    if isinstance(requests, Sequence):
        if not requests:
            raise ValueError("no requests to send")
        requests = itertools.cycle(requests)
    source = iter(requests) if total is None else itertools.islice(requests, total)
    ahead: asyncio.Queue[explain_pb2.ExplainRequest | Exception | None] = asyncio.Queue(PREFETCH)
    for request in itertools.islice(source, PREFETCH):
        ahead.put_nowait(request)
    options = [
        ("grpc.max_send_message_length", DEFAULT_MAX_SEND_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", DEFAULT_MAX_RECEIVE_MESSAGE_BYTES),
    ]
    metadata = bearer_metadata(token)
    warn_if_plaintext_token(target, credentials, token)
    latencies: list[float] = []
    codes: collections.Counter[str] = collections.Counter()
    messages: dict[str, list[str]] = {}
    waited = 0.0
    notes: list[str] = []
    before = None
    if metrics_url:
        try:
            before = _scrape(metrics_url)
        except (OSError, ValueError) as err:  # URLError and HTTPError are OSErrors
            notes.append(f"the server's factor cache hit ratio is not reported: {metrics_url}: {err}")

    async def produce() -> None:
        # one thread draws from the iterator at a time: generators cannot run concurrently
        try:
            while (request := await asyncio.to_thread(next, source, None)) is not None:
                await ahead.put(request)
        except Exception as err:  # the callers raise it, rather than wait for requests forever
            await ahead.put(err)
        else:
            await ahead.put(None)  # the end

    if credentials is None:
        channel = grpc.aio.insecure_channel(target, options=options)
    else:
        channel = grpc.aio.secure_channel(target, credentials, options=options)
    async with channel:
        stub = explain_pb2_grpc.ExplainStub(channel)
        producer = asyncio.create_task(produce())
        start = time.perf_counter()
        stop_at = None if duration is None else start + duration

        async def caller() -> None:
            nonlocal waited
            while stop_at is None or time.perf_counter() < stop_at:
                asked = time.perf_counter()
                request = await ahead.get()
                waited += time.perf_counter() - asked
                if request is None or isinstance(request, Exception):
                    ahead.put_nowait(request)  # for the next caller
                    if request is None:
                        return
                    raise request
                sent = time.perf_counter()
                try:
                    await stub.Explain(request, timeout=deadline, metadata=metadata)
                    latencies.append(time.perf_counter() - sent)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    codes[err.code().name] += 1
                    kept = messages.setdefault(err.code().name, [])
                    if len(kept) < _MESSAGES and err.details() not in kept:
                        kept.append(err.details())

        try:
            await asyncio.gather(*(caller() for _ in range(concurrency)))
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
        elapsed = time.perf_counter() - start
    factor_cache = None
    if before is not None:
        try:
            factor_cache = _hit_ratios(metrics_url, before, _scrape(metrics_url))
        except (OSError, ValueError) as err:
            notes.append(f"the server's factor cache hit ratio is not reported: {metrics_url}: {err}")
    done = sum(codes.values())
    lat = np.asarray(latencies)
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
        }
        if latencies
        else {},
        codes=dict(codes),
        concurrency=concurrency,
        input_wait_seconds=waited,
        factor_cache=factor_cache,
        notes=tuple(notes),
        messages={code: tuple(kept) for code, kept in messages.items()},
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``explain-loadgen``."""
    p = argparse.ArgumentParser(prog="explain-loadgen", description=__doc__.splitlines()[0])
    p.add_argument("--target", default="localhost:50051", help="gRPC target (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=4, help="callers sending at once (default: %(default)s)")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--requests", type=int, help="requests to send in all")
    amount.add_argument("--duration", type=positive_float, help="seconds to run")
    p.add_argument(
        "--repeat-inputs",
        action="store_true",
        help="cycle a fixed mix of 8 images x 10 captions (or those given), which the server's factor "
        "cache answers after the first round, instead of a new image and caption per request",
    )
    p.add_argument(
        "--image",
        action="append",
        dest="images",
        metavar="PATH",
        help="a photo to cut the images from (repeatable; default: the photos shipped with the client); "
        "with --repeat-inputs, an image file sent as it is",
    )
    p.add_argument(
        "--image-sides",
        type=int,
        nargs=2,
        default=SIDES,
        metavar=("MIN", "MAX"),
        help=f"range of the generated images' widths and heights, pixels (default: {SIDES[0]} {SIDES[1]})",
    )
    p.add_argument(
        "--caption",
        action="append",
        dest="captions",
        metavar="TEXT",
        help="a caption to send, cycled (repeatable; default: a new caption of 1-30 words per request); "
        "the server's cache answers repeated captions",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="seed of the generated images and captions (default: a new one per run, "
        "reported; a run repeating an earlier seed repeats its inputs)",
    )
    p.add_argument("--deadline", type=positive_float, help="per-call deadline, seconds (default: none)")
    p.add_argument("--model", help="hosted model name (default: the server's default)")
    p.add_argument("--n-steps", type=int, help="quadrature nodes (default: the model's)")
    p.add_argument("--method", help="quadrature rule (default: the model's)")
    p.add_argument("--token", help="bearer token (default: the --token-env variable's)")
    add_credential_arguments(p)
    p.add_argument(
        "--metrics-url",
        metavar="URL",
        help=f"the server's Prometheus page, read before and after the run for its factor cache hit ratio "
        f"(default: http://HOST:{METRICS_PORT}/metrics for a HOST:PORT target; skipped with a note "
        "when unreachable)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' = stdout)")
    add_version_argument(p)
    return p


def build_requests(
    args: argparse.Namespace, seed: int
) -> list[explain_pb2.ExplainRequest] | Iterator[explain_pb2.ExplainRequest]:
    """The requests a command line (:func:`build_parser`) asks for, for :func:`generate_load`: with
    ``--repeat-inputs`` a list to cycle, else an endless generator of requests that each carry
    a new image and, unless ``--caption`` is given, a new caption.

    Raises:
        OSError: an --image file that cannot be read or decoded.
    """
    options = {"model": args.model, "n_steps": args.n_steps, "method": args.method}
    sides = tuple(args.image_sides)
    if args.repeat_inputs:
        if args.images:
            images = []
            for path in args.images:
                with open(path, "rb") as file:
                    images.append(file.read())
        else:
            images = list(itertools.islice(distinct_images(seed, sides=sides), 8))
        captions = args.captions or list(itertools.islice(distinct_captions(seed), 10))
        # pairs cycle through both lists at different strides, so the mix covers many combinations
        return [
            explain_request(images[i % len(images)], captions[(i * 7) % len(captions)], **options)
            for i in range(len(images) * len(captions))
        ]
    photos = load_photos(args.images) if args.images else None
    captions = itertools.cycle(args.captions) if args.captions else distinct_captions(seed)
    pairs = zip(distinct_images(seed, sides=sides, photos=photos), captions)
    return (explain_request(image, caption, **options) for image, caption in pairs)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``explain-loadgen``; returns 0 when every call succeeded, 1 otherwise (2: bad arguments)."""
    args = build_parser().parse_args(argv)
    low, high = args.image_sides
    problems = [
        f"--concurrency must be positive; got {args.concurrency}" if args.concurrency < 1 else "",
        f"--requests must be positive; got {args.requests}" if args.requests is not None and args.requests < 1 else "",
        f"--image-sides must be 1 <= MIN <= MAX; got {low} {high}" if not 1 <= low <= high else "",
    ]
    if any(problems):
        print(f"explain-loadgen: {'; '.join(p for p in problems if p)}", file=sys.stderr)
        return 2
    seed = secrets.randbits(32) if args.seed is None else args.seed
    try:
        requests = build_requests(args, seed)
    except OSError as err:
        print(f"explain-loadgen: {err}", file=sys.stderr)
        return 2
    try:
        credentials, token = connection_credentials(args)
        token = args.token or token
        bearer_metadata(token)
    except (OSError, ValueError) as err:
        print(f"explain-loadgen: {err}", file=sys.stderr)
        return 2
    metrics_url = args.metrics_url or default_metrics_url(args.target)
    report = asyncio.run(
        generate_load(
            args.target,
            requests,
            concurrency=args.concurrency,
            total=args.requests,
            duration=args.duration,
            deadline=args.deadline,
            credentials=credentials,
            token=token,
            metrics_url=metrics_url,
        )
    )
    notes = (
        report.notes
        if metrics_url
        else (
            *report.notes,
            f"no /metrics URL for target {args.target!r}: pass --metrics-url for the factor cache hit ratio",
        )
    )
    report = replace(report, inputs="repeated" if args.repeat_inputs else "distinct", seed=seed, notes=notes)
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
