"""Generate the Python stubs of ``explain/v1/explain.proto`` into the ``explain_api`` package.

``make proto`` runs this; ``--check`` (used by the test suite) exits 1 when the committed
stubs differ from what the pinned grpcio-tools generates now.

protoc writes absolute imports (``from explain.v1 import explain_pb2``) that only resolve
with ``proto/`` on ``sys.path``; the stubs live in the ``explain_api`` package instead, so that
one import line is rewritten to the package path.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTO_FILE = "explain/v1/explain.proto"
OUT_DIR = ROOT / "api" / "explain_api"
GENERATED = ("explain_pb2.py", "explain_pb2.pyi", "explain_pb2_grpc.py")


def generate() -> dict[str, str]:
    """Run protoc and return {file name: text} of the stubs for ``explain_api``.

    Raises:
        RuntimeError: protoc failed (its message is on stderr).
    """
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO_FILE,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILE}")
        out = pathlib.Path(tmp) / "explain" / "v1"
        texts = {name: (out / name).read_text() for name in GENERATED}
    texts["explain_pb2_grpc.py"] = texts["explain_pb2_grpc.py"].replace(
        "from explain.v1 import explain_pb2", "from explain_api import explain_pb2"
    )
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args(argv)
    texts = generate()
    if args.check:
        stale = [n for n, t in texts.items() if not (OUT_DIR / n).exists() or (OUT_DIR / n).read_text() != t]
        if stale:
            print(f"stale generated stubs in {OUT_DIR}: {', '.join(stale)}; run `make proto`", file=sys.stderr)
            return 1
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (OUT_DIR / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
