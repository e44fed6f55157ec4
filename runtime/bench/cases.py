"""What `latentrt bench` measures: the cases (size, batch, steps), one measured generation, the record."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from latentrt.choices import Backend, Precision
from latentrt.errors import InvalidRequest

REFERENCE = "reference"  # the diffusers pipeline itself
REF_BF16 = "reference-bf16"  # the diffusers pipeline in bfloat16 (torch_dtype=torch.bfloat16)
REF_1THREAD = "reference-1thread"  # the diffusers pipeline (float32) with torch on one thread
INT8 = "onnxruntime-int8"  # ONNX Runtime engines with an int8 UNet
OPENVINO = Backend.OPENVINO.value  # OpenVINO IR engines, fp32
OV_BF16 = "openvino-bf16"  # OpenVINO engines compiled with the bf16 inference precision hint
OV_INT8 = "openvino-int8"  # OpenVINO engines with an NNCF int8 UNet
OV_NAIVE = "openvino-naive"  # the export's ONNX files on OpenVINO, default settings + bf16 hint (the baseline)
BACKENDS = (REFERENCE, REF_BF16, REF_1THREAD, Backend.TORCH.value, Backend.ONNXRUNTIME.value, INT8, Backend.TENSORRT.value, OPENVINO, OV_BF16,
            OV_INT8, OV_NAIVE)
# a label is BACKEND or BACKEND-PRECISION: the engines' runtime backend and the precision they were built in
BUILT_PRECISIONS = (Precision.INT8.value, Precision.BF16.value)
PROMPT = "a photograph of an astronaut riding a horse on the moon"
CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon",
    "an oil painting of a lighthouse in a storm, dramatic light",
    "a bowl of ramen on a wooden table, studio photo",
    "a watercolor map of an imaginary city",
)
PRECISIONS = (Precision.FP32.value, Precision.INT8.value)  # int8: adds the INT8 backend
SWEEPS = ("steps", "size", "batch")
Size = tuple[int, int]


@dataclass(frozen=True)
class BenchCase:
    """One measured configuration."""

    height: int
    width: int
    batch: int  # images per prompt (one prompt)
    steps: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width} b{self.batch} s{self.steps}"


@dataclass
class BenchEvent:
    """Progress: `done` of `total` generations finished; `message` names a phase (export, build, ...)."""

    done: int
    total: int
    message: str = ""


Progress = Callable[[BenchEvent], None]


@dataclass
class Sample:
    """One measured generation."""

    stages: dict[str, list[float]]  # stage -> its entries in ms (unet: one per step), "total" included
    engine_ms: float | None  # sum of the engines' own compute time (None: not observable, the reference)
    gpu_peak_mb: float | None
    image: np.ndarray  # (N, H, W, 3) float32 in [0, 1]

    @property
    def total_ms(self) -> float:
        return self.stages["total"][0]


@dataclass
class BenchRecord:
    """Everything one benchmark measured; `to_json()` is what bench.json holds."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    build: dict[str, Any]
    backends: dict[str, dict[str, Any]]  # label -> what runs, load time, cold latency, memory
    cases: list[dict[str, Any]]  # one per measured case: per-backend stats and ratios
    sweeps: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "latentrt.bench", "schema": 1, "machine": self.machine, "settings": self.settings,
                "build": self.build, "backends": self.backends, "cases": self.cases, "sweeps": self.sweeps,
                "files": self.files}


def runtime_backend(label: str) -> str:
    """The runtime backend a label runs on: 'onnxruntime-int8' -> 'onnxruntime', 'openvino-bf16' -> 'openvino'."""
    return label.partition("-")[0]


def label_for(backend: str, precision: str | None) -> str:
    """The label of engines of a backend built in a precision (fp32 / fp16 engines carry the backend's name)."""
    return f"{backend}-{precision}" if precision in BUILT_PRECISIONS else backend


def fp32_label(label: str) -> str | None:
    """The fp32 counterpart a lower-precision label is compared with ('openvino-bf16' -> 'openvino'), else None."""
    if label not in BACKENDS:  # a user-named engine folder: compared with what `--compare-to` names
        return None
    backend, _, precision = label.partition("-")
    return backend if precision and label != REF_1THREAD else None


def parse_size(text: str) -> Size:
    """'512x768' (height x width, like every size in LatentRT) -> (512, 768)."""
    try:
        h, w = (int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise InvalidRequest(f"cannot read size {text!r}; write HEIGHTxWIDTH, e.g. 512x512") from None
    if h <= 0 or w <= 0:
        raise InvalidRequest(f"size must be positive, got {text!r}")
    return h, w


def sweep_cases(main: BenchCase, sweep: Mapping[str, Sequence[Any]]) -> dict[str, list[BenchCase]]:
    """The cases of each sweep: the main case with one setting varied (the main case's own value included),
    in increasing order (size: by latent pixels)."""
    out: dict[str, list[BenchCase]] = {}
    for key, values in sweep.items():
        if key not in SWEEPS:
            raise InvalidRequest(f"cannot sweep {key!r}; choose one of {', '.join(SWEEPS)}")
        if not values:
            raise InvalidRequest(f"sweep {key} has no values")
        if key == "size":
            sizes = [parse_size(v) if isinstance(v, str) else (int(v[0]), int(v[1])) for v in values]
            cases = [replace(main, height=h, width=w) for h, w in sizes]
        else:
            if any(int(v) < 1 for v in values):
                raise InvalidRequest(f"sweep {key} values must be >= 1, got {list(values)}")
            cases = [replace(main, **{key: int(v)}) for v in values]
        unique = {c.name: c for c in [*cases, main]}.values()
        out[key] = sorted(unique, key=lambda c: (c.height * c.width, c.batch, c.steps))
    return out


def plan_cases(main: BenchCase, sizes: Sequence[Size] | None,
               sweep: Mapping[str, Sequence[Any]] | None) -> tuple[dict[str, list[BenchCase]], list[BenchCase]]:
    """The sweeps (more than one size is a size sweep) and every distinct case, the main case first."""
    sweeps = sweep_cases(main, dict(sweep or {}))
    if sizes and len(sizes) > 1 and "size" not in sweeps:
        sweeps["size"] = sweep_cases(main, {"size": list(sizes)})["size"]
    cases = list({c.name: c for c in [main, *(c for cs in sweeps.values() for c in cs)]}.values())
    return sweeps, cases


def check_args(labels: Sequence[str], runs: int, warmup: int, batch: int, precision: str) -> None:
    """InvalidRequest for unknown backends or precisions and impossible counts, before anything runs."""
    unknown = [b for b in labels if b not in BACKENDS]
    if unknown:
        raise InvalidRequest(f"unknown backend(s) {', '.join(unknown)}; choose among {', '.join(BACKENDS)}")
    if not labels:
        raise InvalidRequest("name at least one backend")
    if runs < 1 or warmup < 0 or batch < 1:
        raise InvalidRequest(f"need runs >= 1, warmup >= 0 and batch >= 1 (got {runs}, {warmup}, {batch})")
    if precision not in PRECISIONS:
        raise InvalidRequest(f"unknown precision {precision!r}; choose fp32 or int8 (int8: adds an int8-UNet "
                             "ONNX Runtime engine set next to the fp32 one)")
