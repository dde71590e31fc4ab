"""explain-monitor explain SAMPLE OUT: explain a traffic sample through a running service and
write one summary row per record to OUT, a directory of Parquet parts. A run with an OUT that
already holds rows skips their records, so an interrupted run carries on where it stopped.

Before sending anything it waits up to --connect-timeout for the service to answer ListModels
and checks --model, the layers, --method and --n-steps against what it hosts. The first records'
outcomes guard the rest: when the first 5 (or every record of a smaller sample) all fail with
the same code, the options must be wrong for every record and the run stops there.

Exit codes: 0 every record explained; 1 some failed for good (OUT/failures.parquet lists them
with their gRPC code and message, stderr counts them per code; running again retries them);
2 bad arguments, a bad sample, an OUT of another sample, a service that cannot be reached or
does not accept the options (nothing sent), or the first records all failed alike (the run
stopped); 130 stopped by SIGINT or SIGTERM (the calls in flight were finished and written;
running again carries on).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from explain_client.cli import (
    add_credential_arguments,
    connection_credentials,
    integer_argument,
    layer_argument,
    non_negative_int,
    positive_float,
)
from explain_client.client import ExplainClient, bearer_metadata
from explain_client.errors import ExplainError, UnavailableError
from explain_client.server_info import ModelInfo

__all__ = ["EXIT_FAILURES", "EXIT_INTERRUPTED", "EXIT_USAGE", "register", "run"]

EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
BREAKER_RECORDS = 5
"""The run stops when its first this many outcomes (or all, in a smaller sample) are failures
with one code: a wrong option or a service that refuses every call, not a few bad records. A
resumed run with fewer records left than that is not stopped."""


def _positive_int(text: str) -> int:
    value = integer_argument(text, ">= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _top_k(text: str) -> int:
    value = integer_argument(text, "in [0, 100]")
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
        ("id", "id", "record id; the row number when the sample has no such column"),
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
    conn.add_argument(
        "--connect-timeout",
        type=positive_float,
        default=60.0,
        metavar="SECONDS",
        help="longest wait for the service to answer before anything is sent; exit 2 when it does not (default: 60)",
    )
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
        type=non_negative_int,
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


def _foreign_record(records: list[Any], written: dict[str, tuple[str, str | None]], out: str) -> str | None:
    """Why the rows already in ``out`` (``SummaryWriter.written``) cannot be of the sample
    ``records``: record ids the sample lacks, else the first record in sample order whose
    caption or image (path, None for inline bytes, whose content the rows do not keep) differs
    from its row's; None when they all match."""
    missing = sorted(set(written) - {record.record_id for record in records})
    if missing:
        return (
            f"{out} holds {len(missing)} record ids that SAMPLE does not have, e.g. {missing[0]!r}: {_ANOTHER_SAMPLE}"
        )
    for record in records:
        if record.record_id not in written:
            continue
        caption, image = written[record.record_id]
        if caption != record.caption:
            what = f"another caption than SAMPLE's ({caption!r}; SAMPLE: {record.caption!r})"
        elif image != record.image_path:
            shown = [repr(path) if path is not None else "inline bytes" for path in (image, record.image_path)]
            what = f"another image than SAMPLE's ({shown[0]}; SAMPLE: {shown[1]})"
        else:
            continue
        return f"{out} holds record {record.record_id!r} with {what}: {_ANOTHER_SAMPLE}"
    return None


_ANOTHER_SAMPLE = "OUT belongs to another sample; use a new OUT"


def _option_error(args: argparse.Namespace, models: list[ModelInfo]) -> str | None:
    """What the service's ``models`` (ListModels) say is wrong with the explanation options, or
    None. The smallest ``n_steps`` of each method is not in ListModels: a request below it fails
    on the server, and the first records' failures stop the run."""
    model = next((m for m in models if (m.name == args.model if args.model is not None else m.is_default)), None)
    if model is None:
        hosted = ", ".join(m.name for m in models) or "none"
        return f"--model {args.model!r}: {args.target} hosts no such model (it hosts: {hosted})"
    if args.method is not None and args.method not in model.methods:
        return f"--method {args.method!r}: model {model.name!r} accepts {', '.join(model.methods)}"
    if args.n_steps is not None and not 1 <= args.n_steps <= model.max_n_steps:
        return f"--n-steps {args.n_steps}: model {model.name!r} accepts 1 to {model.max_n_steps}"
    for flag, value, count, layers in (
        ("--text-layer", args.text_layer, model.text_layers, model.text_layer_list),
        ("--image-layer", args.image_layer, model.image_layers, model.image_layer_list),
    ):
        if isinstance(value, int) and not -count <= value < count:
            return f"{flag} {value}: model {model.name!r} has {count} such layers, indices {-count} to {count - 1}"
        # servers that predate layer names list no layers; they answer a name themselves
        names = [layer.name for layer in layers]
        if isinstance(value, str) and names and value not in names:
            return f"{flag} {value!r}: model {model.name!r} has no such layer (its layers: {', '.join(names)})"
    return None


def _failure_lines(failures: list[dict[str, Any]]) -> list[str]:
    """One line per failure code: how many, and the first one's record and message."""
    by_code: dict[str, list[dict[str, Any]]] = {}
    for failure in failures:
        by_code.setdefault(failure["code"], []).append(failure)
    return [
        f"{len(group)} failed with {code}, e.g. record {group[0]['record_id']!r}: {group[0]['message']}"
        for code, group in sorted(by_code.items(), key=lambda item: -len(item[1]))
    ]


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
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(
            f"{prog}: error: OUT {args.out!r} is a file; OUT must be a directory (created if absent)", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        records = read_sample(args.sample, fmt=args.format, columns=_columns(args))
        credentials, token = connection_credentials(args)
        metadata = bearer_metadata(token)
        writer = SummaryWriter(args.out, flush_rows=args.flush_rows, flush_seconds=args.flush_seconds)
    except (SampleError, OSError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    foreign = _foreign_record(records, writer.written, args.out)
    if foreign:
        print(f"{prog}: error: {foreign}", file=sys.stderr)
        return EXIT_USAGE
    todo = [record for record in records if record.record_id not in writer.done]
    already = len(records) - len(todo)
    stop = threading.Event()
    failures: list[dict[str, Any]] = []
    explained = 0
    # of the sample, not of the records left: a resumed run with fewer left than that retries
    # records that failed one by one before, and its outcomes say nothing run-wide
    breaker_size = min(BREAKER_RECORDS, len(records))
    first_codes: list[str | None] = []  # this run's first outcomes: None explained, else the failure's code
    tripped: dict[str, Any] | None = None  # the failure that stopped the run

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

    def handle(outcome: Outcome) -> None:
        nonlocal explained, tripped
        if outcome.row is not None:
            writer.add(outcome.row)
            explained += 1
            bar.update()
        elif outcome.failure is not None:
            failures.append(outcome.failure)
            bar.update()
        else:
            return
        if len(first_codes) < breaker_size:
            first_codes.append(None if outcome.failure is None else outcome.failure["code"])
            if len(first_codes) == breaker_size and None not in first_codes and len(set(first_codes)) == 1:
                tripped = failures[0]
                stop.set()

    with ExplainClient(
        args.target, credentials=credentials, token=token, load_balancing_policy=args.load_balancing_policy
    ) as client:
        try:
            error = _option_error(args, client.wait_until_ready(args.connect_timeout))
        except UnavailableError as err:
            error = (
                f"--target {args.target}: no answer within --connect-timeout {args.connect_timeout:g} s "
                f"(is the service running there? {err.details})"
            )
        except ExplainError as err:
            error = f"--target {args.target}: ListModels failed with {err}"
        except KeyboardInterrupt:
            print(f"\n{prog}: stopped while waiting for --target {args.target}; nothing sent", file=sys.stderr)
            return EXIT_INTERRUPTED
        if error:
            print(f"{prog}: error: {error}; nothing sent", file=sys.stderr)
            return EXIT_USAGE
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(
            total=len(records),
            initial=already,
            unit="record",
            desc="explain",
            file=sys.stderr,
            disable=args.quiet or not sys.stderr.isatty(),
        )
        try:
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
    for line in _failure_lines(failures):
        print(f"{prog}: {line}", file=sys.stderr)
    if tripped is not None:
        scope = f"the first {breaker_size} records all" if breaker_size < len(todo) else f"all {breaker_size} records"
        print(
            f"{prog}: error: {scope} failed with {tripped['code']}: {tripped['message']}"
            + ("; nothing more sent" if left else ""),
            file=sys.stderr,
        )
        return EXIT_USAGE
    if stop.is_set():
        return EXIT_INTERRUPTED
    if failures:
        return EXIT_FAILURES
    return 0
