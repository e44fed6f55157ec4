"""The TensorRT builder: one serialized plan per component with the profile plan's optimization profiles."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from latentrt.choices import BuildBackend, Device, Precision
from latentrt.tensorrt_support import gpu_info, require_tensorrt, trt_version
from latentrt.tensors import ComponentIO

from .builder import Builder, ComponentPrecision, GpuInfo
from .layers import InputProfile
from .profiles import ProfilePlan
from .tensorrt import build_trt_engine


class TensorRTBuilder(Builder):
    """Engines tied to a TensorRT version and a GPU's compute capability, covering the planned profiles."""

    backend = BuildBackend.TENSORRT
    engine_file = "engine.plan"

    @staticmethod
    def default_precision(device: Device) -> Precision:
        return Precision.FP16

    def check_available(self) -> GpuInfo | None:
        require_tensorrt()
        return gpu_info()

    def engine_io(self, plan: ProfilePlan, component: str, io: ComponentIO) -> tuple[ComponentIO, list[dict[str, Any]]]:
        return plan.io(component), plan.entries(component)

    def flags(self, precision: ComponentPrecision) -> dict[str, Any]:
        o = self.options
        return {"backend": self.backend.value, "fp16": precision.precision == Precision.FP16,
                "strongly_typed": o.strongly_typed, "optimization_level": o.optimization_level,
                "refittable": o.refittable, "workspace_mb": o.workspace_mb, "fp32_islands": precision.note}

    def tool_version(self) -> str | None:
        return trt_version()

    def machine_fields(self, gpu: GpuInfo | None) -> dict[str, Any]:
        return {"trt_version": self.tool_version(), "compute_capability": (gpu or {}).get("compute_capability")}

    def plan_info(self, plan: ProfilePlan) -> dict[str, Any] | None:
        return {"strategy": plan.strategy, "sizes": [f"{h}x{w}" for h, w in plan.sizes], "batch": list(plan.batch),
                "opt_batch": plan.opt_batch, "cfg": plan.cfg, "profiles": [p.name for p in plan.profiles]}

    def build(self, onnx_path: Path, io: ComponentIO, profiles: Sequence[InputProfile], dest: Path,
              precision: ComponentPrecision) -> dict[str, Any]:
        o = self.options
        result = build_trt_engine(onnx_path, dest / self.engine_file, profiles,
                                  fp16=precision.precision == Precision.FP16, strongly_typed=o.strongly_typed,
                                  optimization_level=o.optimization_level, refittable=o.refittable,
                                  timing_cache=o.timing_cache, fp32_layers=precision.fp32_layers,
                                  workspace_mb=o.workspace_mb)
        return {"build_s": result.build_s, "device_memory_mb": result.device_memory_mb,
                "profile_memory_mb": result.profile_memory_mb, "num_layers": result.num_layers,
                "fp32_layers": result.fp32_layers}
