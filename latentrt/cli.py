"""The `latentrt` command: one verb per job.

Each verb lives in a light module exposing `add_arguments(parser)` and `run(args) -> int`;
heavy imports (torch, onnx) happen inside `run`, so `latentrt --help` stays fast.
Expected user errors (`LatentRTError`) print one line and exit non-zero without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .errors import LatentRTError

VERBS = {
    "export": ("latentrt.export.cli", "export a checkpoint (diffusers folder, hub id, tiny:<family>) to ONNX"),
    "build": ("latentrt.engines.cli", "build engines (TensorRT fp16 or ONNX Runtime) from an ONNX export"),
    "generate": ("latentrt.runtime.cli_generate", "generate images with built engines"),
    "demo": ("latentrt.runtime.cli_demo", "export, build and run a built-in tiny model on the CPU, end to end"),
    "bench": ("latentrt.runtime.cli_bench", "profile latency per stage and compare backends side by side"),
    "serve": ("latentrt.runtime.cli_serve", "serve a pipeline over HTTP on 127.0.0.1 (POST /generate, GET /health)"),
    "info": ("latentrt.info", "say what a folder holds (checkpoint, ONNX export, engines)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentrt", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"latentrt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, (module, help_text) in VERBS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("latentrt"):
                continue  # verb not available in this build
            raise
        p = sub.add_parser(verb, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("urllib3", "PIL", "matplotlib", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args._run(args) or 0)
    except LatentRTError as e:
        print(f"latentrt {args.verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"latentrt {args.verb}: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
