"""`make bench` (batching): throughput and latency under concurrent load, on the defaults a user gets.

1. **Defaults.** Each model at its own default settings, behind a server started with no flags
   but its ports (and, for ViT-B-32, the model): dynamic batching on (`--max-batch-size 16`,
   queue delay 0, the defaults) against off (`--max-batch-size 1`). Closed-loop load from
   ``explain-loadgen``'s ``generate_load`` at concurrency 16: ``--requests`` requests, each
   with a new photo-like image (crops of photographs, 64-800 px, JPEG and PNG) and a new
   caption of 1-30 words (``explain_client.workload``), generated before the clock starts and
   sent once each.
   The factor cache keeps its default size; with inputs that never repeat its hit ratio is
   reported, near 0. Then a lone caller (concurrency 1) on the same server, batching on.
2. **Tuned.** The shipped model at exclip's layers (each tower's last block, the service-wide
   quadrature), where an explanation costs far less and batching shares more of it.
3. **Soak.** ``--soak-seconds`` at concurrency 16 against the default server, every request new:
   status codes and the server's RSS growth after a warm-up.
4. **Stopped work.** A ViT-B-32 request at block 0 with n_steps=512 whose 2 s deadline passes
   while it computes, and a default request sent 0.5 s after it: the second one's queue wait
   (reported by the server) beyond the first one's deadline is how long the stopped work kept
   the model, with chunks sized by time (the default ``--jvp-chunk-seconds``) and by memory
   alone (``--jvp-chunk-seconds 0``).
5. **Engine alone.** The shipped model's sides at its defaults in this process, one at a time
   against 16 per call: what batching can save inside the engine. ``--engine-only DEVICE``
   measures only this, for both models, on another device (``benchmarks/gpu/run.sh``).

Models: the shipped known-answer model ``shapes`` (the server's embedded default) and ViT-B-32
with seeded random weights from a local file (speed does not depend on the weights' values).

``--record FILE`` replaces this benchmark's section in FILE (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import sys
import tempfile
import threading
import time

from bench_engine import Server, record, rss_bytes, save_weights

from explain_client.client import explain_request
from explain_client.loadgen import generate_load
from explain_client.workload import distinct_requests

BEGIN, END = "<!-- BEGIN bench_batching -->", "<!-- END bench_batching -->"
CONCURRENCY = 16
OFF = ["--max-batch-size", "1"]
# exclip's layers (the input of each tower's last block) with the service-wide quadrature
LAST_BLOCKS = {"text_layer": -1, "image_layer": -1, "method": "gausslegendre", "n_steps": 3}
ENGINE_BATCH = 16
LONE = 16  # requests of the lone caller (concurrency 1)


def requests(count: int, seed: int, **options) -> list:
    """``count`` requests, every image and caption new (built now, before any clock starts)."""
    return [explain_request(image, caption, **options) for image, caption in distinct_requests(count, seed=seed)]


def load(server: Server, batch: list, concurrency: int):
    """Send every request of ``batch`` once, ``concurrency`` at a time."""
    return asyncio.run(
        generate_load(
            server.target, iter(batch), concurrency=concurrency, total=len(batch), metrics_url=server.metrics_url
        )
    )


def measure(name: str, model_args: list[str], count: int, seed: int, **options) -> list[dict]:
    """Batching on and off at concurrency 16, then a lone caller with batching on."""
    rows = []
    for batching, flags in (("on", []), ("off", OFF)):
        server = Server([*model_args, *flags], defaults=True)
        try:
            load(server, requests(CONCURRENCY, seed, **options), CONCURRENCY)  # warm-up: first-call allocations
            settings = [(CONCURRENCY, count)] + ([(1, LONE)] if batching == "on" else [])
            for concurrency, total in settings:
                # new inputs for every run: the cache keeps the warm-up's and the other runs'
                report = load(server, requests(total, seed + concurrency, **options), concurrency)
                rows.append(
                    {
                        "model": name,
                        "batching": batching,
                        "concurrency": concurrency,
                        "report": report,
                        "hit_ratio": (report.factor_cache or {}).get("hit_ratio"),
                    }
                )
                print(name, batching, concurrency, report.text().replace("\n", " | "), flush=True)
        finally:
            server.close()
    return rows


def soak(seconds: float) -> dict:
    """The default server at concurrency 16 with new inputs for ``seconds``, after a warm-up."""
    server = Server([], defaults=True)
    try:
        load(server, requests(2 * CONCURRENCY, 101), CONCURRENCY)
        rss_warm = rss_bytes(server.process.pid, "VmRSS")
        endless = (explain_request(image, caption) for image, caption in distinct_requests(seed=102))
        report = asyncio.run(
            generate_load(
                server.target, endless, concurrency=CONCURRENCY, duration=seconds, metrics_url=server.metrics_url
            )
        )
        rss_end = rss_bytes(server.process.pid, "VmRSS")
    finally:
        server.close()
    return {"report": report, "rss_warm": rss_warm, "rss_end": rss_end}


def stopped_work(model_args: list[str], repeats: int = 3) -> dict[str, list[float]]:
    """{chunking: seconds} that a default request, sent 0.5 s after a heavy one, still waited in
    the queue once the heavy one's 2 s deadline had passed."""
    from explain_client import DeadlineExceededError

    heavy = {"text_layer": 0, "image_layer": 0, "n_steps": 512}
    deadline, lag = 2.0, 0.5
    waits: dict[str, list[float]] = {}
    for chunking, flags in (("by time (default)", []), ("by memory only", ["--jvp-chunk-seconds", "0"])):
        server = Server([*model_args, *flags], defaults=True)
        try:
            pairs = iter(distinct_requests(seed=103))
            image, caption = next(pairs)
            server.client.explain(image, caption)  # warm-up
            waits[chunking] = []
            for _ in range(repeats):
                image, caption = next(pairs)

                def expire() -> None:
                    try:
                        server.client.explain(image, caption, timeout=deadline, **heavy)
                    except DeadlineExceededError:
                        pass

                caller = threading.Thread(target=expire)
                sent = time.perf_counter()
                caller.start()
                light_image, light_caption = next(pairs)
                time.sleep(lag)  # the heavy request is computing
                light_sent = time.perf_counter()
                queued = server.client.explain(light_image, light_caption).queue_seconds
                waits[chunking].append(queued - (sent + deadline - light_sent))
                caller.join()
        finally:
            server.close()
    return waits


def engine_seconds_per_request(spec: str, device: str = "cpu", repeats: int = 3) -> dict[int, float]:
    """{sides per call: median seconds per request} of the engine on the model ``spec``
    (``--model`` syntax) at its default settings, in this process, on torch's default threads
    (as the server runs): ``ENGINE_BATCH`` new pairs one at a time, then all in one call."""
    import open_clip
    import torch

    from explain_server.engine.explainer import Side
    from explain_server.inputs import decode_image, tokenize
    from explain_server.loading import load_model
    from explain_server.model_spec import ModelSpec
    from explain_server.settings import ImageLimits
    from explain_server.shapes import model as shapes_model

    open_clip.add_model_config(shapes_model.CONFIG)
    loaded = load_model(ModelSpec.parse(spec), device=torch.device(device), dtype="float32", memory_bytes=256 << 20)
    explainer = loaded.explainer
    pairs = [
        (tokenize(loaded.tokenizer, caption).token_ids, loaded.transform(decode_image(data, ImageLimits())))
        for data, caption in distinct_requests(ENGINE_BATCH, seed=104)
    ]
    settings = {"text": loaded.default_text_layer, "image": loaded.default_image_layer}

    def explain(batch: list) -> None:
        for tower, inputs in (("text", [t for t, _ in batch]), ("image", [v for _, v in batch])):
            sides = [Side(x, settings[tower], loaded.default_method, loaded.default_n_steps) for x in inputs]
            explainer.factors(getattr(explainer, tower), sides)
        if loaded.device.type == "cuda":
            torch.cuda.synchronize(loaded.device)

    figures = {}
    for size in (1, ENGINE_BATCH):
        batches = [pairs[i : i + size] for i in range(0, len(pairs), size)]
        explain(batches[0])  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in batches:
                explain(batch)
            times.append((time.perf_counter() - start) / len(pairs))
        figures[size] = statistics.median(times)
    return figures


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | settings | batching | concurrency | requests | throughput (req/s) | p50 | p99 | p99 / p50 | non-OK | cache hit ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rep, lat = r["report"], r["report"].latency_seconds
        hits = "-" if r["hit_ratio"] is None else f"{r['hit_ratio']:.1%}"
        lines.append(
            f"| {r['model']} | {r['settings']} | {r['batching']} | {r['concurrency']} | {rep.requests} | {rep.ok_per_second:.2f} "
            f"| {lat['p50'] * 1000:.0f} ms | {lat['p99'] * 1000:.0f} ms | {lat['p99'] / lat['p50']:.2f} "
            f"| {rep.requests - rep.codes.get('OK', 0)} | {hits} |"
        )
    return lines


def engine_only(device: str) -> None:
    """Print the engine's seconds per request, alone and batched, for both models on ``device``."""
    from explain_server.shapes import model as shapes_model

    with tempfile.TemporaryDirectory() as tmp:
        weights = pathlib.Path(tmp) / "vit-b-32.safetensors"
        save_weights("ViT-B-32", weights)
        for name, spec in (("shapes", shapes_model.spec()), ("ViT-B-32", f"b32=ViT-B-32:{weights}")):
            figures = engine_seconds_per_request(spec, device)
            print(
                f"engine on {device}, {name} at its defaults: {figures[1] * 1000:.1f} ms per request one at a time, "
                f"{figures[ENGINE_BATCH] * 1000:.1f} ms in calls of {ENGINE_BATCH} (x{figures[1] / figures[ENGINE_BATCH]:.2f})",
                flush=True,
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=192, help="requests per setting at concurrency 16")
    parser.add_argument("--soak-seconds", type=float, default=300.0, help="the soak run, seconds")
    parser.add_argument("--record", type=pathlib.Path, help="markdown file whose section to replace")
    parser.add_argument(
        "--engine-only",
        metavar="DEVICE",
        help="only the engine alone against batched, on DEVICE (cpu, cuda); prints, records nothing",
    )
    args = parser.parse_args()
    if args.engine_only:
        engine_only(args.engine_only)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        weights = pathlib.Path(tmp) / "vit-b-32.safetensors"
        save_weights("ViT-B-32", weights)
        b32 = ["--model", f"b32=ViT-B-32:{weights}"]
        defaults = measure("shapes", [], args.requests, 10) + measure("ViT-B-32", b32, args.requests, 20)
        for row in defaults:
            row["settings"] = "its defaults"
        tuned = measure("shapes", [], args.requests, 30, **LAST_BLOCKS)
        for row in tuned:
            row["settings"] = "last blocks, gausslegendre/3"
        waits = stopped_work(b32)
    soaked = soak(args.soak_seconds)
    from explain_server.shapes import model as shapes_model

    engine = engine_seconds_per_request(shapes_model.spec())

    def at(rows, model, batching, concurrency=CONCURRENCY):
        return next(r for r in rows if (r["model"], r["batching"], r["concurrency"]) == (model, batching, concurrency))

    def gain(rows, model):
        return at(rows, model, "on")["report"].ok_per_second / at(rows, model, "off")["report"].ok_per_second

    tails = max(
        at(rows, m, "on")["report"].latency_seconds["p99"] / at(rows, m, "on")["report"].latency_seconds["p50"]
        for rows, m in ((defaults, "shapes"), (defaults, "ViT-B-32"))
    )
    rep = soaked["report"]
    lines = [
        "## Dynamic batching under concurrent load, on the defaults (issue 21)",
        "",
        f"`benchmarks/bench_batching.py`, {time.strftime('%Y-%m-%d')}, 2 CPU cores, the load generator on the same "
        f"machine. Servers started with no flags but their ports (and `--model` for ViT-B-32, seeded random weights "
        f"from a local file): each model at its own default settings (shapes: blocks 0/0, riemann_trapezoid with 8 "
        f"nodes; ViT-B-32: the last blocks, gausslegendre with 3), torch's default threads, the default factor cache. "
        f"Batching on: the defaults (`--max-batch-size 16`, queue delay 0); off: `--max-batch-size 1`. Closed loop "
        f"at concurrency {CONCURRENCY}, {args.requests} requests per setting, every one with a new photo-like image "
        f"(crops of photographs, 64-800 px, JPEG and PNG) and a new caption of 1-30 words, generated before the clock "
        f"starts; concurrency 1: {LONE} requests. After the defaults, the shipped model at "
        "exclip's layers (tuned).",
        "",
        *table(defaults + tuned),
        "",
        "At concurrency 16, batching on against off:",
        "",
        f"- shapes at its defaults: throughput x{gain(defaults, 'shapes'):.2f} (issue 21 asks x2)",
        f"- ViT-B-32 at its defaults: throughput x{gain(defaults, 'ViT-B-32'):.2f} (asks x1.5)",
        f"- shapes at the last blocks: throughput x{gain(tuned, 'shapes'):.2f}",
        f"- p99 / p50 with batching on, defaults: at most {tails:.2f} (asks at most 3)",
        "",
        f"Soak: {rep.duration_seconds:.0f} s at concurrency {CONCURRENCY} against the default server (shapes at its "
        f"defaults), every request new, after a warm-up: {rep.requests} requests, status codes {rep.codes}, "
        f"p50 {rep.latency_seconds['p50'] * 1000:.0f} ms, p99 {rep.latency_seconds['p99'] * 1000:.0f} ms, factor cache "
        f"hit ratio {(rep.factor_cache or {}).get('hit_ratio', float('nan')):.1%}; server RSS "
        f"{soaked['rss_warm'] / 2**20:.0f} MiB after warm-up, {soaked['rss_end'] / 2**20:.0f} MiB at the end "
        f"({soaked['rss_end'] / soaked['rss_warm'] - 1:+.1%}).",
        "",
        "Stopped work: ViT-B-32 at block 0 with n_steps=512 and a 2 s deadline, then (0.5 s later) a default request; "
        "how long the default request still waited in the queue after the heavy one's deadline, seconds, over "
        f"{len(next(iter(waits.values())))} tries: "
        + "; ".join(
            f"chunks sized {k}: {', '.join(f'{w:.2f}' for w in v)} (max {max(v):.2f})" for k, v in waits.items()
        )
        + ".",
        "",
        f"Engine alone (shapes at its defaults, in-process, torch's default threads, {ENGINE_BATCH} new pairs): "
        f"{engine[1] * 1000:.0f} ms per request one at a time, {engine[ENGINE_BATCH] * 1000:.0f} ms in calls of "
        f"{ENGINE_BATCH} (x{engine[1] / engine[ENGINE_BATCH]:.2f}).",
    ]
    body = "\n".join(lines)
    print(body)
    if args.record:
        record(args.record, body, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
