"""`make bench`: the cost of explanations through the service, against exclip and a forward pass.

Everything is measured in one run on this machine, so the ratios compare like with like.

- Models: seeded random open_clip weights (ViT-B-32, ViT-B-16, ViT-L-14) saved to local
  safetensors files and served by a real ``explain-server`` subprocess; the same file feeds
  exclip 1.1 and the forward-pass timing.
- Wall seconds: one explanation end to end through the gRPC client (median of --repeats).
- Added memory: the server's peak RSS during the explanation (VmHWM reset through
  /proc/PID/clear_refs once the model is loaded and idle) minus its idle RSS; the same for
  exclip, whose peak RSS while explaining is also set against the server's.
- |convergence delta|: averaged over the pairs of the quadrature sweep for the sweep, and for
  the bundled photo in the main table.
- x exclip: wall seconds over exclip's ``OpenClipExplainer.explain`` on the same weights and
  input (ViT-B-32 only: exclip takes minutes and gigabytes). x forward: wall seconds over one
  plain forward pass of both towers (batch 1, no grad, median).
- Quadrature sweep (in-process, ViT-B-32): for every rule, the fewest n_steps whose
  |convergence delta| is no larger, on every pair, than the smaller of riemann_right's (exclip's
  rule) and riemann_left's at n_steps=50.
  The cheapest such setting is the service default (``model_spec.DEFAULT_METHOD`` / ``DEFAULT_N_STEPS``).

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
import tempfile
import time

import numpy as np

from explain_server.launcher import ServerProcess, process_tree

ROOT = pathlib.Path(__file__).resolve().parent.parent
PHOTO = ROOT / "server" / "explain_server" / "assets" / "chelsea.jpg"
CAPTION = "a tabby cat with green eyes and a pink nose"
BEGIN, END = "<!-- BEGIN bench_engine -->", "<!-- END bench_engine -->"
EXCLIP_RULE = ("riemann_right", 10)  # exclip's nodes 1/N..1, N = 10
GIB, MIB = 1 << 30, 1 << 20


def record(path: pathlib.Path, body: str, begin: str, end: str) -> None:
    """Replace the section between the ``begin`` and ``end`` markers in ``path`` (appended if absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{begin}\n{body}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def rss_bytes(pid: int, field: str) -> int:
    """VmRSS or VmHWM of a process and its descendants together, bytes (a sum of each one's peak for VmHWM)."""
    total = 0
    for member in process_tree(pid):
        for line in pathlib.Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                total += int(line.split()[1]) * 1024
    return total


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux clear_refs value 5) in the process and its descendants."""
    for member in process_tree(pid):
        pathlib.Path(f"/proc/{member}/clear_refs").write_text("5")


def save_weights(architecture: str, path: pathlib.Path) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(architecture, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _inputs(model):
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    pixels = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)(
        Image.open(PHOTO).convert("RGB")
    )[None]
    return pixels, open_clip.get_tokenizer("ViT-B-32")([CAPTION])


def exclip_worker(weights: str, out: str) -> None:
    """Child process: time one exclip explanation of ViT-B-32; prints JSON, saves the attribution."""
    import open_clip
    import torch
    from exclip import OpenClipExplainer

    model = open_clip.create_model("ViT-B-32", pretrained=weights).eval()
    pixels, tokens = _inputs(model)
    explainer = OpenClipExplainer(model, device=torch.device("cpu"))
    pid = os.getpid()
    idle = rss_bytes(pid, "VmRSS")
    reset_peak(pid)
    start = time.perf_counter()
    attribution, score, *_ = explainer.explain(
        tokens, pixels, text_layer=11, image_layer=11, N=10, compute_lhs_terms=True
    )
    seconds = time.perf_counter() - start
    np.save(out, attribution.numpy())
    peak = rss_bytes(pid, "VmHWM")
    print(json.dumps({"seconds": seconds, "added_bytes": peak - idle, "peak_bytes": peak, "score": score}))


def forward_seconds(architecture: str, weights: str, repeats: int = 5) -> float:
    """Median wall seconds of one plain forward pass of both towers (batch 1, no grad)."""
    import open_clip
    import torch

    model = open_clip.create_model(architecture, pretrained=weights).eval()
    pixels, tokens = _inputs(model)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model.encode_image(pixels)
            model.encode_text(tokens)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def quadrature_sweep(max_n: int = 16) -> tuple[list[str], tuple[str, int]]:
    """Rows of the sweep table and the cheapest (method, n_steps) as accurate as exclip's rule at 50."""
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    from explain_server.engine.attribution import ChunkBudget
    from explain_server.engine.explainer import Explainer
    from explain_server.engine.quadrature import METHODS
    from explain_server.inputs import tokenize

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    explainer = Explainer.for_clip(
        model, sot_token_id=tokenizer.sot_token_id, eot_token_id=tokenizer.eot_token_id, budget=ChunkBudget(128 * MIB)
    )
    transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    rng = np.random.default_rng(0)
    images = [Image.open(PHOTO).convert("RGB")] + [
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(2)
    ]
    captions = [CAPTION, "a photo of a dog", "two red apples on a wooden table next to a glass of milk"]
    pairs = [(tokenize(tokenizer, c).token_ids, transform(i)) for c, i in zip(captions, images)]

    def deltas(method: str, n: int) -> np.ndarray:
        return np.array(
            [
                abs(
                    explainer.explain(
                        ids, px, text_layer=11, image_layer=11, method=method, n_steps=n
                    ).convergence_delta
                )
                for ids, px in pairs
            ]
        )

    right, left = deltas("riemann_right", 50), deltas("riemann_left", 50)
    yardstick = np.minimum(right, left)  # the stricter of the two first-order rules, per pair
    rows = [
        f"| riemann_right (exclip's rule) | 50 | {right.mean():.2e} | yardstick (per pair, the smaller of these two) |",
        f"| riemann_left | 50 | {left.mean():.2e} | yardstick |",
    ]
    best = ("riemann_right", 50)
    for method in METHODS:
        for n in range(2 if method == "riemann_trapezoid" else 1, max_n + 1):
            got = deltas(method, n)
            if np.all(got <= yardstick):
                rows.append(f"| {method} | {n} | {got.mean():.2e} | fewest n_steps at or below the yardstick |")
                best = min(best, (method, n), key=lambda mn: mn[1])
                break
        else:
            rows.append(f"| {method} | > {max_n} | {got.mean():.2e} (at {max_n}) | not reached |")
    return rows, best


class Server(ServerProcess):
    """``explain-server`` with ``args`` on a free loopback port, and a client of it, once SERVING.

    By default the server runs on the CPU, logs warnings only and serves no metrics. With
    ``defaults=True`` it gets nothing but ``args`` and its ports (metrics at ``metrics_url``),
    as a user who starts it without flags does.
    """

    def __init__(self, args: list[str], *, defaults: bool = False, env: dict[str, str] | None = None):
        from explain_client import ExplainClient

        quiet = [] if defaults else ["--device", "cpu", "--log-level", "WARNING"]
        super().__init__([*quiet, *args], metrics=defaults, env=env)
        self.wait_serving(timeout=1800)
        self.client = ExplainClient(self.target, timeout=3600)

    def measure(self, repeats: int, **options) -> dict:
        """Median wall seconds, the most memory added, and the explanation of the bundled photo."""
        image = PHOTO.read_bytes()
        idle = rss_bytes(self.process.pid, "VmRSS")
        times, peaks = [], []
        for _ in range(repeats):
            reset_peak(self.process.pid)
            start = time.perf_counter()
            explanation = self.client.explain(image, CAPTION, **options)
            times.append(time.perf_counter() - start)
            peaks.append(rss_bytes(self.process.pid, "VmHWM"))
        return {
            "seconds": statistics.median(times),
            "added_bytes": max(peaks) - idle,
            "peak_bytes": max(peaks),
            "explanation": explanation,
        }

    def close(self) -> None:
        self.client.close()
        self.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="explanations per setting (median)")
    parser.add_argument("--record", type=pathlib.Path, help="markdown file whose section to replace")
    parser.add_argument("--exclip-worker", nargs=2, metavar=("WEIGHTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.exclip_worker:
        exclip_worker(*args.exclip_worker)
        return 0

    import torch

    from explain_server.model_spec import DEFAULT_METHOD, DEFAULT_N_STEPS

    sweep_rows, best = quadrature_sweep()
    default = (DEFAULT_METHOD, DEFAULT_N_STEPS)
    rows, notes = [], []
    header = (
        "| model | layers (text, image) | method | n_steps | wall s | added MiB | abs(convergence delta) "
        "| x exclip | x forward |\n|---|---|---|---:|---:|---:|---:|---:|---:|"
    )
    settings = {
        "ViT-B-32": [(None, *EXCLIP_RULE), (None, "riemann_right", 50), (None, *default)]
        + [((layer, layer), *default) for layer in (0, 3, 6, 9)],
        "ViT-B-16": [(None, *EXCLIP_RULE), (None, *default)],
        "ViT-L-14": [(None, *EXCLIP_RULE), (None, *default)],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for architecture, runs in settings.items():
            weights = pathlib.Path(tmp) / f"{architecture}.safetensors"
            save_weights(architecture, weights)
            forward = forward_seconds(architecture, str(weights))
            exclip = None
            if architecture == "ViT-B-32":
                out = pathlib.Path(tmp) / "exclip.npy"
                child = subprocess.run(
                    [sys.executable, __file__, "--exclip-worker", str(weights), str(out)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                exclip = json.loads(child.stdout.strip().splitlines()[-1])
                exclip["attribution"] = np.load(out)
            # cache off: repeats of one pair must be computed, not served from the factor cache
            server = Server(["--model", f"m={architecture}:{weights}", "--factor-cache-mb", "0"])
            timing: dict[tuple[str, int], float] = {}
            try:
                for layers, method, n_steps in runs:
                    options = {"method": method, "n_steps": n_steps}
                    if layers is not None:
                        options["text_layer"], options["image_layer"] = layers
                    m = server.measure(args.repeats, **options)
                    exp = m["explanation"]
                    if layers is None:
                        timing[(method, n_steps)] = m["seconds"]
                    ratio = "-"
                    if exclip is not None and (layers, method, n_steps) == (None, *EXCLIP_RULE):
                        ratio = f"{m['seconds'] / exclip['seconds']:.4f}"
                        diff = np.linalg.norm(exp.attribution - exclip["attribution"]) / np.linalg.norm(
                            exclip["attribution"]
                        )
                        notes.append(
                            f"- exclip on ViT-B-32: {exclip['seconds']:.1f} s, adds {exclip['added_bytes'] / MIB:.0f} MiB; "
                            f"the service is **{exclip['seconds'] / m['seconds']:.0f}x faster** and adds "
                            f"**{m['added_bytes'] / exclip['added_bytes']:.4f}** of exclip's memory; attributions agree to "
                            f"{diff:.1e} relative L2, scores to {abs(exp.score - exclip['score']):.1e}."
                        )
                        notes.append(
                            f"- peak RSS while explaining (model loaded, VmHWM reset just before): service "
                            f"{m['peak_bytes'] / GIB:.2f} GiB, exclip {exclip['peak_bytes'] / GIB:.2f} GiB, "
                            f"ratio **{m['peak_bytes'] / exclip['peak_bytes']:.3f}**."
                        )
                    rows.append(
                        f"| {architecture} | {exp.options.text_layer}, {exp.options.image_layer} | {method} | {n_steps} "
                        f"| {m['seconds']:.3f} | {m['added_bytes'] / MIB:.0f} | {abs(exp.convergence_delta):.2e} "
                        f"| {ratio} | {m['seconds'] / forward:.2f} |"
                    )
                notes.append(f"- one plain forward pass of both towers, {architecture}: {forward * 1000:.0f} ms.")
                if architecture == "ViT-B-32":
                    notes.append(
                        f"- ViT-B-32 default ({default[0]}, {default[1]}) against riemann_right at n_steps=10 (riemann_left costs the same): "
                        f"**{timing[default] / timing[EXCLIP_RULE]:.2f}** of the wall time."
                    )
            finally:
                server.close()

    body = "\n".join(
        [
            "## Explanation cost (issues 2 and 6)",
            "",
            f"`make bench` (`benchmarks/bench_engine.py`), {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
            f"{os.cpu_count()} CPU cores, torch {torch.__version__}, CPU, float32, seeded random weights from "
            f'local files, the bundled photo (451x300) and the caption "{CAPTION}".',
            "",
            header,
            *rows,
            "",
            *notes,
            "",
            "### Quadrature sweep (ViT-B-32, last-block inputs, 3 image-caption pairs)",
            "",
            "| method | n_steps | mean abs(convergence delta) | |\n|---|---:|---:|---|",
            *sweep_rows,
            "",
            f"Cheapest setting as accurate as both first-order rules at n_steps=50: **{best[0]}, n_steps={best[1]}**; "
            f"service default: **{default[0]}, n_steps={default[1]}**"
            + (
                "."
                if best == default
                else " (differs from the sweep: update model_spec.DEFAULT_METHOD / DEFAULT_N_STEPS)."
            ),
        ]
    )
    print(body)
    if args.record:
        record(args.record, body, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
