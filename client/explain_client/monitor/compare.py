"""``explain-monitor compare BASELINE CURRENT``: drift between two summary tables, as an exit code,
a JSON and an HTML report, and optionally gauges on a Pushgateway."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
from typing import Any

from explain_client.monitor.thresholds import Thresholds

__all__ = ["EXIT_BAD_INPUT", "EXIT_DRIFT", "EXIT_NO_DRIFT", "register", "run", "thresholds_from"]

EXIT_NO_DRIFT = 0
EXIT_DRIFT = 1
EXIT_BAD_INPUT = 2

_EPILOG = """\
exit status:
  0  no drift: every statistic is within its threshold
  1  drift: at least one threshold crossed (the alerts are printed, and in --json / --html)
  2  bad input or undelivered result: a missing or unreadable table, a table without the summary
     schema's columns, an empty table, a bad flag, an unreadable --object-words file, a report
     that cannot be written, or a failed --pushgateway push

thresholds (defaults: two samples of a few hundred records from one generator do not alert):
  a scalar signal drifts when PSI >= max(--psi, its no-drift critical value) or when
  KS D >= --ks-min-statistic with p < --alpha / (number of KS tests); per segment likewise, for
  segments with >= --min-segment-records records in both tables. The word ranking drifts when its
  nDCG < --ndcg. The ungrounded object-word share drifts when it rises by >= --ungrounded-min-increase
  and a Mann-Whitney U test of the records' ungrounded fractions gives p < --alpha; the weakly
  grounded share (coverage: concentration below the baseline's --coverage-quantile) when it rises
  by >= --coverage-min-increase and the records' mean object-word concentrations fell, p < --alpha.
"""

# (flag type, help) of each Thresholds field; the flag is the field's name with dashes
_THRESHOLD_FLAGS: dict[str, tuple[Any, str]] = {
    "psi": (float, "PSI alert level (default %(default)s)"),
    "ks_min_statistic": (float, "smallest KS statistic D that alerts (default %(default)s)"),
    "alpha": (float, "family-wise significance level of the tests (default %(default)s)"),
    "psi_bins": (int, "PSI bins on the baseline's quantiles, at most (default %(default)s)"),
    "min_segment_records": (int, "records a segment needs in both tables to be tested (default %(default)s)"),
    "ndcg": (float, "word-ranking nDCG alert level, alerts below (default %(default)s, as Clarify)"),
    "min_word_count": (int, "occurrences a word needs in a table to count (default %(default)s)"),
    "ungrounded_relevance": (float, "an object word with relevance below this is ungrounded (default %(default)s)"),
    "ungrounded_concentration": (
        float,
        "an object word with grounding concentration below this is ungrounded (default %(default)s)",
    ),
    "ungrounded_min_increase": (float, "smallest rise of the ungrounded share that alerts (default %(default)s)"),
    "coverage_quantile": (
        float,
        "an object word grounded less sharply than this quantile of the baseline's is weakly grounded "
        "(default %(default)s)",
    ),
    "coverage_min_increase": (float, "smallest rise of the weakly grounded share that alerts (default %(default)s)"),
}


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``compare`` command to ``explain-monitor``'s subparsers; it runs :func:`run`."""
    parser = subparsers.add_parser(
        "compare",
        help="report drift between two summary tables",
        description="Compare a CURRENT summary table (explain-monitor explain) with a BASELINE one: PSI and KS of "
        "the scalar signals overall and per segment, nDCG of the global word-relevance ranking, the share of "
        "ungrounded and weakly grounded object words, the top moving words and the most changed records.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("baseline", metavar="BASELINE", help="baseline summary table: a Parquet file or directory")
    parser.add_argument("current", metavar="CURRENT", help="current summary table: a Parquet file or directory")
    reports = parser.add_argument_group("reports")
    reports.add_argument("--json", metavar="PATH", help="write every statistic, threshold and verdict as JSON")
    reports.add_argument("--html", metavar="PATH", help="write a self-contained HTML report")
    reports.add_argument("--top-movers", type=int, default=10, metavar="N", help="words listed (default %(default)s)")
    reports.add_argument(
        "--changed-records", type=int, default=6, metavar="N", help="records shown (default %(default)s)"
    )
    overlays = parser.add_argument_group("overlays of the most changed records (HTML report)")
    overlays.add_argument("--target", metavar="HOST:PORT", help="explain those records again here to draw heatmaps")
    overlays.add_argument(
        "--images-root",
        metavar="DIR",
        help="folder relative image paths are under (default: the folder that holds CURRENT)",
    )
    overlays.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds (default 30)")
    words = parser.add_argument_group("words")
    words.add_argument(
        "--object-words",
        metavar="FILE",
        help="the object words (one a line, # comments); default: every word outside a small stop-word list",
    )
    push = parser.add_argument_group("Pushgateway")
    push.add_argument("--pushgateway", metavar="URL", help="push the drift gauges to this Pushgateway")
    push.add_argument("--job", default="explain-monitor", help="the push's job label (default %(default)s)")
    push.add_argument(
        "--grouping-label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a grouping label of the push (repeatable), e.g. model=shapes",
    )
    limits = parser.add_argument_group("thresholds")
    defaults = Thresholds()
    for name, (kind, text) in _THRESHOLD_FLAGS.items():
        limits.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name), help=text)
    parser.set_defaults(run=run)
    return parser


def thresholds_from(args: argparse.Namespace) -> Thresholds:
    """The :class:`Thresholds` the flags give.

    Raises:
        ValueError: a value outside its range, naming the flag.
    """
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(Thresholds)}
    rules = {
        "psi": (values["psi"] > 0, "must be > 0"),
        "ks_min_statistic": (0 <= values["ks_min_statistic"] <= 1, "must be in [0, 1]"),
        "alpha": (0 < values["alpha"] < 1, "must be in (0, 1)"),
        "psi_bins": (values["psi_bins"] >= 2, "must be >= 2"),
        "min_segment_records": (values["min_segment_records"] >= 1, "must be >= 1"),
        "ndcg": (0 <= values["ndcg"] <= 1, "must be in [0, 1]"),
        "min_word_count": (values["min_word_count"] >= 1, "must be >= 1"),
        "ungrounded_concentration": (0 <= values["ungrounded_concentration"] <= 1, "must be in [0, 1]"),
        "ungrounded_min_increase": (0 <= values["ungrounded_min_increase"] <= 1, "must be in [0, 1]"),
        "coverage_quantile": (0 < values["coverage_quantile"] < 1, "must be in (0, 1)"),
        "coverage_min_increase": (0 <= values["coverage_min_increase"] <= 1, "must be in [0, 1]"),
    }
    for name, (ok, rule) in rules.items():
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} {rule}; got {values[name]}")
    return Thresholds(**values)


def _grouping(labels: list[str]) -> dict[str, str]:
    pairs = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--grouping-label must be KEY=VALUE; got {item!r}")
        pairs[key] = value
    return pairs


def _prepare_report_path(flag: str, path: str) -> None:
    """Create the folders a report file goes in, before any work (a report that cannot be
    written would otherwise fail after the comparison).

    Raises:
        ValueError: naming ``flag``: the path is a folder, or its folder cannot be made.
    """
    target = pathlib.Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot make its folder: {err.strerror or err}") from None


def _fail(message: str) -> int:
    print(f"explain-monitor compare: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run(args: argparse.Namespace) -> int:
    """Run ``compare`` with parsed ``args``; returns the exit status (see the module's constants)."""
    # The monitor extra's libraries load here, not at import: `pip install .` alone must still
    # run `explain-monitor --help`.
    try:
        from explain_client.monitor.comparison import compare_tables
        from explain_client.monitor.push import push
        from explain_client.monitor.report import write_json
        from explain_client.monitor.tables import TableError, read_summaries
        from explain_client.monitor.words import read_object_words
    except ImportError as err:
        return _fail(f"{err.name} is missing: pip install 'clip-explain[monitor]'")
    try:
        thresholds = thresholds_from(args)
        grouping = _grouping(args.grouping_label)
        if args.top_movers < 0 or args.changed_records < 0:
            raise ValueError("--top-movers and --changed-records must be >= 0")
        if not args.timeout > 0:
            raise ValueError(f"--timeout must be > 0 seconds; got {args.timeout}")
        for flag, path in (("--json", args.json), ("--html", args.html)):
            if path:
                _prepare_report_path(flag, path)
        try:
            object_words = read_object_words(args.object_words) if args.object_words else None
        except OSError as err:
            raise ValueError(f"--object-words {args.object_words}: {err.strerror}") from None
        baseline = read_summaries(args.baseline, role="baseline")
        current = read_summaries(args.current, role="current")
    except (TableError, ValueError) as err:
        return _fail(str(err))

    comparison = compare_tables(
        baseline,
        current,
        thresholds,
        object_words=object_words,
        baseline_path=args.baseline,
        current_path=args.current,
        movers=args.top_movers,
        records=args.changed_records,
    )
    print(f"{'DRIFT' if comparison['drift'] else 'no drift'}: {args.current} vs baseline {args.baseline}")
    for alert in comparison["alerts"]:
        print(f"  {alert}")
    for warning in comparison["warnings"]:
        print(f"explain-monitor compare: warning: {warning}", file=sys.stderr)

    try:
        if args.json:
            write_json(comparison, args.json)
    except OSError as err:
        return _fail(f"--json {args.json}: {err.strerror or err}")
    try:
        if args.html:
            _write_html(args, comparison, baseline, current)
    except OSError as err:
        return _fail(f"--html {args.html}: {err.strerror or err}")
    except ValueError as err:  # a --target ExplainClient refuses
        return _fail(str(err))
    if args.pushgateway:
        try:
            push(comparison, args.pushgateway, job=args.job, grouping_key=grouping)
        except OSError as err:
            return _fail(f"--pushgateway {args.pushgateway}: {err}")
    return EXIT_DRIFT if comparison["drift"] else EXIT_NO_DRIFT


def _write_html(args: argparse.Namespace, comparison: dict[str, Any], baseline: Any, current: Any) -> None:
    from explain_client.monitor.overlays import explain_overlays
    from explain_client.monitor.report import render_html, write_html

    overlays, note = None, "Overlays need --target HOST:PORT: the summary table carries no heatmaps."
    if args.target and not comparison["changed_records"]:
        note = "No record has a word the baseline saw often enough to compare."
    elif args.target:
        root = args.images_root or pathlib.Path(args.current).resolve().parent
        overlays = explain_overlays(comparison["changed_records"], args.target, root, timeout=args.timeout)
        for entry in overlays:
            if entry["error"]:
                print(
                    f"explain-monitor compare: no overlay of record {entry['record_id']}: {entry['error']}",
                    file=sys.stderr,
                )
    write_html(render_html(comparison, baseline, current, overlays, overlay_note=note), args.html)
