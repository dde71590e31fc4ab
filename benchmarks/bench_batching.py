"""`make bench` (batching): throughput and latency under concurrent load, dynamic batching on and off.

For each model, a real ``explain-server`` runs in three settings (``MODES``): batching on at
the defaults (``--max-batch-size 16``, queue delay 0), batching on with a queue delay of
``QUEUE_DELAY_MS``, and batching off (``--max-batch-size 1``); the factor cache is off in all
(``--factor-cache-mb 0``: the load cycles through a fixed mix of pairs, and cache hits would
measure the cache, not the engine). ``explain-loadgen``'s ``run`` drives it in-process at
concurrency 1, 4 and 16 for ``--seconds`` each, after a warm-up, with 16 photo-like images and
captions of 1-30 words (``explain_client.workload``; sides 64-128 px for the small model, whose
inputs are small scenes; 224-640 px, photo sizes, for ViT-B-32), all at the same explanation
settings (``WORKLOAD``). Concurrency 16, where the goals are set, runs ``REPEATS`` times and the
run with the median throughput is reported: single runs on this machine spread by about 10%.
Then a soak: ``--soak-seconds`` at concurrency 16 on the small model with batching on, counting
non-OK answers and the server's RSS growth after warm-up.

Models: the shipped known-answer model ``shapes`` (``--small`` hosts another), and ViT-B-32 with
seeded random weights for a production-size model (speed does not depend on the weights' values).

Last, the engine alone on the shipped model, in this process on one torch thread: the same
mix's caption and image factors, one side at a time against ``ENGINE_BATCH`` sides per call,
which separates what batching saves in the engine from what each request costs around it.

``--record FILE`` replaces this benchmark's section in FILE (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import tempfile
import time

from bench_engine import Server, record, rss_bytes, save_weights

from explain_client.client import explain_request
from explain_client.loadgen import run
from explain_client.workload import distinct_requests
from explain_server.models import DEFAULT_METHOD, DEFAULT_N_STEPS
from explain_server.shapes import model as shapes_model

BEGIN, END = "<!-- BEGIN bench_batching -->", "<!-- END bench_batching -->"
# Triton's tuning process starts with no delay and raises it while the latency budget allows.
# At concurrency 16 with no delay the closed loop splits into two groups of about 8 callers
# that take turns (one computes while the other queues). A batch of 8 takes about 120 ms here,
# so a 100 ms delay lets the group whose answers just went out rejoin: batches grow from 8 to
# 16 (explain_batch_size). A caller alone pays the delay in full (concurrency 1).
QUEUE_DELAY_MS = 100
MODES = {
    "on": ["--max-batch-size", "16"],
    f"on, {QUEUE_DELAY_MS} ms delay": ["--max-batch-size", "16", "--max-queue-delay-ms", str(QUEUE_DELAY_MS)],
    "off": ["--max-batch-size", "1"],
}
REPEATS = 3
# One torch thread per server: the load generator shares the two cores, and OpenMP workers
# spinning at barriers while another process runs slow small models down many times over.
THREADS = ["--intra-op-threads", "1"]
# The same settings for both models: exclip's layers (each tower's last block) and the
# service-wide quadrature, ViT-B-32's defaults. The shapes model's own defaults (block 0, 8
# nodes; shapes/model.py) cost about 30 times as much per explanation, which batching on a CPU
# cannot amortise: they are measured by bench_grounding.
WORKLOAD = {"text_layer": -1, "image_layer": -1, "method": DEFAULT_METHOD, "n_steps": DEFAULT_N_STEPS}
# Images like each model's own inputs: small scenes for the small model, photo sizes for ViT-B-32.
SMALL_SIDES, PHOTO_SIDES = (64, 128), (224, 640)
# The mean batch the closed loop at concurrency 16 forms with queue delay 0 (explain_batch_size
# in /metrics): while one batch computes, the callers of the previous one queue the next.
ENGINE_BATCH = 8


def load(server: Server, concurrency: int, seconds: float, sides: tuple[int, int]):
    mix = [explain_request(image, caption, **WORKLOAD) for image, caption in distinct_requests(16, sides=sides)]
    return asyncio.run(run(server.target, mix, concurrency=concurrency, duration=seconds))


def measure(name: str, model_args: list[str], seconds: float, sides: tuple[int, int]) -> list[dict]:
    rows = []
    for mode, flags in MODES.items():
        server = Server([*model_args, *THREADS, "--factor-cache-mb", "0", *flags])
        try:
            load(server, 4, min(5.0, seconds), sides)  # warm-up: first-call allocations, thread pools
            for concurrency in (1, 4, 16):
                reports = [load(server, concurrency, seconds, sides) for _ in range(REPEATS if concurrency == 16 else 1)]
                report = sorted(reports, key=lambda r: r.ok_per_second)[len(reports) // 2]
                lat = report.latency_seconds
                rows.append({
                    "model": name, "batching": mode, "concurrency": concurrency,
                    "throughput": report.ok_per_second, "p50": lat["p50"], "p99": lat["p99"],
                    "errors": report.requests - report.codes.get("OK", 0),
                })
                print(rows[-1], flush=True)
        finally:
            server.close()
    return rows


def soak(model_args: list[str], seconds: float, sides: tuple[int, int]) -> dict:
    # cache off: every request goes through the engine, where a leak would show
    server = Server([*model_args, *THREADS, "--factor-cache-mb", "0", *MODES["on"]])
    try:
        warm = load(server, 16, 30.0, sides)
        rss_warm = rss_bytes(server.process.pid, "VmRSS")
        report = load(server, 16, seconds, sides)
        rss_end = rss_bytes(server.process.pid, "VmRSS")
    finally:
        server.close()
    return {"warm": warm, "report": report, "rss_warm": rss_warm, "rss_end": rss_end}


def engine_seconds_per_request(repeats: int = 5) -> dict[int, float]:
    """{batch size: median seconds per request} of the shipped model's engine for WORKLOAD's
    factors (exclip's layers: each tower's last block), in this process on one torch thread."""
    import open_clip
    import torch

    from explain_server.engine.explainer import Side
    from explain_server.inputs import ImageLimits, decode_image, tokenize
    from explain_server.models import ModelSpec, load_model

    torch.set_num_threads(1)  # as the servers run (THREADS)
    open_clip.add_model_config(shapes_model.CONFIG)
    loaded = load_model(ModelSpec.parse(shapes_model.spec()), device=torch.device("cpu"), dtype="float32", memory_bytes=256 << 20)
    explainer = loaded.explainer
    pairs = [
        (tokenize(loaded.tokenizer, caption).token_ids, loaded.transform(decode_image(data, ImageLimits())))
        for data, caption in distinct_requests(16, sides=SMALL_SIDES)
    ]
    layers = {"text": explainer.text.n_layers - 1, "image": explainer.image.n_layers - 1}

    def run(batch: list) -> None:
        for tower, inputs in (("text", [t for t, _ in batch]), ("image", [v for _, v in batch])):
            explainer.factors(tower, [Side(x, layers[tower], DEFAULT_METHOD, DEFAULT_N_STEPS) for x in inputs])

    figures = {}
    for size in (1, ENGINE_BATCH):
        batches = [pairs[i : i + size] for i in range(0, len(pairs), size)]
        for batch in batches:  # warm-up
            run(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for batch in batches:
                run(batch)
            times.append((time.perf_counter() - start) / len(pairs))
        figures[size] = sorted(times)[repeats // 2]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="load per setting, seconds")
    parser.add_argument("--soak-seconds", type=float, default=300.0, help="the soak run, seconds")
    parser.add_argument("--small", nargs="*", metavar="FLAG",
                        help="server flags for the small model (default: the shipped known-answer model)")
    parser.add_argument("--small-name", default="shapes (known-answer, 4+3 blocks, 96 px)", help="its name in the table")
    parser.add_argument("--record", type=pathlib.Path, help="markdown file whose section to replace")
    args = parser.parse_args()
    small = args.small or shapes_model.server_args()
    with tempfile.TemporaryDirectory() as tmp:
        weights = pathlib.Path(tmp) / "vit-b-32.safetensors"
        save_weights("ViT-B-32", weights)
        b32 = ["--model", f"b32=ViT-B-32:{weights}"]
        rows = measure(args.small_name, small, args.seconds, SMALL_SIDES) + measure("ViT-B-32", b32, args.seconds, PHOTO_SIDES)
    soaked = soak(small, args.soak_seconds, SMALL_SIDES)
    engine = engine_seconds_per_request()

    def row(model, mode, concurrency):
        return next(r for r in rows if (r["model"], r["batching"], r["concurrency"]) == (model, mode, concurrency))

    lines = [
        "## Dynamic batching under concurrent load (issue 3)",
        "",
        f"`benchmarks/bench_batching.py`, {time.strftime('%Y-%m-%d')}, 2 CPU cores: closed-loop load from "
        f"`explain-loadgen` ({args.seconds:g} s per setting, 16 photo-like images and captions of 1-30 words; image sides "
        f"{SMALL_SIDES[0]}-{SMALL_SIDES[1]} px for the small model, {PHOTO_SIDES[0]}-{PHOTO_SIDES[1]} px for ViT-B-32; "
        f"both models explained at exclip's layers, each tower's last block, with {DEFAULT_METHOD} and {DEFAULT_N_STEPS} "
        "nodes; factor cache off, `--intra-op-threads 1`). Batching on: `--max-batch-size 16`, with the default queue "
        f"delay 0 or with `--max-queue-delay-ms {QUEUE_DELAY_MS}`; off: `--max-batch-size 1`. Concurrency 16: the run "
        f"with the median throughput of {REPEATS}.",
        "",
        "| model | batching | concurrency | throughput (req/s) | p50 | p99 | p99 / p50 | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batching']} | {r['concurrency']} | {r['throughput']:.2f} | {r['p50'] * 1000:.0f} ms "
            f"| {r['p99'] * 1000:.0f} ms | {r['p99'] / r['p50']:.2f} | {r['errors']} |"
        )
    lines += ["", "At concurrency 16, against batching off:", ""]
    on_modes = [mode for mode in MODES if mode != "off"]
    gains = {}
    for model in (args.small_name, "ViT-B-32"):
        off = row(model, "off", 16)
        for mode in on_modes:
            on = row(model, mode, 16)
            gains[model, mode] = on["throughput"] / off["throughput"]
            lines.append(
                f"- {model}, batching {mode}: throughput x{gains[model, mode]:.2f}; p99 / p50 {on['p99'] / on['p50']:.2f}"
            )
    tails = max(row(m, mode, 16)["p99"] / row(m, mode, 16)["p50"] for m in (args.small_name, "ViT-B-32") for mode in on_modes)
    lines += [
        "",
        "Issue 3's goals at concurrency 16: at least x3 throughput on the small model: "
        + "; ".join(f"{'met' if gains[args.small_name, mode] >= 3 else 'NOT met'} with batching {mode}" for mode in on_modes)
        + ". No loss on ViT-B-32: "
        + "; ".join(f"{'met' if gains['ViT-B-32', mode] >= 1 else 'NOT met'} with batching {mode}" for mode in on_modes)
        + f". p99 at most 3x p50: {'met' if tails <= 3 else 'NOT met'} (at most {tails:.2f}).",
    ]
    rep = soaked["report"]
    lines += [
        "",
        f"Soak: {rep.duration_seconds:.0f} s at concurrency 16 on {args.small_name}, batching on, factor cache off, "
        f"after a 30 s warm-up: {rep.requests} requests, status codes {rep.codes}, "
        f"p50 {rep.latency_seconds['p50'] * 1000:.0f} ms, p99 {rep.latency_seconds['p99'] * 1000:.0f} ms; "
        f"server RSS {soaked['rss_warm'] / 2**20:.0f} MiB after warm-up, {soaked['rss_end'] / 2**20:.0f} MiB at the end "
        f"({soaked['rss_end'] / soaked['rss_warm'] - 1:+.1%}).",
        "",
        f"Engine alone (shapes, in-process, one torch thread, the same 16 pairs and settings): "
        f"{engine[1] * 1000:.1f} ms per request one at a time, {engine[ENGINE_BATCH] * 1000:.1f} ms in calls of "
        f"{ENGINE_BATCH} (x{engine[1] / engine[ENGINE_BATCH]:.2f}). Through the server at concurrency 16 a request "
        f"costs {1000 / row(args.small_name, 'on', 16)['throughput']:.1f} ms with batching and "
        f"{1000 / row(args.small_name, 'off', 16)['throughput']:.1f} ms without.",
    ]
    body = "\n".join(lines)
    print(body)
    if args.record:
        record(args.record, body, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
