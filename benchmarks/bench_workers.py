"""`make bench` (workers): the front end / worker split against the single-process design.

Both designs run with default flags (ports, and for ViT-B-32 the model) and each model at its
own default settings (ViT-B-32: exclip's layers, the input of each tower's last block), under
closed-loop load at concurrency 16 from ``explain-loadgen``'s ``generate_load``: every request
has a new photo-like image (``explain_client.workload``) and a new caption of one fixed
token length, because the single-process design (commit 970cf2c, ``--baseline-tree``) crashes
on batches of mixed lengths. The CPU time each process of the server used during the timed
run, over its wall time, says how many cores it kept busy.

``--record FILE`` replaces this benchmark's section in FILE (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import pathlib
import tempfile
import time

from bench_engine import Server, record, save_weights

from explain_client.client import explain_request
from explain_client.loadgen import generate_load
from explain_client.workload import distinct_requests
from explain_server.launcher import is_worker, process_tree

BEGIN, END = "<!-- BEGIN bench_workers -->", "<!-- END bench_workers -->"
CONCURRENCY = 16
BASELINE = "970cf2c"
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "brown", "orange", "pink", "purple"]
THINGS = ["dog", "cat", "car", "tree", "house", "boat", "bird", "horse", "chair", "table", "ball", "cup"]
PLACES = ["street", "beach", "table", "floor", "road", "grass", "snow", "water"]


def captions() -> list[str]:
    """Distinct captions of one word count, every word a single token of CLIP's vocabulary."""
    return [f"a photo of a {c} {t} on the {p}" for c, t, p in itertools.product(COLOURS, THINGS, PLACES)]


def requests(count: int, seed: int) -> list:
    texts = captions()[seed % 7 :: 7]  # a different slice per run: the cache never answers
    pairs = distinct_requests(count, seed=seed)
    return [explain_request(image, texts[i % len(texts)]) for i, (image, _) in enumerate(pairs)]


def cpu_seconds(pid: int) -> dict[int, float]:
    """User plus system CPU seconds of each process of the server."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for member in process_tree(pid):
        fields = pathlib.Path(f"/proc/{member}/stat").read_text().rpartition(")")[2].split()
        seconds[member] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def role(server_pid: int, pid: int) -> str:
    if pid == server_pid:
        return "front end" if len(process_tree(server_pid)) > 1 else "server"
    return "worker" if is_worker(pid) else "resource tracker"


def measure(design: str, env: dict | None, model: str, model_args: list[str], count: int, seed: int) -> dict:
    server = Server(model_args, defaults=True, env=env)
    try:
        asyncio.run(
            generate_load(
                server.target, iter(requests(CONCURRENCY, seed + 1)), concurrency=CONCURRENCY, total=CONCURRENCY
            )
        )  # warm-up
        pid = server.process.pid
        before, start, own = cpu_seconds(pid), time.monotonic(), time.process_time()
        report = asyncio.run(
            generate_load(
                server.target,
                iter(requests(count, seed)),
                concurrency=CONCURRENCY,
                total=count,
                metrics_url=server.metrics_url,
            )
        )
        wall = time.monotonic() - start
        after = cpu_seconds(pid)
        cores = {f"{role(pid, p)} {p}": (after[p] - before.get(p, 0.0)) / wall for p in after}
        # the machine's other tenant: this process, which sends the load and reads the answers
        cores["load generator 0"] = (time.process_time() - own) / wall
    finally:
        server.close()
    row = {"design": design, "model": model, "report": report, "cores": cores}
    print(design, model, report.text().replace("\n", " | "), cores, flush=True)
    return row


def transfer_seconds(shape: tuple[int, ...], repeats: int = 50) -> dict[str, float]:
    """Median seconds to pass one float32 image of ``shape`` through a multiprocessing pipe: as a
    pickled numpy array (what the front end sends) and as a torch tensor in shared memory
    (torch.multiprocessing's reduction: the storage moves to /dev/shm, a file descriptor crosses)."""
    import multiprocessing
    import statistics
    import threading

    import numpy as np
    import torch
    import torch.multiprocessing  # noqa: F401  (registers the shared-memory reductions)

    ours, theirs = multiprocessing.get_context("spawn").Pipe()
    times: dict[str, float] = {}
    for kind in ("numpy, pickled", "torch, shared memory"):
        samples = []
        for _ in range(repeats):
            payload = np.random.rand(*shape).astype(np.float32)
            if kind.startswith("torch"):
                payload = torch.from_numpy(payload)
            got = {}
            reader = threading.Thread(target=lambda: got.setdefault("x", theirs.recv()))
            start = time.perf_counter()
            reader.start()
            ours.send(payload)
            reader.join()
            samples.append(time.perf_counter() - start)
        times[kind] = statistics.median(samples)
    return times


def table(rows: list[dict]) -> str:
    lines = [
        "| model | design | req/s | ratio | p50 s | p99 s | p99/p50 | OK | cores per process |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {row["model"]: row["report"].ok_per_second for row in rows if row["design"].startswith("single")}
    for row in rows:
        r, lat = row["report"], row["report"].latency_seconds
        cores = ", ".join(f"{name.rsplit(' ', 1)[0]} {value:.2f}" for name, value in row["cores"].items())
        lines.append(
            f"| {row['model']} | {row['design']} | {r.ok_per_second:.2f} | x{r.ok_per_second / base[row['model']]:.2f} "
            f"| {lat['p50']:.2f} | {lat['p99']:.2f} | {lat['p99'] / lat['p50']:.2f} | {r.codes.get('OK', 0)}/{r.requests} "
            f"| {cores} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--baseline-tree",
        type=pathlib.Path,
        required=True,
        help=f"a checkout of commit {BASELINE} (git worktree add DIR {BASELINE})",
    )
    parser.add_argument(
        "--requests", type=int, default=96, help="timed requests per run on the shipped model (ViT-B-32: twice)"
    )
    parser.add_argument("--record", type=pathlib.Path, help="markdown file whose section to replace")
    args = parser.parse_args()
    tree = args.baseline_tree.resolve()
    baseline_env = {"PYTHONPATH": f"{tree / 'server'}:{tree / 'client'}"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = pathlib.Path(tmp) / "vit-b-32.safetensors"
        save_weights("ViT-B-32", weights)
        for model, model_args, count in (
            ("shapes (shipped)", [], args.requests),
            ("ViT-B-32", ["--model", f"b32=ViT-B-32:{weights}"], 2 * args.requests),
        ):
            for design, env in ((f"single process ({BASELINE})", baseline_env), ("front end + worker", None)):
                rows.append(measure(design, env, model, model_args, count, seed=300))
    transfers = {shape: transfer_seconds(shape) for shape in ((3, 224, 224), (3, 336, 336))}
    lines = [
        f"- {kind} {'x'.join(map(str, shape))}: {seconds * 1000:.2f} ms"
        for shape, kinds in transfers.items()
        for kind, seconds in kinds.items()
    ]
    body = (
        f"Concurrency {CONCURRENCY}, default flags, each model at its defaults, distinct images, captions of one "
        f"token length ({os.cpu_count()} cores). Ratio: OK requests per second against the single-process design "
        "in the same run. Cores per process: its CPU seconds over the timed run's wall seconds (the load generator runs on the same machine).\n\n"
        + table(rows)
        + "\n\nAn image crossing from the front end to a worker (median of 50, through a multiprocessing pipe):\n\n"
        + "\n".join(lines)
    )
    print(body)
    if args.record:
        record(args.record, body, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
