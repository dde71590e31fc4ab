"""One ViT-B-32 explanation through the service against exclip 1.1, in one run on this machine.

Both sides use the same seeded random ViT-B-32 weights (a local safetensors file), the same
image and caption, and exclip's settings (input of the last block in both towers, n_steps=10,
exclip's references; Captum's name for exclip's rule is riemann_right).

Measured:
- wall seconds of one explanation: end to end through the gRPC client for the service
  (median of --repeats), ``OpenClipExplainer.explain`` for exclip (one run: it takes minutes);
- peak RSS of each process while explaining (VmHWM reset through /proc/PID/clear_refs once the
  model is loaded and idle), what that adds above the idle loaded model, and, apart, the peak
  while loading (open_clip builds the model, then copies the weights file into it);
- one plain forward pass of both towers (median), for scale.

``--record FILE`` replaces the section between this benchmark's markers in FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

CAPTION = "a tabby cat with green eyes and a pink nose"
PHOTO = pathlib.Path(__file__).resolve().parent.parent / "server" / "explain_server" / "assets" / "chelsea.jpg"
BEGIN, END = "<!-- BEGIN bench_exclip -->", "<!-- END bench_exclip -->"


def rss_bytes(pid: int, field: str) -> int:
    """VmRSS or VmHWM of a process, bytes."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux clear_refs value 5)."""
    pathlib.Path(f"/proc/{pid}/clear_refs").write_text("5")


def save_weights(path: pathlib.Path) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def exclip_worker(weights: str, out: str) -> None:
    """Child process: load, then time one exclip explanation; prints JSON, saves the attribution to ``out``."""
    import open_clip
    import torch
    from exclip import OpenClipExplainer
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    model = open_clip.create_model("ViT-B-32", pretrained=weights).eval()
    pixels = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)(
        Image.open(PHOTO).convert("RGB")
    )[None]
    tokens = open_clip.get_tokenizer("ViT-B-32")([CAPTION])
    explainer = OpenClipExplainer(model, device=torch.device("cpu"))
    pid = os.getpid()
    idle = rss_bytes(pid, "VmRSS")
    load_peak = rss_bytes(pid, "VmHWM")
    reset_peak(pid)
    start = time.perf_counter()
    attribution, score, *_ = explainer.explain(
        tokens, pixels, text_layer=11, image_layer=11, N=10, compute_lhs_terms=True
    )
    seconds = time.perf_counter() - start
    np.save(out, attribution.numpy())
    print(json.dumps({
        "score": score,
        "seconds": seconds,
        "added_bytes": rss_bytes(pid, "VmHWM") - idle,
        "peak_bytes": rss_bytes(pid, "VmHWM"),
        "load_peak_bytes": load_peak,
    }))


def forward_seconds(weights: str, repeats: int) -> float:
    """Median wall seconds of one plain forward pass of both towers (batch 1, no grad)."""
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    model = open_clip.create_model("ViT-B-32", pretrained=weights).eval()
    pixels = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)(
        Image.open(PHOTO).convert("RGB")
    )[None]
    tokens = open_clip.get_tokenizer("ViT-B-32")([CAPTION])
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model.encode_image(pixels)
            model.encode_text(tokens)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def service_run(weights: str, repeats: int) -> dict:
    """Start the server on the weights file and time explanations through the client."""
    from explain_client import ExplainClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "explain_server", "--host", "127.0.0.1", "--port", str(port),
         "--model", f"b32=ViT-B-32:{weights}", "--device", "cpu", "--log-level", "WARNING"],
        stderr=subprocess.DEVNULL,
    )
    try:
        image = PHOTO.read_bytes()
        with ExplainClient(f"127.0.0.1:{port}", timeout=600) as client:
            client.wait_until_ready(timeout=600)
            idle = rss_bytes(server.pid, "VmRSS")
            load_peak = rss_bytes(server.pid, "VmHWM")
            times, peaks = [], []
            for _ in range(repeats):
                reset_peak(server.pid)
                start = time.perf_counter()
                explanation = client.explain(image, CAPTION, n_steps=10, method="riemann_right")
                times.append(time.perf_counter() - start)
                peaks.append(rss_bytes(server.pid, "VmHWM"))
        return {
            "attribution": explanation.attribution,
            "score": explanation.score,
            "seconds": statistics.median(times),
            "added_bytes": max(peaks) - idle,
            "peak_bytes": max(peaks),
            "load_peak_bytes": load_peak,
            "convergence_delta": explanation.convergence_delta,
        }
    finally:
        server.terminate()
        server.wait(timeout=60)


def table(service: dict, exclip: dict, forward: float, difference: float) -> str:
    gib = 1 << 30
    rows = [
        ("service (explain_server)", service),
        ("exclip 1.1 OpenClipExplainer", exclip),
    ]
    lines = [
        "| implementation | wall s | peak RSS while explaining GiB | added above idle GiB "
        "| peak RSS while loading GiB | x exclip time | x forward pass |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['seconds']:.2f} | {r['peak_bytes'] / gib:.2f} | {r['added_bytes'] / gib:.3f} "
            f"| {r['load_peak_bytes'] / gib:.2f} "
            f"| {r['seconds'] / exclip['seconds']:.4f} | {r['seconds'] / forward:.1f} |"
        )
    lines += [
        "",
        f"- speed-up over exclip: **{exclip['seconds'] / service['seconds']:.1f}x**; "
        f"peak RSS (explaining) ratio service/exclip: **{service['peak_bytes'] / exclip['peak_bytes']:.3f}**; "
        f"added-memory ratio service/exclip: **{service['added_bytes'] / exclip['added_bytes']:.4f}**",
        f"- one plain forward pass of both towers: {forward * 1000:.0f} ms; "
        f"service |convergence delta| at n_steps=10: {abs(service['convergence_delta']):.2e}",
        f"- agreement: relative L2 difference of the attributions {difference:.2e}, "
        f"score difference {abs(service['score'] - exclip['score']):.1e}",
    ]
    return "\n".join(lines)


def record(path: pathlib.Path, body: str) -> None:
    """Replace this benchmark's section in ``path`` (appended if absent)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="service explanations to time (median)")
    parser.add_argument("--record", type=pathlib.Path, help="markdown file whose section to replace")
    parser.add_argument("--exclip-worker", nargs=2, metavar=("WEIGHTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.exclip_worker:
        exclip_worker(*args.exclip_worker)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        weights = pathlib.Path(tmp) / "vit-b-32-seed0.safetensors"
        save_weights(weights)
        service = service_run(str(weights), args.repeats)
        forward = forward_seconds(str(weights), 5)
        exclip_out = pathlib.Path(tmp) / "exclip.npy"
        child = subprocess.run(
            [sys.executable, __file__, "--exclip-worker", str(weights), str(exclip_out)],
            capture_output=True, text=True, check=True,
        )
        exclip = json.loads(child.stdout.strip().splitlines()[-1])
        reference = np.load(exclip_out)
    difference = float(np.linalg.norm(service["attribution"] - reference) / np.linalg.norm(reference))

    import torch

    body = "\n".join([
        "## One ViT-B-32 explanation vs exclip (issue 2)",
        "",
        f"`make bench` (`benchmarks/bench_exclip.py`), {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, CPU, float32. Seeded random ViT-B-32 weights "
        "from a local file; the bundled photo (451x300) and the caption "
        f"\"{CAPTION}\"; input of the last block in both towers, n_steps=10, exclip's rule (riemann_right).",
        "",
        table(service, exclip, forward, difference),
    ])
    print(body)
    if args.record:
        record(args.record, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
