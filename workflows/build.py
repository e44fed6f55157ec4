"""`latentrt build`: ONNX export -> engines; a static int8 build first records its calibration feeds.

The engines stage never samples (it imports no runtime). A static int8 recipe calibrates on real UNet
inputs, so this workflow runs the fp32 ONNX Runtime pipeline over the export (`calibration_feeds`: a few
prompts at the calibration size and steps), records what the UNet is fed, and hands those feeds to
`latentrt.engines.build.build_engines` -- only when the build will quantize the UNet.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from latentrt.buckets import Size
from latentrt.choices import Precision
from latentrt.engines import cli as engines_cli
from latentrt.engines.build import (
    INT8_CALIBRATION_STEPS,
    BuildEvent,
    Progress,
    int8_needs_calibration,
    int8_options,
    read_onnx_export,
)
from latentrt.engines.build import build_engines as build_stage
from latentrt.engines.calibration import Calibration


def add_arguments(parser: argparse.ArgumentParser) -> None:
    engines_cli.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return engines_cli.run(args, build=build_engines)


def build_engines(onnx_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], **kwargs: Any) -> Path:
    """`latentrt.engines.build.build_engines`, recording static int8 calibration feeds first when it needs them."""
    if kwargs.get("precision") == Precision.INT8 and kwargs.get("calibration") is None \
            and not kwargs.get("plan_only"):
        kwargs["calibration"] = record_calibration(
            onnx_dir, out_dir, backend=kwargs.get("backend", "onnxruntime"), device=kwargs.get("device", "cpu"),
            int8_recipe=kwargs.get("int8_recipe"), calibration_size=kwargs.get("calibration_size"),
            calibration_steps=kwargs.get("calibration_steps", INT8_CALIBRATION_STEPS),
            calibration_guidance=kwargs.get("calibration_guidance"),
            components=kwargs.get("components"), overwrite=kwargs.get("overwrite", False),
            progress=kwargs.get("progress"),
            decoder=(kwargs.get("component_precisions") or {}).get("vae_decoder") == Precision.INT8)
    return build_stage(onnx_dir, out_dir, **kwargs)


def record_calibration(onnx_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, backend: str,
                       device: str, int8_recipe: str | None, calibration_size: Size | None, calibration_steps: int,
                       calibration_guidance: float | None = None,
                       components: Sequence[str] | None = None, overwrite: bool = False,
                       progress: Progress | None = None, decoder: bool = False) -> Calibration | None:
    """The UNet inputs fp32 sampling runs over the export feed the UNet, when the build quantizes it statically
    (with `decoder`: also the latents those runs decode, for an int8 VAE decoder).

    None when no feeds are needed (a dynamic recipe, or the folder's int8 UNet is kept); BuildError when an
    int8 build is not possible here (checked before any sampling).
    """
    from latentrt.runtime.bench import CALIBRATION_PROMPTS, calibration_feeds

    int8 = int8_options(read_onnx_export(onnx_dir).spec, backend, device, int8_recipe, calibration_size,
                        calibration_steps, calibration_guidance=calibration_guidance)
    if int8.calibration_size is None or int8.calibration_steps is None \
            or not int8_needs_calibration(onnx_dir, out_dir, int8, components=components, overwrite=overwrite,
                                      decoder=decoder):
        return None
    (h, w), steps = int8.calibration_size, int8.calibration_steps
    if progress is not None:
        progress(BuildEvent("unet", 0, 1, "calibrate", "onnxruntime", Precision.FP32.value,
                            {**int8.as_json(), "runs": len(CALIBRATION_PROMPTS)}))
    start = time.perf_counter()
    decoder_feeds: list[dict[str, Any]] = []
    feeds = calibration_feeds(onnx_dir, height=h, width=w, steps=steps, guidance=int8.calibration_guidance,
                              decoder_feeds=decoder_feeds if decoder else None)
    return Calibration(tuple(feeds), (h, w), steps, round(time.perf_counter() - start, 3), tuple(decoder_feeds),
                       int8.calibration_guidance)
