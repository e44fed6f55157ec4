"""ONNX Runtime graph optimization levels by name: what `latentrt build` records and the runtime's sessions use."""

from __future__ import annotations

from typing import Any

from .errors import BuildError
from .manifest_checks import ORT_LEVELS


def ort_level(name: str) -> Any:
    """The `GraphOptimizationLevel` for 'disable' | 'basic' | 'extended' | 'all'."""
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if name not in levels:
        raise BuildError(f"unknown graph optimization level {name!r}; choose one of {', '.join(ORT_LEVELS)}")
    return levels[name]
