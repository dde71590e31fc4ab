"""``make demo``: start a server on the embedded default model, explain a bundled photo, stop.

Everything runs offline: the default model is built locally (see ``config.DEFAULT_MODEL``)
and the photo ships with the package (Chelsea the cat, CC0, Stefan van der Walt, from
scikit-image's sample data).
"""

from __future__ import annotations

import argparse
import pathlib
import socket
import subprocess
import sys

from explain_client import ExplainClient, cli

from .config import DEFAULT_MODEL

PHOTO = pathlib.Path(__file__).parent / "assets" / "chelsea.jpg"
CAPTION = "a tabby cat with green eyes and a pink nose"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the client's exit code (0 on success)."""
    parser = argparse.ArgumentParser(prog="explain-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out/overlay.png", help="overlay PNG to write (default: %(default)s)")
    parser.add_argument("--span", default="green eyes", help="caption part to draw (default: %(default)s)")
    args = parser.parse_args(argv)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    target = f"127.0.0.1:{_free_port()}"
    print(f"starting explain-server on {target} with the embedded default model {DEFAULT_MODEL}")
    print(
        "NOTE: this default model has seeded RANDOM weights (no trained CLIP weights can be downloaded "
        "here). The numbers below show the method's arithmetic end to end; they do not show what a "
        "trained CLIP sees. Serve real weights with --model NAME=ARCH:PRETRAINED (see README)."
    )
    server = subprocess.Popen([sys.executable, "-m", "explain_server", "--host", "127.0.0.1", "--port", target.split(":")[1]])
    try:
        with ExplainClient(target) as client:
            model = client.wait_until_ready(timeout=600)[0]
        print(f"server ready: {model.name} ({model.architecture}, grid {model.grid[0]}x{model.grid[1]})\n")
        print(f"explaining {PHOTO.name} with the caption {CAPTION!r}\n")
        return cli.main([str(PHOTO), CAPTION, "--target", target, "--span", args.span, "--out", args.out, "--top", "8"])
    finally:
        server.terminate()
        server.wait(timeout=60)
        print("server stopped")


if __name__ == "__main__":
    sys.exit(main())
