"""LatentRT: Stable Diffusion family checkpoints -> ONNX -> TensorRT / ONNX Runtime engines -> images."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "export", "build", "load_pipeline", "generate", "bench"]


def export(*args: Any, **kwargs: Any) -> Any:
    """Export a checkpoint to ONNX (see `latentrt.export.onnx.export_model`)."""
    from latentrt.export.onnx import export_model

    return export_model(*args, **kwargs)


def build(*args: Any, **kwargs: Any) -> Any:
    """Build engines from an ONNX export, recording int8 calibration feeds when needed
    (see `latentrt.workflows.build.build_engines`)."""
    from latentrt.workflows.build import build_engines

    return build_engines(*args, **kwargs)


def load_pipeline(*args: Any, **kwargs: Any) -> Any:
    """Load a pipeline over built engines (see `latentrt.runtime.pipeline.load_pipeline`)."""
    from latentrt.runtime.pipeline import load_pipeline as _load

    return _load(*args, **kwargs)


def generate(*args: Any, **kwargs: Any) -> Any:
    """Generate images from an engine folder (see `latentrt.runtime.pipeline.generate`)."""
    from latentrt.runtime.pipeline import generate as _generate

    return _generate(*args, **kwargs)


def bench(*args: Any, **kwargs: Any) -> Any:
    """Benchmark backends side by side (see `latentrt.workflows.bench.run_bench`)."""
    from latentrt.workflows.bench import run_bench

    return run_bench(*args, **kwargs)
