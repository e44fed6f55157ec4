"""`latentrt bench`: per-stage latency of several backends on the same requests, measured side by side.

Method (see benchmarks/README.md): every backend is loaded once in this process; each case (size,
batch, steps) gets `warmup` unrecorded runs per backend, then `runs` measured runs INTERLEAVED
across backends (round i runs the backends in an order rotated by i), so drift of a shared machine
hits every backend alike. The very first generation of each backend is recorded apart as its cold
latency. "reference" is the diffusers pipeline itself (eager PyTorch, `from_pretrained` on the same
weights, same scheduler, steps, guidance and seed), timed per stage from module hooks; the other
backends are LatentRT pipelines timed by the pipeline's own stage timer (perf_counter on CPU, CUDA
events + NVTX ranges on CUDA). Speedups are `reference p50 / backend p50` (> 1: faster than diffusers).
Pipeline overhead is end-to-end time minus the engines' own compute time (the engine components' stages).

This package only measures what it is given (`cases`, `runner`, `stats`, `report`, `session`, `cli`);
exporting, building and quantizing what a benchmark needs is `latentrt.workflows.bench`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .cases import (
    BACKENDS,
    CALIBRATION_PROMPTS,
    INT8,
    OPENVINO,
    OV_BF16,
    OV_INT8,
    OV_NAIVE,
    PROMPT,
    REFERENCE,
    BenchCase,
    BenchEvent,
    BenchRecord,
    Progress,
    Sample,
    parse_size,
    sweep_cases,
)
from .cli import parse_sweeps
from .targets import Targets, read_targets

if TYPE_CHECKING:
    from .report import format_markdown, write_reports
    from .runner import (
        PipelineRunner,
        ReferenceRunner,
        calibration_feeds,
        collect_unet_feeds,
        make_runner,
        measure_case,
        rotated,
    )
    from .stats import _linear_fit, image_diff, percentile_stats, psnr_db

# Names whose modules import torch: loaded on first use, so building the `latentrt` parser stays light.
_MEASURING = {"format_markdown": "report", "write_reports": "report", "PipelineRunner": "runner",
              "ReferenceRunner": "runner", "calibration_feeds": "runner", "collect_unet_feeds": "runner",
              "make_runner": "runner", "measure_case": "runner", "rotated": "runner", "_linear_fit": "stats",
              "image_diff": "stats", "percentile_stats": "stats", "psnr_db": "stats"}


def __getattr__(name: str) -> Any:
    module = _MEASURING.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "BACKENDS", "CALIBRATION_PROMPTS", "INT8", "OPENVINO", "OV_BF16", "OV_INT8", "OV_NAIVE", "PROMPT", "REFERENCE", "BenchCase", "BenchEvent", "BenchRecord",
    "PipelineRunner", "Progress", "ReferenceRunner", "Sample", "Targets", "_linear_fit", "calibration_feeds",
    "collect_unet_feeds", "format_markdown", "image_diff", "make_runner", "measure_case", "parse_size",
    "parse_sweeps", "percentile_stats", "psnr_db", "read_targets", "rotated", "sweep_cases", "write_reports",
]
