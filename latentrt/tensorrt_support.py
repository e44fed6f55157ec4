"""TensorRT availability and logging, shared by the engine builder and the runtime's TensorRT backend.

`tensorrt` is imported only inside functions: importing LatentRT never needs TensorRT, and nothing here
creates a TensorRT object (TensorRT's lean runtime crashes on a machine without a GPU).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

from .errors import BackendUnavailable

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

MIN_TRT = (10, 1)  # set_device_memory(ptr, size) and device_memory_size_v2 arrived in 10.1


class LogTail:
    """Keeps the last `size` log lines (for error messages) and forwards them to Python logging."""

    LEVELS = {"INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING,
              "INFO": logging.DEBUG, "VERBOSE": logging.DEBUG}

    def __init__(self, size: int = 200, logger: logging.Logger = log):
        self.lines: deque[str] = deque(maxlen=size)
        self.logger = logger
        self.errors = 0

    def add(self, severity: str, msg: str) -> None:
        self.lines.append(f"[{severity}] {msg}")
        level = self.LEVELS.get(severity, logging.INFO)
        self.errors += level >= logging.ERROR
        self.logger.log(level, "TensorRT: %s", msg)

    def tail(self, n: int = 30) -> str:
        return "\n".join(list(self.lines)[-n:])


def make_logger(tail: LogTail) -> trt.ILogger:
    """A `trt.ILogger` that writes into a LogTail."""
    import tensorrt as trt

    class TailLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            tail.add(severity.name, msg)

    return TailLogger()


def trt_version() -> str | None:
    """The installed TensorRT version, or None (type stubs alone do not count)."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    version = getattr(trt, "__version__", None)
    return version if isinstance(version, str) and hasattr(trt, "Builder") else None


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.13.0.35' -> (10, 13, 0, 35); non-numeric parts end the tuple."""
    out = []
    for part in version.split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def tensorrt_available() -> tuple[bool, str]:
    """Whether TensorRT >= 10.1 is installed and a CUDA device is visible (creates no TensorRT object)."""
    version = trt_version()
    if version is None:
        return False, ("TensorRT is not installed (pip install 'latentrt[gpu]' on a CUDA machine; "
                       "only type stubs, if anything, are present)")
    if version_tuple(version) < MIN_TRT:
        return False, f"TensorRT {version} is too old: LatentRT needs TensorRT >= {'.'.join(map(str, MIN_TRT))}"
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return False, f"TensorRT {version} is installed but no CUDA device is visible"
    return True, f"TensorRT {version} on {torch.cuda.get_device_name()}"


def require_tensorrt() -> str:
    """Raise BackendUnavailable with one clear message unless TensorRT and a GPU are usable."""
    ok, why = tensorrt_available()
    if not ok:
        raise BackendUnavailable(f"the tensorrt backend is unavailable: {why}. Use --backend onnxruntime on this "
                                 "machine, or build on a machine with an NVIDIA GPU and TensorRT >= 10.1 "
                                 "(--plan works anywhere)")
    return why


def gpu_info() -> dict[str, str] | None:
    """{name, compute_capability} of the current CUDA device, or None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
