"""Each family's default layers and quadrature, by measurement (issue 22, scope item 6).

For one real-size model per family (seeded random weights, CPU, float32, one torch thread) and
3 caption-image pairs, at the candidate layers of each tower (the last block's or stage's input,
and the pooling head's input unless the head reads one row only: class-token, end-token or
last-token pooling would put every attribution on that row), and for every quadrature rule:

- the yardstick is the |convergence delta| of riemann_left at n_steps=50 at the same layers,
  per pair;
- a rule's n_steps is the fewest (up to 16) whose |delta| is at or below the yardstick on every
  pair;
- each (text layer, image layer) candidate takes its cheapest rule (fewest nodes: every rule
  costs the same per node) and is timed as two ``Explainer.factors`` calls, one per tower;
- the default is the fastest candidate.

The convergence delta depends on the factors only through their column sums, the path
integrals sum_k w_k J(h(a_k)) (h - h^r) of each tower (see ``pair_delta``): one JVP per node
with the whole path delta as tangent. The integrand is sampled at 41 Chebyshev points of [0, 1]
and interpolated (barycentric formula; the towers are analytic along the path), so any rule's
sum costs no more passes; the yardstick and each chosen setting are then evaluated directly at
their own nodes, and the delta of one setting is checked against a full explanation.

``--record FILE`` replaces this script's section in FILE (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

BEGIN, END = "<!-- BEGIN choose_defaults -->", "<!-- END choose_defaults -->"
RULES = ("gausslegendre", "riemann_middle", "riemann_trapezoid", "riemann_left", "riemann_right")
MAX_N = 16
CHEBYSHEV = 40  # degree: 41 samples


def _chebyshev() -> tuple[np.ndarray, np.ndarray]:
    """Chebyshev points of the second kind on [0, 1] and their barycentric weights."""
    j = np.arange(CHEBYSHEV + 1)
    points = (np.cos(np.pi * j / CHEBYSHEV) + 1) / 2
    weights = (-1.0) ** j
    weights[[0, -1]] /= 2
    return points, weights


def _interpolate(points: np.ndarray, bary: np.ndarray, values: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The interpolant of ``values`` (n_points, D) at ``at`` (K,), (K, D)."""
    diff = at[:, None] - points[None]
    exact = np.isclose(diff, 0.0, atol=1e-15)
    diff[exact] = 1.0
    kernel = bary[None] / diff
    out = (kernel @ values) / kernel.sum(1, keepdims=True)
    for k, i in zip(*np.nonzero(exact)):
        out[k] = values[i]
    return out


def worker(architecture: str, time_all: bool) -> dict:
    """Measure one model; returns the JSON-able table rows and the choice."""
    import torch

    torch.set_num_threads(1)
    from family_models import build, single_row
    from torch.func import jvp

    from explain_server.engine.explainer import Side
    from explain_server.engine.quadrature import nodes_and_weights

    bench = build(architecture)
    explainer = bench.explainer
    towers = {"text": explainer.text, "image": explainer.image}
    inputs = {"text": bench.captions, "image": bench.images}

    def candidates(side: str) -> list[int]:
        tower = towers[side]
        head = len(tower.layers) - 1
        layers = [head - 1]
        hidden, lengths = explainer._lower(tower, [inputs[side][0]], head)
        if not single_row(tower, head, hidden, lengths):
            layers.append(head)
        return layers

    layers = {side: candidates(side) for side in towers}
    points, bary = _chebyshev()

    # per side, layer and pair: endpoints (2, D) and the integrand at the Chebyshev points (41, D)
    state: dict = {}
    with torch.no_grad():
        for side, tower in towers.items():
            for layer in layers[side]:
                for p, x in enumerate(inputs[side]):
                    hidden, lengths = explainer._lower(tower, [x], layer)
                    reference = explainer._reference(tower, layer)[: hidden.shape[1]]
                    ends = tower.upper(torch.stack([hidden[0], reference]), layer, lengths.repeat(2))
                    state[side, layer, p] = (hidden[0], reference, lengths, ends.double().numpy())

    def integrand(side: str, layer: int, p: int, alphas: np.ndarray) -> np.ndarray:
        """J(h(a)) (h - h^r) at each of ``alphas``, (K, D) float64."""
        hidden, reference, lengths, _ = state[side, layer, p]
        delta = hidden - reference
        out = []
        with torch.no_grad():
            for chunk in np.array_split(alphas, max(1, len(alphas) // 8)):
                a = torch.tensor(chunk, dtype=hidden.dtype)[:, None, None]
                path = reference + a * delta
                tangent = delta.expand_as(path)
                out.append(
                    jvp(lambda h: towers[side].upper(h, layer, lengths.repeat(len(chunk))), (path,), (tangent,))[1]
                )
        return torch.cat(out).double().numpy()

    samples = {key: integrand(*key, points) for key in state}

    def pair_delta(lt: int, li: int, p: int, sums: tuple[np.ndarray, np.ndarray]) -> float:
        """Explainer.combine's convergence delta from the two path integrals (column sums of T and V)."""
        (e_t, r_t), (e_v, r_v) = state["text", lt, p][3], state["image", li, p][3]
        norm = np.linalg.norm(e_t) * np.linalg.norm(e_v)
        total = (sums[0] @ sums[1] + r_t @ e_v + e_t @ r_v - r_t @ r_v) / norm
        return float(e_t @ e_v / norm - total)

    def rule_sum(side, layer, p, method, n, direct=False):
        alphas, weights = nodes_and_weights(method, n)
        values = (
            integrand(side, layer, p, alphas) if direct else _interpolate(points, bary, samples[side, layer, p], alphas)
        )
        return weights @ values

    def deltas(lt, li, method, n, direct=False) -> np.ndarray:
        return np.array(
            [
                abs(
                    pair_delta(
                        lt,
                        li,
                        p,
                        (rule_sum("text", lt, p, method, n, direct), rule_sum("image", li, p, method, n, direct)),
                    )
                )
                for p in range(len(bench.captions))
            ]
        )

    # the delta formula against a full explanation, at the cheapest layers
    lt, li = layers["text"][-1], layers["image"][-1]
    full = explainer.explain(
        bench.captions[0], bench.images[0], text_layer=lt, image_layer=li, method="gausslegendre", n_steps=2
    ).convergence_delta
    mine = pair_delta(
        lt,
        li,
        0,
        (rule_sum("text", lt, 0, "gausslegendre", 2, True), rule_sum("image", li, 0, "gausslegendre", 2, True)),
    )

    timings: dict[tuple[str, int, int], float] = {}

    def seconds(side: str, layer: int, n: int) -> float:
        key = (side, layer, n)
        if key not in timings:
            side_input = Side(inputs[side][0], layer, "gausslegendre", n)
            explainer.factors(
                towers[side], [Side(inputs[side][1], layer, "gausslegendre", 1)]
            )  # warm: profile, reference
            start = time.perf_counter()
            explainer.factors(towers[side], [side_input])
            timings[key] = time.perf_counter() - start
        return timings[key]

    rows = []
    for lt in layers["text"]:
        for li in layers["image"]:
            yard = deltas(lt, li, "riemann_left", 50, direct=True)
            interpolated_yard = deltas(lt, li, "riemann_left", 50)
            found = {}
            for method in RULES:
                first = 2 if method == "riemann_trapezoid" else 1
                for n in range(first, MAX_N + 1):
                    if np.all(deltas(lt, li, method, n) <= yard):
                        found[method] = n
                        break
            best = min(found, key=lambda m: (found[m], RULES.index(m)))
            n = found[best]
            got = deltas(lt, li, best, n, direct=True)
            passes = bool(np.all(got <= yard))
            # without --time-all, an image tower's last block is not timed where its head is a
            # candidate: the generic path there costs one dense JVP of a block per position
            skip = not time_all and li != layers["image"][-1]
            t_text, t_image = seconds("text", lt, n), (float("nan") if skip else seconds("image", li, n))
            (e_t, r_t), (e_v, r_v) = state["text", lt, 0][3], state["image", li, 0][3]
            rows.append(
                {
                    "attributed": float((e_t - r_t) @ (e_v - r_v) / (np.linalg.norm(e_t) * np.linalg.norm(e_v))),
                    "text_layer": lt,
                    "image_layer": li,
                    "text_name": towers["text"].layers[lt].name,
                    "image_name": towers["image"].layers[li].name,
                    "yardstick": yard.tolist(),
                    "interpolation_error": float(np.max(np.abs(interpolated_yard - yard))),
                    "found": found,
                    "method": best,
                    "n_steps": n,
                    "delta": got.tolist(),
                    "direct_passes": passes,
                    "seconds": t_text + t_image,
                    "text_seconds": t_text,
                    "image_seconds": t_image,
                }
            )
    choice = min((r for r in rows if r["direct_passes"]), key=lambda r: (np.isnan(r["seconds"]), r["seconds"]))
    return {
        "architecture": architecture,
        "fast": bench.fast,
        "excluded_heads": [side for side in towers if len(layers[side]) == 1],
        "check": {"explain": full, "path_sums": mine},
        "rows": rows,
        "choice": choice,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=pathlib.Path, help="markdown file whose section to replace")
    parser.add_argument("--only", nargs="*", help="architectures (default: one per family)")
    parser.add_argument(
        "--time-all", action="store_true", help="also time the image towers' last blocks where the head is a candidate"
    )
    parser.add_argument(
        "--results", type=pathlib.Path, help="JSON lines of earlier workers (this script's stderr) to reuse"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.time_all)))
        return 0

    import torch
    from bench_engine import record
    from family_models import FAMILIES

    lines, choices, skipped = [], [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    earlier = {}
    if args.results:
        for line in args.results.read_text().splitlines():
            if line.startswith("{"):
                earlier[json.loads(line)["architecture"]] = json.loads(line)
    for family, architecture in FAMILIES.items():
        if args.only and architecture not in args.only:
            continue
        if architecture in earlier:
            child = subprocess.CompletedProcess([], 0, json.dumps(earlier[architecture]), "")
        else:
            child = subprocess.run(
                [sys.executable, __file__, "--worker", architecture, *(["--time-all"] if args.time_all else [])],
                capture_output=True,
                text=True,
                env=env,
            )
        if child.returncode:
            skipped.append(f"- {family} ({architecture}): not measured: {child.stderr.strip().splitlines()[-1]}")
            print(skipped[-1], file=sys.stderr)
            continue
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps(result), file=sys.stderr)
        choice = result["choice"]
        for row in result["rows"]:
            found = ", ".join(f"{m} {n}" for m, n in row["found"].items())
            chosen = " **default**" if row is choice or row == choice else ""
            lines.append(
                f"| {family} | {row['text_name']}, {row['image_name']} | {abs(row['attributed']):.1e} "
                f"| {max(row['yardstick']):.1e} | {found} "
                f"| {row['method']} {row['n_steps']} | {max(row['delta']):.1e} | "
                + (
                    "not timed"
                    if row["image_seconds"] != row["image_seconds"]  # NaN: not timed
                    else f"{row['text_seconds']:.2f} + {row['image_seconds']:.2f} = {row['seconds']:.2f}"
                )
                + f"{chosen} |"
            )
        check = result["check"]
        choices.append(
            f"- {family} ({architecture}): **text {choice['text_name']}, image {choice['image_name']}, "
            f"{choice['method']} n_steps={choice['n_steps']}**; fast path on: {', '.join(result['fast']) or 'neither tower'}; "
            f"head excluded (reads one row) on: {', '.join(result['excluded_heads']) or '-'}; "
            f"delta check: explain {check['explain']:.3e}, path sums {check['path_sums']:.3e}; "
            f"interpolation error of the yardstick at most "
            f"{max(r['interpolation_error'] for r in result['rows']):.0e}."
        )
    body = "\n".join(
        [
            "## Default layer and quadrature per family (issue 22)",
            "",
            f"`benchmarks/choose_defaults.py`, {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} "
            f"CPU cores shared with other jobs, one torch thread, torch {torch.__version__}, CPU, float32, seeded "
            "random weights (no pretrained weights: the deltas are those of untrained towers), 3 caption-image "
            "pairs (token ids of 9 to 19 tokens in the real vocabulary's range; the bundled photo and two noise "
            "images). Yardstick: riemann_left at n_steps=50 at the same layers, per pair (max over pairs shown). "
            "Each rule: the fewest n_steps (to 16) at or below the yardstick on every pair. Seconds: one "
            "caption's and one image's factors at the chosen n_steps (`Explainer.factors`, warm)"
            + (
                "."
                if args.time_all
                else "; an image tower's last block is not timed where its head is a candidate (`--time-all` "
                "times it: one dense JVP through the last block per position)."
            ),
            "",
            "| family | layers (text, image) | abs(sum of attributions), pair 1 | yardstick abs(delta) | fewest n_steps per rule | cheapest | "
            "its abs(delta) | seconds (text + image) |",
            "|---|---|---:|---:|---|---|---:|---:|",
            *lines,
            "",
            *choices,
            *skipped,
        ]
    )
    print(body)
    if args.record:
        record(args.record, body, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
