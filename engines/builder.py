"""The one interface an engine backend implements for `engines.build`: one `Builder` per `BuildBackend`.

The orchestrator (`engines.build`) plans profiles, reuses unchanged engines, stages and publishes the
folder and writes the manifest; a builder only says what its engines are (file name, default precision,
the IO ranges and cache-key fields they depend on) and turns one ONNX file into one engine.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from latentrt.cache_keys import key_fields
from latentrt.choices import BuildBackend, Device, Precision
from latentrt.tensors import ComponentIO

from .layers import InputProfile, LayerFilter
from .profiles import ProfilePlan

GpuInfo = Mapping[str, str]  # {name, compute_capability} of the CUDA device a build is for


@dataclass
class BuildEvent:
    """Progress of one component: stage is 'start', 'done' or 'reused' ('calibrate': int8 feeds being recorded)."""

    component: str
    index: int
    total: int
    stage: str
    backend: str
    precision: str
    detail: Mapping[str, Any] = field(default_factory=dict)


Progress = Callable[[BuildEvent], None]


def emit(progress: Progress | None, event: BuildEvent, stage: str, detail: Mapping[str, Any]) -> None:
    if progress is not None:
        progress(replace(event, stage=stage, detail=detail))


@dataclass(frozen=True)
class ComponentPrecision:
    """The precision one component is built in, with the fp32 islands its family needs."""

    precision: Precision  # FP16 or FP32 (OpenVINO: FP32, BF16 or INT8)
    fp32_layers: LayerFilter | None = None  # layers kept in fp32 inside an fp16 engine
    note: str = ""  # why, for the manifest and the progress line


@dataclass
class BuildOptions:
    """The backend settings of one build (those that change an engine also go into its cache key)."""

    backend: BuildBackend
    precision: Precision  # the base precision (an int8 build makes fp32 engines, then quantizes the UNet)
    device: Device = Device.CPU  # ONNX Runtime's execution provider
    threads: int | None = None  # ONNX Runtime intra-op threads recorded for sessions
    graph_optimization_level: str = "extended"  # ONNX Runtime offline level (`latentrt.manifest_checks.ORT_LEVELS`)
    fp16_fixed_vae: bool = False  # the SDXL VAE is an fp16-fixed one: build it in fp16
    optimization_level: int = 3  # TensorRT builder optimization level 0..5
    refittable: bool = False
    strongly_typed: bool = False
    workspace_mb: int | None = None
    timing_cache: str | os.PathLike[str] | None = None
    verify: bool = True  # run each engine once against its source graph (where the backend can)
    static_shapes: bool = False  # OpenVINO: compile static-shape copies for the planned sizes at run time
    component_precisions: Mapping[str, str] = field(default_factory=dict)  # OpenVINO: per-component overrides
    int8: Any = None  # OpenVINO int8 builds: the `engines.build_int8.Int8Options` (recipe, recorded feeds)

    def __post_init__(self) -> None:
        self.backend, self.precision, self.device = (BuildBackend(self.backend), Precision(self.precision),
                                                     Device(self.device))


class Builder(ABC):
    """Turns one component's ONNX file into one engine of its backend (see the module docstring)."""

    backend: ClassVar[BuildBackend]
    engine_file: ClassVar[str]  # the engine's file name inside its component folder

    def __init__(self, options: BuildOptions):
        self.options = options

    @staticmethod
    @abstractmethod
    def default_precision(device: Device) -> Precision:
        """The precision built when none is asked for."""

    @abstractmethod
    def check_available(self) -> GpuInfo | None:
        """Raise BackendUnavailable unless this backend can build here; return the GPU it builds for."""

    @abstractmethod
    def engine_io(self, plan: ProfilePlan, component: str, io: ComponentIO) -> tuple[ComponentIO, list[dict[str, Any]]]:
        """The engine's IO ranges and its profile entries for the manifest."""

    @abstractmethod
    def flags(self, precision: ComponentPrecision) -> dict[str, Any]:
        """The builder settings that change the engine (its cache key's `builder_flags`)."""

    @abstractmethod
    def build(self, onnx_path: Path, io: ComponentIO, profiles: Sequence[InputProfile], dest: Path,
              precision: ComponentPrecision) -> dict[str, Any]:
        """Write the engine into the folder `dest`; return its backend-specific manifest fields (with `build_s`)."""

    def verify(self, onnx_path: Path, engine: Path, io: ComponentIO,
               precision: ComponentPrecision) -> dict[str, Any] | None:
        """Run the engine against its source graph (None: this backend does not check here)."""
        return None

    def tool_version(self) -> str | None:
        """The version of the builder that ties an engine to it (TensorRT's), else None."""
        return None

    def machine_fields(self, gpu: GpuInfo | None) -> dict[str, Any]:
        """Cache-key fields a kept engine must still match on this machine."""
        return {}

    def plan_info(self, plan: ProfilePlan) -> dict[str, Any] | None:
        """The manifest's `plan` (None when the engines do not depend on the profile plan)."""
        return None

    def cache_key(self, onnx_sha256: str, precision: ComponentPrecision, profiles: Sequence[Any],
                  gpu: GpuInfo | None) -> dict[str, Any]:
        """The fields an engine's cache key is computed from (`latentrt.cache_keys.key_fields`)."""
        return key_fields(onnx_sha256, precision.precision.value, profiles, self.flags(precision),
                          self.tool_version(), (gpu or {}).get("compute_capability"))
