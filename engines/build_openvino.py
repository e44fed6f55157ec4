"""The OpenVINO builder: ONNX -> OpenVINO IR for the CPU, fp32 / bf16 (compile-time hint) / int8 (NNCF).

Engines are fully dynamic IRs (the export's full ranges). `--static` records the requested buckets' latent
sizes: the runtime then compiles a static-shape copy of the IR for a request at one of those sizes (cached per
shape) and the dynamic one for any other size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from latentrt.choices import BuildBackend, Device, Precision, values
from latentrt.errors import BuildError
from latentrt.names import DIM_LATENT_HEIGHT, DIM_LATENT_WIDTH
from latentrt.tensors import ComponentIO

from .builder import Builder, ComponentPrecision, GpuInfo
from .layers import InputProfile
from .openvino import (
    MODEL,
    NNCF_RECIPE,
    OV_PRECISIONS,
    inference_precision,
    nncf_version,
    prepare_ov_engine,
    require_openvino,
    verify_ov_engine,
)
from .profiles import ProfilePlan

INT8_COMPONENTS = ("unet", "vae_decoder")  # the components whose calibration feeds are recorded
INT8_BY_DEFAULT = ("unet",)  # what --precision int8 quantizes (an int8 decoder is asked for by name)


def ov_component_precision(component: str, base: Precision, overrides: Mapping[str, str] | None = None, *,
                           native_bf16: bool = False) -> ComponentPrecision:
    """A component's OpenVINO precision: an override for it, else the build's.

    An int8 build quantizes the UNet (and the VAE decoder when asked for by name: `vae_decoder=int8`; its
    calibration feeds are the latents the calibration runs decode); the other components run in bf16 where
    the CPU computes bf16 natively (`native_bf16`: bf16 costs ~46 dB PSNR, far above int8's ~36 dB, and
    halves their time), else in fp32.
    """
    chosen = (overrides or {}).get(component)
    precision = Precision(chosen) if chosen else base
    if precision not in OV_PRECISIONS:
        raise BuildError(f"{component}: OpenVINO builds fp32, bf16 or int8, not {precision.value}")
    if precision == Precision.INT8 and component not in (INT8_COMPONENTS if chosen else INT8_BY_DEFAULT):
        if chosen:
            raise BuildError(f"{component}: OpenVINO int8 is for the UNet and the VAE decoder (their calibration "
                             f"feeds are recorded); build {component} in bf16 or fp32")
        if native_bf16:
            return ComponentPrecision(Precision.BF16, note="int8 build: the rest runs in bf16, native on this CPU")
        return ComponentPrecision(Precision.FP32, note="int8 build: the rest stays fp32, no native bf16 on this CPU")
    if chosen and precision == Precision.INT8 and base != Precision.INT8:
        raise BuildError(f"{component}=int8 needs --precision int8 (its calibration feeds come from the int8 "
                         "build's fp32 sampling runs)")
    return ComponentPrecision(precision)


def parse_component_precisions(text: str | None) -> dict[str, str]:
    """'text_encoder=bf16,vae_decoder=bf16' -> {component: precision}; BuildError for anything else."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not name or value not in values(Precision):
            raise BuildError(f"cannot read --component-precision {item.strip()!r}; write NAME=PRECISION,... with "
                             f"a precision among {', '.join(values(Precision))} (e.g. vae_decoder=bf16)")
        out[name] = value
    return out


class OpenVinoBuilder(Builder):
    """OpenVINO IR engines for the CPU plugin (see the module docstring)."""

    backend = BuildBackend.OPENVINO
    engine_file = MODEL

    @staticmethod
    def default_precision(device: Device) -> Precision:
        return Precision.FP32

    def check_available(self) -> GpuInfo | None:
        require_openvino()
        if self.options.device != Device.CPU:
            raise BuildError(f"--backend openvino builds for the CPU (got --device {self.options.device.value})")
        for component in self.options.component_precisions:  # refuse an impossible choice before any work
            ov_component_precision(component, self.options.precision, self.options.component_precisions)
        if self.options.precision == Precision.INT8 or Precision.INT8 in self.options.component_precisions.values():
            nncf_version()
        return None

    def static_sizes(self, plan: ProfilePlan) -> list[dict[str, int]]:
        """The latent sizes compiled as static shapes at run time (empty: dynamic only)."""
        if not self.options.static_shapes:
            return []
        f = plan.vae_scale_factor
        return [{DIM_LATENT_HEIGHT: h // f, DIM_LATENT_WIDTH: w // f} for h, w in plan.sizes]

    def engine_io(self, plan: ProfilePlan, component: str, io: ComponentIO) -> tuple[ComponentIO, list[dict[str, Any]]]:
        bounds = {name: [d.min, d.opt, d.max] for name, d in io.dims.items()}
        static = self.static_sizes(plan) if DIM_LATENT_HEIGHT in io.dims else []
        return io, [{"name": "all", "sizes": [], "opt_size": None, "bounds": bounds, "static": static}]

    def flags(self, precision: ComponentPrecision) -> dict[str, Any]:
        o = self.options
        int8 = o.int8.as_json() if precision.precision == Precision.INT8 and o.int8 is not None else None
        return {"backend": self.backend.value, "openvino": require_openvino(),
                "inference_precision": inference_precision(precision.precision), "ir_weights": "fp32",
                "threads": o.threads, "int8": int8, "note": precision.note}

    def plan_info(self, plan: ProfilePlan) -> dict[str, Any] | None:
        static = self.static_sizes(plan)
        return {"static_sizes": [f"{h}x{w}" for h, w in plan.sizes], "static_latents": static} if static else None

    def build(self, onnx_path: Path, io: ComponentIO, profiles: Sequence[InputProfile], dest: Path,
              precision: ComponentPrecision) -> dict[str, Any]:
        o = self.options
        int8 = precision.precision == Precision.INT8
        calibration = o.int8.calibration if int8 and o.int8 is not None else None
        feeds = [] if calibration is None else \
            list(calibration.decoder_feeds if io.component == "vae_decoder" else calibration.feeds)
        info = prepare_ov_engine(onnx_path, dest, io, precision=precision.precision, threads=o.threads, feeds=feeds,
                                 verify=o.verify)
        out: dict[str, Any] = {"build_s": info.pop("prepare_s"), "openvino": info}
        if int8 and o.int8 is not None:
            seconds = calibration.seconds if calibration is not None else 0.0
            out["build_s"] = round(out["build_s"] + seconds, 3)
            out["int8_build"] = {**o.int8.as_json(), "calibration_s": round(seconds, 3), "calibration_feeds": len(feeds)}
            out["int8"] = {"recipe_name": NNCF_RECIPE, "nncf": info.get("nncf"),
                           "model_type": "transformer" if io.component == "unet" else "default, preset mixed, "
                                                                                       "first and last conv in float"}
        return out

    def verify(self, onnx_path: Path, engine: Path, io: ComponentIO,
               precision: ComponentPrecision) -> dict[str, Any] | None:
        return verify_ov_engine(onnx_path, engine, io, precision=precision.precision, threads=self.options.threads)
