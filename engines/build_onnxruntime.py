"""The ONNX Runtime builder: an offline-optimized graph for the CPU EP, an fp16 graph for the CUDA EP."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from latentrt.choices import BuildBackend, Device, Precision
from latentrt.tensorrt_support import gpu_info
from latentrt.tensors import ComponentIO

from .builder import Builder, ComponentPrecision, GpuInfo
from .layers import InputProfile
from .onnxruntime import MODEL, prepare_ort_engine, require_ort, verify_engine
from .profiles import ProfilePlan


class OnnxRuntimeBuilder(Builder):
    """Engines ONNX Runtime loads: fully dynamic (the export's full ranges), no profile plan."""

    backend = BuildBackend.ONNXRUNTIME
    engine_file = MODEL

    @staticmethod
    def default_precision(device: Device) -> Precision:
        return Precision.FP16 if device == Device.CUDA else Precision.FP32

    def check_available(self) -> GpuInfo | None:
        require_ort()
        return gpu_info() if self.options.device == Device.CUDA else None

    def engine_io(self, plan: ProfilePlan, component: str, io: ComponentIO) -> tuple[ComponentIO, list[dict[str, Any]]]:
        bounds = {name: [d.min, d.opt, d.max] for name, d in io.dims.items()}
        return io, [{"name": "all", "sizes": [], "opt_size": None, "bounds": bounds}]

    def flags(self, precision: ComponentPrecision) -> dict[str, Any]:
        import onnxruntime as ort

        o = self.options
        return {"backend": self.backend.value, "device": o.device.value, "onnxruntime": ort.__version__,
                "graph_optimization_level": o.graph_optimization_level, "threads": o.threads,
                "fp32_islands": precision.note}

    def build(self, onnx_path: Path, io: ComponentIO, profiles: Sequence[InputProfile], dest: Path,
              precision: ComponentPrecision) -> dict[str, Any]:
        o = self.options
        info = prepare_ort_engine(onnx_path, dest, device=o.device.value, precision=precision.precision.value,
                                  graph_optimization_level=o.graph_optimization_level, intra_op_threads=o.threads,
                                  fp32_nodes=precision.fp32_layers, verify=False)
        if o.verify:
            info["check"] = self.verify(onnx_path, dest / self.engine_file, io, precision)
        return {"build_s": info.pop("prepare_s"), "ort": info}

    def verify(self, onnx_path: Path, engine: Path, io: ComponentIO,
               precision: ComponentPrecision) -> dict[str, Any] | None:
        return verify_engine(onnx_path, engine, io, device=self.options.device.value,
                             precision=precision.precision.value, intra_op_threads=self.options.threads)
