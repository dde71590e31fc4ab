"""The reports of ``explain-monitor compare``: the comparison as JSON, and as one self-contained
HTML file (Jinja2 template ``templates/report.html.j2``, figures embedded as PNG data URIs)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jinja2
import numpy as np
import pyarrow as pa

from explain_client.monitor import plots
from explain_client.monitor.schema import SCALARS

__all__ = ["render_html", "to_json", "write_html", "write_json"]


def _plain(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has none of them), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def to_json(comparison: dict[str, Any]) -> str:
    """The comparison as strict JSON (no NaN), keys in the dict's order, indented."""
    return json.dumps(_plain(comparison), indent=2, allow_nan=False)


def write_json(comparison: dict[str, Any], path: str | os.PathLike) -> None:
    """Write :func:`to_json` to ``path``.

    Raises:
        OSError: the file cannot be written.
    """
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(to_json(comparison) + "\n")


def _finite(table: pa.Table, signal: str) -> np.ndarray:
    values = table.column(signal).to_numpy(zero_copy_only=False).astype(np.float64)
    return values[np.isfinite(values)]


_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("explain_client.monitor", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters["num"] = lambda v, digits=3: "–" if v is None else f"{v:.{digits}f}"
_ENV.filters["p"] = lambda v: "–" if v is None else f"{v:.2g}"


def render_html(
    comparison: dict[str, Any],
    baseline: pa.Table,
    current: pa.Table,
    overlays: Sequence[dict[str, Any]] | None = None,
    *,
    overlay_note: str = "",
) -> str:
    """The report as one HTML document.

    Args:
        comparison: :func:`comparison.compare_tables`'s dict.
        baseline, current: the tables compared (the scalar distributions are drawn from them).
        overlays: :func:`overlays.explain_overlays`'s list, parallel to
            ``comparison["changed_records"]``; None = no overlays (``overlay_note`` says why).
    """
    figures = {
        "scalars": plots.scalar_panels(
            {s: _finite(baseline, s) for s in SCALARS},
            {s: _finite(current, s) for s in SCALARS},
            comparison["scalars"]["overall"],
        ),
        "movers": plots.movers_chart(comparison["top_movers"]) if comparison["top_movers"] else None,
        "ungrounded": plots.share_chart(
            comparison["ungrounded"],
            title="Ungrounded object words",
            xlabel="share of occurrences ungrounded (relevance or concentration below threshold)",
        ),
        "coverage": plots.share_chart(
            comparison["coverage"],
            title="Weakly grounded object words (coverage)",
            xlabel="share of occurrences with grounding concentration below the baseline's "
            f"{comparison['thresholds']['coverage_quantile']:g} quantile",
        ),
    }
    return _ENV.get_template("report.html.j2").render(
        c=comparison, figures=figures, overlays=overlays, overlay_note=overlay_note, signals=SCALARS
    )


def write_html(html: str, path: str | os.PathLike) -> None:
    """Write the document ``render_html`` made.

    Raises:
        OSError: the file cannot be written.
    """
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(html)
