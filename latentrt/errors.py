"""The few named exceptions users see. Every one carries an actionable message.

The CLI prints ``LatentRTError`` messages without a traceback and exits with ``exit_code``.
"""

from __future__ import annotations


class LatentRTError(Exception):
    """Base class for expected, user-facing errors."""

    exit_code = 2


class CheckpointError(LatentRTError):
    """A checkpoint folder or file is missing, malformed, or not a supported family."""


class UnknownFamily(LatentRTError):
    """A family id (or a checkpoint's configuration) names no supported family."""


class OutputConflict(LatentRTError):
    """The output folder already holds artifacts of a different model, or cannot be written."""


class UnsafePath(LatentRTError):
    """A path read from a manifest or a checkpoint escapes its folder (absolute, `..`, or a symlink outside)."""


class ExportMismatch(LatentRTError):
    """ONNX output differs from the PyTorch reference beyond tolerance."""

    def __init__(self, component: str, tensor: str, max_abs_diff: float, tolerance: float, shape: str):
        self.component = component
        self.tensor = tensor
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance
        super().__init__(
            f"{component}: output '{tensor}' at {shape} differs from PyTorch by max |diff| "
            f"{max_abs_diff:.3g} > tolerance {tolerance:.3g}"
        )


class UnsupportedShape(LatentRTError):
    """A requested shape is invalid or not covered by the engines / profiles."""


class InvalidRequest(LatentRTError):
    """A generation request has an invalid setting (steps, guidance, strength, image, mask, ...)."""


class MissingComponent(LatentRTError):
    """An engine or ONNX file a pipeline needs is absent."""


class StaleArtifact(LatentRTError):
    """An artifact does not match its manifest or the artifacts it is combined with."""


class BackendUnavailable(LatentRTError):
    """A backend (TensorRT, CUDA, a provider) is not installed or has no device here."""


class BuildError(LatentRTError):
    """An engine build failed; the message carries the tail of the builder log."""


class TooLarge(InvalidRequest):
    """A request needs more than a limit allows (memory, pixels, bytes, prompt length); says what would fit."""
