"""explain-monitor explain SAMPLE OUT: explain a traffic sample through a running service and
write one summary row per record to OUT, a directory of Parquet parts. A run with an OUT that
already holds rows skips their records, so an interrupted run carries on where it stopped.

Exit codes: 0 every record explained; 1 some failed for good (OUT/failures.parquet lists them
with their gRPC code and message; running again retries them); 2 bad arguments or a bad
sample (nothing sent); 130 stopped by SIGINT or SIGTERM (the calls in flight were finished and
written; running again carries on).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from explain_client.cli import add_credential_arguments, connection_credentials, layer_argument, positive_float
from explain_client.client import ExplainClient, bearer_metadata

__all__ = ["EXIT_FAILURES", "EXIT_INTERRUPTED", "EXIT_USAGE", "register", "run"]

EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _top_k(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be in [0, 100] (ExplainRequest.summary_top_k), got {text}")
    return value


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``explain`` to ``explain-monitor``'s subcommands; returns its parser."""
    p = subparsers.add_parser(
        "explain",
        help="explain a traffic sample, one summary row per record (Parquet)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sample", metavar="SAMPLE", help="traffic sample: .jsonl, .csv or .parquet")
    p.add_argument(
        "out",
        metavar="OUT",
        help="output directory of Parquet parts; a run with an OUT that holds rows skips their records",
    )
    p.add_argument("--format", choices=("jsonl", "csv", "parquet"), help="sample format (default: from the extension)")
    columns = p.add_argument_group("sample columns")
    for field, default, what in (
        ("caption", "caption", "caption text (required)"),
        ("image", "image", "image path, relative to the sample's folder or absolute"),
        ("image-bytes", "image_bytes", "encoded image: binary (Parquet) or base64 text"),
        ("id", "id", "record id (default when absent: the row number)"),
        ("timestamp", "timestamp", "ISO 8601 text or a timestamp type (UTC when zone-less)"),
        ("segment", "segment", "any text, e.g. a customer or a camera"),
    ):
        columns.add_argument(
            f"--{field}-column", default=default, metavar="NAME", help=f"{what} (default: %(default)s)"
        )
    conn = p.add_argument_group("service")
    conn.add_argument("--target", default="localhost:50051", help="server address (default: %(default)s)")
    conn.add_argument(
        "--load-balancing-policy", metavar="POLICY", help='e.g. "round_robin" (default: gRPC\'s pick_first)'
    )
    add_credential_arguments(conn)
    opts = p.add_argument_group("explanation (default: the model's)")
    opts.add_argument("--model", help="hosted model name (default: the server's default)")
    opts.add_argument(
        "--summary-top-k",
        type=_top_k,
        metavar="K",
        help="(word, cell) pairs kept, 0-100 (default: the server's, 10)",
    )
    opts.add_argument("--text-layer", type=layer_argument, metavar="L", help="text-tower layer: index or name")
    opts.add_argument("--image-layer", type=layer_argument, metavar="L", help="image-tower layer: index or name")
    opts.add_argument("--n-steps", type=int, metavar="N", help="quadrature nodes")
    opts.add_argument("--method", help='quadrature rule, e.g. "riemann_trapezoid"')
    run_group = p.add_argument_group("running")
    run_group.add_argument(
        "--concurrency", type=_positive_int, default=8, metavar="N", help="most calls in flight (default: %(default)s)"
    )
    run_group.add_argument(
        "--max-retries",
        type=_non_negative_int,
        default=8,
        metavar="N",
        help="retries of a call that got UNAVAILABLE or RESOURCE_EXHAUSTED, with exponential backoff and "
        "jitter (default: %(default)s)",
    )
    run_group.add_argument(
        "--timeout", type=positive_float, default=60.0, metavar="SECONDS", help="deadline of each call (default: 60)"
    )
    run_group.add_argument(
        "--flush-rows",
        type=_positive_int,
        default=64,
        metavar="N",
        help="write a part every N rows (default: %(default)s); after a SIGKILL the next run explains again "
        "the rows not yet written (at most N - 1) and the calls that were in flight",
    )
    run_group.add_argument(
        "--flush-seconds",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="or once the oldest unwritten row is S seconds old (default: 30)",
    )
    run_group.add_argument("--quiet", action="store_true", help="no progress bar (none either when not a terminal)")
    p.set_defaults(run=run)
    return p


def _columns(args: argparse.Namespace) -> Any:
    from explain_client.monitor.sample import Columns

    return Columns(
        caption=args.caption_column,
        image=args.image_column,
        image_bytes=args.image_bytes_column,
        id=args.id_column,
        timestamp=args.timestamp_column,
        segment=args.segment_column,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``explain-monitor explain``; returns the exit code (module docstring)."""
    prog = "explain-monitor explain"
    # The monitor extra's libraries load here, not at import: `pip install .` alone must still
    # run `explain-monitor --help`.
    try:
        from tqdm import tqdm

        from explain_client.monitor.explaining import Backoff, Outcome, SummaryCaller, explain_records
        from explain_client.monitor.sample import SampleError, read_sample
        from explain_client.monitor.store import SummaryWriter, write_failures
    except ImportError as err:
        print(f"{prog}: error: {err.name} is missing: pip install 'clip-explain[monitor]'", file=sys.stderr)
        return EXIT_USAGE
    try:
        records = read_sample(args.sample, fmt=args.format, columns=_columns(args))
        credentials, token = connection_credentials(args)
        metadata = bearer_metadata(token)
        writer = SummaryWriter(args.out, flush_rows=args.flush_rows, flush_seconds=args.flush_seconds)
    except (SampleError, OSError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    todo = [record for record in records if record.record_id not in writer.done]
    already = len(records) - len(todo)
    stop = threading.Event()
    failures: list[dict[str, Any]] = []
    explained = 0

    def on_signal(signum: int, _frame: Any) -> None:
        print(
            f"\n{prog}: {signal.Signals(signum).name}: finishing the calls in flight (again to quit at once); "
            "run again to carry on",
            file=sys.stderr,
        )
        stop.set()
        # a second signal gets the usual behaviour: KeyboardInterrupt, or the end for SIGTERM
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(
        total=len(records),
        initial=already,
        unit="record",
        desc="explain",
        file=sys.stderr,
        disable=args.quiet or not sys.stderr.isatty(),
    )

    def handle(outcome: Outcome) -> None:
        nonlocal explained
        if outcome.row is not None:
            writer.add(outcome.row)
            explained += 1
            bar.update()
        elif outcome.failure is not None:
            failures.append(outcome.failure)
            bar.update()

    try:
        with ExplainClient(
            args.target, credentials=credentials, token=token, load_balancing_policy=args.load_balancing_policy
        ) as client:
            caller = SummaryCaller(
                client.channel,
                metadata=metadata,
                timeout=args.timeout,
                max_retries=args.max_retries,
                backoff=Backoff(),
                model=args.model,
                text_layer=args.text_layer,
                image_layer=args.image_layer,
                n_steps=args.n_steps,
                method=args.method,
                summary_top_k=args.summary_top_k,
            )
            explain_records(
                todo, caller.explain, handle, concurrency=args.concurrency, stop=stop, tick=writer.flush_if_due
            )
    finally:
        writer.flush()
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failures_path = write_failures(args.out, failures)
    left = len(todo) - explained - len(failures)
    print(
        f"{prog}: {explained} explained, {already} already in {args.out}, {len(failures)} failed"
        + (f" (see {failures_path})" if failures else "")
        + (f", {left} not started (stopped)" if left else ""),
        file=sys.stderr,
    )
    if stop.is_set():
        return EXIT_INTERRUPTED
    if failures:
        return EXIT_FAILURES
    return 0
