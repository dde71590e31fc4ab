"""`make bench`: the default explanation of one real-size model per family against its plain forward pass.

Each model is measured in a fresh subprocess on the CPU, float32, one torch thread, seeded random
weights (``benchmarks/family_models.py``; no pretrained weights), at its default settings: the
towers' default layers and the family's quadrature (the same resolution as ``LoadedModel``).

- forward: one plain forward pass of both towers, ``encode_text`` on one caption padded to the
  context length plus ``encode_image`` on one image at the model's size (batch 1, no grad,
  median of 3 after a warm-up).
- explanation: ``Explainer.explain`` of that caption (14 tokens with the special ones) and image,
  after one warm-up explanation of another pair at one node (the engine profiles each tower once).
- added memory: peak RSS over the warm-up and the timed explanation (VmHWM, reset just before)
  minus the RSS before them; on CUDA (``--device cuda``) the peak of allocated device memory
  over the timed explanation minus what was allocated before it.
- |delta|: the timed explanation's convergence delta.

``--record FILE`` replaces this benchmark's section in FILE (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

BEGIN, END = "<!-- BEGIN bench_families -->", "<!-- END bench_families -->"
GOAL = 3.0


def worker(architecture: str, device: str) -> dict:
    """Measure one model at its defaults on ``device``; returns a JSON-able dict."""
    import torch

    torch.set_num_threads(1)

    def synchronised() -> float:
        if device.startswith("cuda"):  # kernels run asynchronously
            torch.cuda.synchronize()
        return time.perf_counter()

    from bench_engine import reset_peak, rss_bytes
    from family_models import MIB, build

    from explain_server.engine.split import default_quadrature
    from explain_server.model_spec import DEFAULT_METHOD, DEFAULT_N_STEPS

    bench = build(architecture, device=device)
    model, explainer = bench.model, bench.explainer
    text, image = explainer.text, explainer.image
    method, n_steps = default_quadrature(text, image)
    method, n_steps = (method, n_steps) if method is not None else (DEFAULT_METHOD, DEFAULT_N_STEPS)
    times = []
    with torch.no_grad():
        for _ in range(4):
            start = synchronised()
            model.encode_text(bench.forward_tokens)
            model.encode_image(bench.images[0][None])
            times.append(synchronised() - start)
    forward = statistics.median(times[1:])
    settings = dict(text_layer=text.default_layer, image_layer=image.default_layer, method=method, n_steps=n_steps)
    pid = os.getpid()
    idle = rss_bytes(pid, "VmRSS")
    reset_peak(pid)
    # warm-up at one node: the engine's cost profiles and the references are per layer, not per rule
    explainer.explain(bench.captions[1], bench.images[1], **{**settings, "n_steps": 1})
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    start = synchronised()
    attribution = explainer.explain(bench.captions[0], bench.images[0], **settings)
    seconds = synchronised() - start
    return {
        "architecture": architecture,
        "text_layer": text.layers[text.default_layer].name,
        "image_layer": image.layers[image.default_layer].name,
        "method": method,
        "n_steps": n_steps,
        "fast": bench.fast,
        "forward": forward,
        "seconds": seconds,
        "added_mib": (
            (torch.cuda.max_memory_allocated() - allocated)
            if device.startswith("cuda")
            else rss_bytes(pid, "VmHWM") - idle
        )
        / MIB,
        "delta": abs(attribution.convergence_delta),
        "shape": list(attribution.interactions.shape),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=pathlib.Path, help="markdown file whose section to replace")
    parser.add_argument("--only", nargs="*", help="architectures (default: one per family)")
    parser.add_argument(
        "--results", type=pathlib.Path, help="JSON lines of earlier workers (this script's stderr) to reuse"
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the models run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.device)))
        return 0

    import torch
    from bench_engine import record
    from family_models import FAMILIES

    rows, notes = [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    earlier = {}
    if args.results:
        for line in args.results.read_text().splitlines():
            if line.startswith("{"):
                earlier[json.loads(line)["architecture"]] = line
    for family, architecture in FAMILIES.items():
        if args.only and architecture not in args.only:
            continue
        if architecture in earlier:
            child = subprocess.CompletedProcess([], 0, earlier[architecture], "")
        else:
            child = subprocess.run(
                [sys.executable, __file__, "--worker", architecture, "--device", args.device],
                capture_output=True,
                text=True,
                env=env,
            )
        if child.returncode:
            notes.append(f"- {family} ({architecture}): not measured: {child.stderr.strip().splitlines()[-1]}")
            print(notes[-1], file=sys.stderr)
            continue
        r = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps(r), file=sys.stderr)
        ratio = r["seconds"] / r["forward"]
        mark = "" if ratio <= GOAL else " (over 3x)"
        rows.append(
            f"| {family} | {architecture} | {r['text_layer']}, {r['image_layer']} | {r['method']} {r['n_steps']} "
            f"| {', '.join(r['fast']) or '-'} | {r['forward'] * 1000:.0f} | {r['seconds']:.2f} | "
            f"**{ratio:.2f}**{mark} | {r['added_mib']:.0f} | {r['delta']:.1e} |"
        )
    body = "\n".join(
        [
            "## Every family at its defaults (issue 22)",
            "",
            f"`make bench` (`benchmarks/bench_families.py`), {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
            f"{os.cpu_count()} CPU cores shared with other jobs, **one torch thread** per process, torch "
            f"{torch.__version__}, {args.device}, float32, **seeded random weights** (no pretrained weights here), one "
            "caption of 14 tokens (token ids in the real vocabulary's range) and the bundled photo. Forward: "
            "encode_text (padded to the context) + encode_image, batch 1, median of 3. Explanation: "
            "`Explainer.explain` at the model's defaults after one warm-up explanation (one node). Goal: at most 3x the "
            "forward pass.",
            "",
            "| family | architecture | default layers (text, image) | quadrature | fast path | forward ms "
            "| explanation s | x forward | added MiB | abs(delta) |",
            "|---|---|---|---|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
            *notes,
        ]
    )
    print(body)
    if args.record:
        record(args.record, body, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
