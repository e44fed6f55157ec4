"""int8 builds (ONNX Runtime on the CPU): fp32 engines, then the UNet quantized from the export.

OpenVINO int8 builds share the options and recorded feeds (recipe `nncf-ptq`); their builder quantizes the UNet
itself (`engines.build_openvino`).

Static recipes calibrate on recorded UNet inputs (`engines.calibration.Calibration`) handed in by the
caller; this stage never samples (`latentrt.workflows.build` records them with the fp32 pipeline).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentrt.buckets import Size
from latentrt.choices import BuildBackend, Device, Precision
from latentrt.errors import BuildError
from latentrt.families import FamilySpec
from latentrt.manifest import sha256_tree

from .builder import BuildEvent, Progress, emit
from .calibration import Calibration, Feed, as_calibration
from .openvino import NNCF_RECIPE
from .recipes import DEFAULT_RECIPE, RECIPES
from .source import OnnxExport, tree_bytes

INT8_CALIBRATION_STEPS = 4
INT8_CALIBRATION_MAX_SIDE = 256  # default calibration size: the family's native size scaled down to this


@dataclass(frozen=True)
class Int8Options:
    """How an int8 UNet is made: an `engines.recipes.RECIPES` name and, for static recipes, the recorded feeds.

    `calibration_size` / `calibration_steps` say how the feeds are (or are to be) recorded: fp32 sampling
    runs at that (height, width) with that many steps; both None for dynamic recipes (no calibration).
    """

    recipe: str
    calibration_size: Size | None
    calibration_steps: int | None = INT8_CALIBRATION_STEPS
    calibration: Calibration | None = field(default=None, compare=False)  # the recorded feeds (static recipes)
    calibration_guidance: float | None = None  # guidance scale of the runs (None: the family's default)

    @property
    def static(self) -> bool:
        return self.recipe == NNCF_RECIPE or RECIPES[self.recipe].method == "static"

    def as_json(self) -> dict[str, Any]:
        size = self.calibration_size
        return {"recipe": self.recipe, "calibration_size": f"{size[0]}x{size[1]}" if size else None,
                "calibration_steps": self.calibration_steps, "calibration_guidance": self.calibration_guidance}


def default_calibration_size(spec: FamilySpec) -> Size:
    """The family's native size, scaled so its long side is at most 256 px (multiples of 64)."""
    h, w = spec.native_size
    scale = min(1.0, INT8_CALIBRATION_MAX_SIDE / max(h, w))
    return max(64, int(h * scale) // 64 * 64), max(64, int(w * scale) // 64 * 64)


def int8_options(spec: FamilySpec, backend: str, device: str, recipe: str | None, calibration_size: Size | None,
                 calibration_steps: int, calibration: Calibration | Sequence[Feed] | str | os.PathLike[str] |
                 None = None, calibration_guidance: float | None = None) -> Int8Options:
    """Check that an int8 build is possible here and fill in its defaults (BuildError otherwise).

    `calibration` (static recipes): the recorded feeds; their own size, steps and guidance, when they say, win
    over `calibration_size` / `calibration_steps` / `calibration_guidance` (None: the family's default scale).
    """
    if backend not in (BuildBackend.ONNXRUNTIME, BuildBackend.OPENVINO) or device != Device.CPU:
        raise BuildError(f"--precision int8 is for --backend onnxruntime or openvino on the CPU (got backend {backend}, "
                         f"device {device}); TensorRT and the CUDA EP build fp16 or fp32 engines")
    if backend == BuildBackend.OPENVINO and recipe not in (None, NNCF_RECIPE):
        raise BuildError(f"--int8-recipe {recipe} is an ONNX Runtime recipe; OpenVINO int8 is NNCF post-training "
                         f"quantization ({NNCF_RECIPE}), calibrated like the static recipes")
    name = NNCF_RECIPE if backend == BuildBackend.OPENVINO else recipe or DEFAULT_RECIPE
    if name not in RECIPES and name != NNCF_RECIPE:
        raise BuildError(f"unknown int8 recipe {name!r}; choose one of {', '.join(RECIPES)}")
    recorded = as_calibration(calibration)
    size = (recorded.size if recorded else None) or calibration_size or default_calibration_size(spec)
    steps = (recorded.steps if recorded else None) or calibration_steps
    guidance = recorded.guidance if recorded and recorded.guidance is not None else calibration_guidance
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise BuildError(f"int8 calibration guidance {guidance} is not a scale >= 0")
    if min(size) < 8 or any(s % 8 for s in size) or steps < 1:
        raise BuildError(f"int8 calibration at {size[0]}x{size[1]} px with {steps} step(s) is not "
                         "possible: sizes must be multiples of 8 and steps at least 1")
    if name != NNCF_RECIPE and RECIPES[name].method != "static":
        return Int8Options(name, None, None)
    return Int8Options(name, size, steps, recorded, None if guidance is None else float(guidance))


def same_int8(manifest: Mapping[str, Any] | None, int8: Int8Options) -> bool:
    """Whether an engine manifest's UNet is int8 made with these settings."""
    unet = ((manifest or {}).get("components") or {}).get("unet") or {}
    made = unet.get("int8_build") if unet.get("precision") == Precision.INT8 else None
    return isinstance(made, Mapping) and all(made.get(k) == v for k, v in int8.as_json().items())


def int8_manifest(export: OnnxExport, manifest: dict[str, Any], tmp: Path, int8: Int8Options, quantize: bool,
                   previous: Mapping[str, Any] | None, position: tuple[int, int],
                   progress: Progress | None) -> dict[str, Any]:
    """The manifest of an int8 build: the fp32 UNet in `tmp` replaced by an int8 one (or the kept int8 UNet)."""
    if "unet" not in manifest["components"]:
        raise BuildError(f"{export.folder} has no unet: --precision int8 quantizes the UNet")
    unet = manifest["components"]["unet"]
    if quantize:
        unet = quantize_unet(export, manifest, tmp, int8, position, progress)
    info = (previous or {}).get("int8") if not quantize else None
    return dict(manifest, precision=Precision.INT8.value, components={**manifest["components"], "unet": unet},
                int8=info or {"component": "unet", "recipe": int8.recipe, **unet["int8_build"],
                              "fp32_unet": str(export.model_path("unet").resolve())})


def quantize_unet(export: OnnxExport, manifest: dict[str, Any], tmp: Path, int8: Int8Options,
                   position: tuple[int, int], progress: Progress | None) -> dict[str, Any]:
    """Replace the fp32 UNet in `tmp/unet` by the int8 UNet quantized from the export (static: on the recorded feeds)."""
    from .quantize import quantize_recipe

    described = int8.as_json()
    event = BuildEvent("unet", position[0], position[1], "start", BuildBackend.ONNXRUNTIME.value,
                       Precision.INT8.value)
    emit(progress, event, "start", {"recipe": int8.recipe, "calibration": described})
    start = time.perf_counter()
    recorded = int8.calibration if int8.static else None
    if int8.static and (recorded is None or not recorded.feeds):
        raise BuildError(f"the static int8 recipe {int8.recipe} needs recorded calibration feeds (UNet inputs from "
                         "fp32 sampling runs): build with `latentrt build` or `latentrt.workflows.build."
                         "build_engines`, which record them, pass calibration=, or choose a dynamic-* recipe")
    feeds = list(recorded.feeds) if recorded is not None else []
    dest = tmp / "unet"
    shutil.rmtree(dest)  # unlink the fp32 files (they may be hard links into the previous build), never overwrite
    info = quantize_recipe(export.model_path("unet"), dest / "model.onnx", int8.recipe, feeds)
    calibration_s = recorded.seconds if recorded is not None else 0.0
    entry = dict(manifest["components"]["unet"], path="unet/model.onnx", precision=Precision.INT8.value,
                 fp32_islands="", sha256=sha256_tree(dest), size_mb=round(tree_bytes(dest) / 2**20, 3),
                 size_bytes=(dest / "model.onnx").stat().st_size,
                 build_s=round(time.perf_counter() - start + calibration_s, 3),
                 cache_key=f"int8:{info['recipe_name']}", int8=info,
                 int8_build={**described, "calibration_s": round(calibration_s, 3), "calibration_feeds": len(feeds)},
                 ort={"device": Device.CPU.value, "graph_optimization_level": "none (optimized at session start)"})
    emit(progress, event, "done", entry)
    return entry
