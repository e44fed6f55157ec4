"""The `latentrt` command: one verb per job.

Each verb lives in a light module exposing `add_arguments(parser)` and `run(args) -> int`;
heavy imports (torch, onnx) happen inside `run`, so `latentrt --help` stays fast.
Expected user errors (`LatentRTError`) print one line and exit non-zero without a traceback; so do
operating-system errors (full disk, read-only or missing folders, names too long), unreadable weights
(safetensors, ONNX, ONNX Runtime) and decompression-bomb images, which `describe_error` turns into
one actionable line. Anything else is a bug: one line and exit 1 (`-v` shows the traceback).
Output into a pipe whose reader has gone (`latentrt info X | head -1`) ends quietly, exit 141 as for SIGPIPE.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .errors import LatentRTError

VERBS = {
    "export": ("latentrt.export.cli", "export a checkpoint (diffusers folder, hub id, tiny:<family>) to ONNX"),
    "import-onnx": ("latentrt.export.cli_import", "import an ONNX folder exported by Hugging Face Optimum as a LatentRT export"),
    "build": ("latentrt.workflows.build", "build engines (TensorRT fp16 or ONNX Runtime) from an ONNX export"),
    "generate": ("latentrt.runtime.cli_generate", "generate images with built engines"),
    "demo": ("latentrt.workflows.demo", "export, build and run a built-in tiny model on the CPU, end to end"),
    "bench": ("latentrt.workflows.cli_bench", "profile latency per stage and compare backends side by side"),
    "serve": ("latentrt.runtime.cli_serve", "serve a pipeline over HTTP on 127.0.0.1 (POST /generate, GET /health)"),
    "info": ("latentrt.workflows.info", "say what a folder holds (checkpoint, ONNX export, engines)"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (and exit 2), like every other LatentRT error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="latentrt", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"latentrt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=OneLineParser)
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


# errno -> what the user can do about it
OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
    errno.EFBIG: "the file is larger than this system allows (file size limit): write elsewhere",
    errno.EACCES: "permission denied: pick a folder you can write to",
    errno.EPERM: "operation not permitted: pick a folder you can write to",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.ENAMETOOLONG: "the name is too long: use a shorter path",
    errno.EISDIR: "that is a folder, not a file: name a file",
    errno.ENOTDIR: "a part of that path is a file, not a folder",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "something already exists there",
    errno.EADDRINUSE: "the address is already in use: pick another --port (0 picks a free one)",
    errno.EADDRNOTAVAIL: "this machine has no such address: check --host",
}
THIRD_PARTY_LOADERS = {"safetensors": "weights file", "onnxruntime": "ONNX Runtime", "onnx": "ONNX model",
                       "google.protobuf": "ONNX model"}


def _first_line(text: object) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def describe_error(e: BaseException) -> str | None:
    """One actionable line for an expected failure outside LatentRT's own errors; None for a bug."""
    if isinstance(e, OSError) and e.errno is not None:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        hint = OS_HINTS.get(e.errno, e.strerror or errno.errorcode.get(e.errno, "error"))
        return f"{where + ': ' if where else ''}{hint} ({errno.errorcode.get(e.errno, e.errno)})"
    if isinstance(e, OSError):  # no errno: e.g. PIL's UnidentifiedImageError
        return _first_line(e) or type(e).__name__
    if isinstance(e, MemoryError):
        return "out of memory: use a smaller size, batch or fewer images per call"
    if type(e).__name__ == "DecompressionBombError":
        return f"the image is too large to open safely: {_first_line(e)}"
    module = type(e).__module__ or ""
    for prefix, what in THIRD_PARTY_LOADERS.items():
        if module == prefix or module.startswith(prefix + ".") or module.startswith(prefix + "._"):
            return f"cannot read the {what} ({type(e).__name__}): {_first_line(e)[:300]}; it may be damaged or " \
                   "incomplete: export or build it again"
    return None


EXIT_PIPE = 128 + 13  # what a shell reports for a program ended by SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; output into a closed pipe (`latentrt info X | head -1`) ends quietly with EXIT_PIPE."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not as a warning at interpreter exit
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # what is still buffered goes nowhere at exit (Python docs, signal)
        os.close(devnull)
        return EXIT_PIPE


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("urllib3", "PIL", "matplotlib", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args._run(args) or 0)
    except LatentRTError as e:
        print(f"latentrt {args.verb}: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        raise  # the reader went away (`| head`): not an error to report, see `main`
    except KeyboardInterrupt:
        print(f"latentrt {args.verb}: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into one line
        line = describe_error(e)
        if line is not None:
            logging.getLogger(__name__).debug("%s", line, exc_info=True)
            print(f"latentrt {args.verb}: error: {line}", file=sys.stderr)
            return 2
        if args.verbose:
            raise
        print(f"latentrt {args.verb}: internal error: {type(e).__name__}: {_first_line(e)[:300]} (a bug: please "
              "report it; -v shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
