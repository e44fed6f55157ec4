"""`latentrt bench`: per-stage latency of several backends on the same requests, measured side by side.

Method (see benchmarks/README.md): every backend is loaded once in this process; each case (size,
batch, steps) gets `warmup` unrecorded runs per backend, then `runs` measured runs INTERLEAVED
across backends (round i runs the backends in an order rotated by i), so drift of a shared machine
hits every backend alike. The very first generation of each backend is recorded apart as its cold
latency. "reference" is the diffusers pipeline itself (eager PyTorch, `from_pretrained` on the same
weights, same scheduler, steps, guidance and seed), timed per stage with module hooks; the other
backends are LatentRT pipelines timed by the pipeline's own stage timers (perf_counter on CPU, CUDA
events + NVTX ranges on CUDA). Speedups are `reference p50 / backend p50` (> 1: faster than diffusers).
Pipeline overhead is end-to-end time minus the engines' own compute time (the sum of `last_latency_ms`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentrt.errors import BackendUnavailable, InvalidRequest
from latentrt.manifest import ENGINE_KIND, MANIFEST, ONNX_KIND, check_writable, read_manifest
from latentrt.outputs import removed_if_failed
from latentrt.paths import inside

from .backends.base import Engine

# Statistics and report writers live in bench_stats / bench_report; the names below stay importable from here.
from .bench_report import STAGE_COLORS as STAGE_COLORS
from .bench_report import case_table as case_table
from .bench_report import format_markdown as format_markdown
from .bench_report import plot_stages as plot_stages
from .bench_report import plot_sweep as plot_sweep
from .bench_report import write_reports
from .bench_stats import (
    INT8,
    _loadavg,
    case_result,
    machine_info,
    peak_rss_mb,
    rss_mb,
    sweep_summary,
    unet_gflop,
)
from .bench_stats import PERCENTILES as PERCENTILES
from .bench_stats import _linear_fit as _linear_fit
from .bench_stats import cpu_flags as cpu_flags
from .bench_stats import cpu_model as cpu_model
from .bench_stats import image_diff as image_diff
from .bench_stats import measure_peak_gflops as measure_peak_gflops
from .bench_stats import overhead as overhead
from .bench_stats import percentile_stats as percentile_stats
from .bench_stats import psnr_db as psnr_db
from .bench_stats import ratios as ratios
from .bench_stats import stage_stats as stage_stats
from .bench_stats import summarize as summarize

log = logging.getLogger(__name__)

BACKENDS = ("reference", "torch", "onnxruntime", "onnxruntime-int8", "tensorrt")
PROMPT = "a photograph of an astronaut riding a horse on the moon"
CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon",
    "an oil painting of a lighthouse in a storm, dramatic light",
    "a bowl of ramen on a wooden table, studio photo",
    "a watercolor map of an imaginary city",
)
SWEEPS = ("steps", "size", "batch")
Size = tuple[int, int]


# ---------------------------------------------------------------------------- settings and events


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
    """Everything one `run_bench` measured; `to_json()` is what bench.json holds."""

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


# ---------------------------------------------------------------------------- event timing


class _HookTimer:
    """Start/stop timing from module hooks: perf_counter on CPU, CUDA events + NVTX on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.open: dict[str, Any] = {}
        self.done: list[tuple[str, Any, Any]] = []

    def start(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            torch.cuda.nvtx.range_push(f"reference {name}")
            event.record()
            self.open[name] = event
        else:
            self.open[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        begin = self.open.pop(name)
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.nvtx.range_pop()
            self.done.append((name, begin, end))
        else:
            self.done.append((name, (time.perf_counter() - begin) * 1e3, None))

    def collect(self) -> dict[str, list[float]]:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, list[float]] = {}
        for name, a, b in self.done:
            out.setdefault(name, []).append(a if b is None else a.elapsed_time(b))
        self.done = []
        return out


# ---------------------------------------------------------------------------- runners


def request_inputs(spec: Any, case: BenchCase) -> dict[str, Any]:
    """Extra inputs the family needs for a txt2img-like run: an init image (+ mask) for inpainting / refiner."""
    from PIL import Image

    if not (spec.is_inpaint or spec.time_ids.value == "size_crop_aesthetic"):
        return {}
    y, x = np.mgrid[0:case.height, 0:case.width]
    rgb = np.stack([x / case.width, y / case.height, 0.5 + 0 * x], axis=-1)
    out: dict[str, Any] = {"image": Image.fromarray((255 * rgb).astype(np.uint8))}
    if spec.is_inpaint:
        box = (abs(y - case.height / 2) < case.height / 4) & (abs(x - case.width / 2) < case.width / 4)
        out["mask"] = Image.fromarray((255 * box).astype(np.uint8))
    return out


class _Logged(Engine):
    """An engine that logs each call's own compute time (and optionally hands its feed to a recorder)."""

    def __init__(self, inner: Engine, calls: list[float]):
        super().__init__(inner.io, inner.device)
        self.inner, self.calls = inner, calls
        self.backend = inner.backend
        self.record: Callable[[Mapping[str, torch.Tensor]], None] | None = None

    def prepare(self, sizes: Any) -> None:
        self.inner.prepare(sizes)

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.record is not None:
            self.record(feed)
        out = self.inner.run(feed)
        self.last_latency_ms = self.inner.last_latency_ms
        self.calls.append(self.last_latency_ms)
        return out

    def describe(self) -> str:
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()


class PipelineRunner:
    """A LatentRT pipeline on one backend, with its engines' compute time logged."""

    def __init__(self, label: str, folder: str | os.PathLike[str], backend: str, device: torch.device):
        from .pipeline import load_pipeline

        self.label, self.device = label, device
        before, start = rss_mb(), time.perf_counter()
        self.pipe = load_pipeline(folder, backend=backend, device=device)
        self.load_s = time.perf_counter() - start
        self.rss_load_mb = rss_mb() - before
        self.calls: list[float] = []
        engines = self.pipe.engines.engines
        for name in list(engines):
            engines[name] = _Logged(engines[name], self.calls)
        self.describe = self.pipe.engines.describe()

    def generate(self, case: BenchCase, seed: int, prompt: str, guidance: float) -> Sample:
        from .pipeline import GenerationRequest

        self.calls.clear()
        _reset_gpu_peak(self.device)
        request = GenerationRequest(prompt=prompt, steps=case.steps, guidance=guidance, width=case.width,
                                    height=case.height, seed=seed, num_images_per_prompt=case.batch,
                                    **request_inputs(self.pipe.spec, case))
        result = self.pipe.generate(request)
        stages: dict[str, list[float]] = {}
        for name, ms in result.timing.entries:
            stages.setdefault(name, []).append(ms)
        assert result.array is not None
        return Sample(stages, float(sum(self.calls)), _gpu_peak(self.device), result.array)

    def close(self) -> None:
        self.pipe.close()


class ReferenceRunner:
    """The diffusers pipeline (eager PyTorch, float32) on the checkpoint's own folder, timed with hooks."""

    label = "reference"

    def __init__(self, checkpoint: str, device: torch.device, family: str | None = None):
        from diffusers import DiffusionPipeline

        from latentrt.families import get_family
        from latentrt.reference.models import detect_family, quiet_progress, resolve

        folder, _ = resolve(checkpoint)
        self.device = device
        before, start = rss_mb(), time.perf_counter()
        with quiet_progress():
            self.pipe: Any = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.load_s = time.perf_counter() - start
        self.rss_load_mb = rss_mb() - before
        self.spec = get_family(family) if family else detect_family(folder)
        self.timer = _HookTimer(device)
        self._hook()
        self.describe = [f"diffusers {type(self.pipe).__name__} (eager PyTorch float32) on {device}"]

    def _hook(self) -> None:
        for name in ("text_encoder", "text_encoder_2", "unet"):
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                module.register_forward_pre_hook(lambda *_, n=name: self.timer.start(n))
                module.register_forward_hook(lambda *_, n=name: self.timer.stop(n))
        vae = self.pipe.vae
        for method, stage in (("decode", "vae_decoder"), ("encode", "vae_encoder")):
            setattr(vae, method, self._timed(getattr(vae, method), stage))

    def _timed(self, fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.timer.start(stage)
            try:
                return fn(*args, **kwargs)
            finally:
                self.timer.stop(stage)

        return timed

    def generate(self, case: BenchCase, seed: int, prompt: str, guidance: float) -> Sample:
        _reset_gpu_peak(self.device)
        kwargs = request_inputs(self.spec, case)
        if "mask" in kwargs:
            kwargs["mask_image"] = kwargs.pop("mask")
        generator = torch.Generator("cpu").manual_seed(seed)
        self.timer.start("total")
        out = self.pipe(prompt=prompt, num_inference_steps=case.steps, guidance_scale=guidance, height=case.height,
                        width=case.width, num_images_per_prompt=case.batch, generator=generator, output_type="np",
                        **kwargs)
        self.timer.stop("total")
        stages = self.timer.collect()
        return Sample(stages, None, _gpu_peak(self.device), np.asarray(out.images, dtype=np.float32))

    def close(self) -> None:
        self.pipe = None


def _reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _gpu_peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


Runner = PipelineRunner | ReferenceRunner


# ---------------------------------------------------------------------------- what to run


@dataclass
class Targets:
    """The folders each backend runs from, and what preparing them cost."""

    checkpoint: str | None  # the source checkpoint (reference, torch backend, FLOP count)
    family: str | None
    onnx_dir: Path | None
    folders: dict[str, Path] = field(default_factory=dict)  # pipeline label -> engine / ONNX / checkpoint folder
    build: dict[str, Any] = field(default_factory=dict)


def _source_of(manifest: Mapping[str, Any]) -> str | None:
    """The checkpoint an ONNX export or engine folder came from (engine manifests nest the export's source)."""
    source: Any = (manifest.get("source") or {}).get("model")
    while isinstance(source, Mapping):
        source = source.get("model")
    return str(source) if source else None


def read_targets(model_or_dir: str | os.PathLike[str]) -> Targets:
    """Classify what the user passed: an engine folder, an ONNX export, or a checkpoint.

    Bench reads only the folders the user named: the export an engine manifest records
    (`source.onnx_dir`, an untrusted path) is not followed. What an engine folder alone cannot give (the
    torch backend, another backend's engines, an int8 UNet) is exported from its source checkpoint into
    the build folder, as for a checkpoint argument.
    """
    path = Path(model_or_dir)
    if not (path / MANIFEST).is_file():
        return Targets(checkpoint=os.fspath(model_or_dir), family=None, onnx_dir=None)
    manifest = read_manifest(path)
    family = manifest.get("family")
    if manifest.get("kind") == ONNX_KIND:
        return Targets(_source_of(manifest), family, path)
    if manifest.get("kind") != ENGINE_KIND:
        raise InvalidRequest(f"{path} holds {manifest.get('kind')!r}, not a checkpoint, ONNX export or engines")
    label = INT8 if manifest.get("precision") == "int8" else str(manifest.get("backend", "onnxruntime"))
    return Targets(_source_of(manifest), family, None, {label: path})


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 3)


def prepare_targets(model_or_dir: str | os.PathLike[str], labels: Sequence[str], out_dir: Path, device: torch.device,
                    say: Callable[[str], None]) -> Targets:
    """Export / build whatever the requested backends need and is not given (timed); int8 comes later."""
    t = read_targets(model_or_dir)
    missing = [b for b in ("onnxruntime", "tensorrt") if b in labels and b not in t.folders]
    if "tensorrt" in missing and device.type != "cuda":
        raise BackendUnavailable("the tensorrt backend needs a CUDA GPU; bench on --device cuda or drop it")
    quantize = INT8 in labels and INT8 not in t.folders  # int8 is quantized from the fp32 export's UNet
    if (missing or quantize) and t.onnx_dir is None:
        if t.checkpoint is None:
            raise InvalidRequest(f"{model_or_dir} names no source checkpoint or ONNX export to build from")
        from latentrt.export.onnx import export_model

        say(f"exporting {t.checkpoint} to ONNX")
        t.onnx_dir, t.build["export_s"] = _timed(lambda: export_model(t.checkpoint or "", out_dir / "onnx",
                                                                       family=t.family, overwrite=True))
    for backend in missing:
        from latentrt.engines.build import build_engines

        say(f"building {backend} engines")
        dest, build_device = out_dir / f"engines-{backend}", "cuda" if device.type == "cuda" else "cpu"
        t.folders[backend], t.build[f"build_{backend}_s"] = _timed(
            lambda b=backend, d=dest, bd=build_device: build_engines(t.onnx_dir or "", d, backend=b, device=bd,
                                                                     overwrite=True))
    if "torch" in labels:
        if t.checkpoint is None:
            raise InvalidRequest(f"{model_or_dir} names no source checkpoint: the torch backend cannot be loaded")
        t.folders["torch"] = t.onnx_dir or Path(t.checkpoint)
    return t


def collect_unet_feeds(runner: PipelineRunner, case: BenchCase, guidance: float, prompts: Sequence[str],
                       limit: int = 32, tick: Callable[[], None] | None = None) -> list[dict[str, np.ndarray]]:
    """UNet inputs seen while `runner` (fp32) samples `prompts`: calibration data for static int8."""
    feeds: list[dict[str, np.ndarray]] = []
    unet = runner.pipe.engines.engines["unet"]
    assert isinstance(unet, _Logged)
    unet.record = lambda feed: feeds.append({k: v.detach().float().cpu().numpy().copy() for k, v in feed.items()})
    try:
        for seed, prompt in enumerate(prompts):
            runner.generate(case, seed, prompt, guidance)
            if tick:
                tick()
    finally:
        unet.record = None
    if len(feeds) > limit:
        keep = np.linspace(0, len(feeds) - 1, limit).round().astype(int)
        feeds = [feeds[i] for i in dict.fromkeys(keep.tolist())]
    return feeds


def calibration_feeds(folder: str | os.PathLike[str], *, height: int, width: int, steps: int,
                      guidance: float | None = None, prompts: Sequence[str] = CALIBRATION_PROMPTS,
                      limit: int = 32) -> list[dict[str, np.ndarray]]:
    """Static-int8 calibration data for `quantize_unet_int8`: UNet inputs recorded while the fp32 engines
    (or ONNX export) in `folder` sample `prompts` (one seed each) at the given size and steps."""
    runner = PipelineRunner("onnxruntime", folder, "onnxruntime", torch.device("cpu"))
    try:
        scale = runner.pipe.spec.sampling.guidance if guidance is None else float(guidance)
        return collect_unet_feeds(runner, BenchCase(height, width, 1, steps), scale, prompts, limit=limit)
    finally:
        runner.close()


def prepare_int8(t: Targets, fp32: PipelineRunner, case: BenchCase, guidance: float, recipe: str, out_dir: Path,
                 say: Callable[[str], None], tick: Callable[[], None]) -> None:
    """Quantize the UNet of the fp32 ONNX Runtime engines into `out_dir/engines-onnxruntime-int8`."""
    from latentrt.engines.quantize import RECIPES, quantize_engine_dir

    if INT8 in t.folders:
        return
    feeds: list[dict[str, np.ndarray]] = []
    if RECIPES[recipe].method == "static":
        say(f"collecting calibration inputs ({len(CALIBRATION_PROMPTS)} fp32 runs)")
        feeds = collect_unet_feeds(fp32, case, guidance, CALIBRATION_PROMPTS, tick=tick)
    say(f"quantizing the UNet to int8 ({recipe})")
    start = time.perf_counter()
    if t.onnx_dir is None:
        raise InvalidRequest("int8 needs the fp32 ONNX export the engines were built from")
    unet = read_manifest(t.onnx_dir, ONNX_KIND)["components"].get("unet")
    if not isinstance(unet, Mapping):
        raise InvalidRequest(f"{t.onnx_dir} has no unet to quantize to int8")
    t.folders[INT8] = quantize_engine_dir(t.folders["onnxruntime"], out_dir / f"engines-{INT8}", recipe=recipe,
                                          calibration_feeds=feeds, overwrite=True,
                                          onnx_path=inside(t.onnx_dir, unet.get("path"), f"{t.onnx_dir} unet path"))
    t.build["quantize_s"] = round(time.perf_counter() - start, 3)
    t.build["int8"] = read_manifest(t.folders[INT8])["components"]["unet"].get("int8")


def make_runner(label: str, t: Targets, device: torch.device) -> Runner:
    if label == "reference":
        if t.checkpoint is None:
            raise InvalidRequest("the reference backend needs the source checkpoint, which the folder does not name")
        return ReferenceRunner(t.checkpoint, device, t.family)
    backend = "onnxruntime" if label == INT8 else label
    return PipelineRunner(label, t.folders[label], backend, device)


# ---------------------------------------------------------------------------- measuring


def rotated(labels: Sequence[str], i: int) -> list[str]:
    """Round i's order: the labels rotated by i (every backend takes every position equally often)."""
    k = i % len(labels)
    return list(labels[k:]) + list(labels[:k])


def measure_case(runners: Mapping[str, Runner], case: BenchCase, *, warmup: int, runs: int, seed: int, prompt: str,
                 guidance: float, tick: Callable[[], None]) -> dict[str, list[Sample]]:
    """`warmup` unrecorded rounds, then `runs` measured rounds interleaved across backends."""
    labels = list(runners)
    for i in range(warmup):
        for label in rotated(labels, i):
            runners[label].generate(case, seed, prompt, guidance)
            tick()
    samples: dict[str, list[Sample]] = {label: [] for label in labels}
    for i in range(runs):
        for label in rotated(labels, i):
            samples[label].append(runners[label].generate(case, seed, prompt, guidance))
            tick()
    return samples


# ---------------------------------------------------------------------------- sweeps


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


# ---------------------------------------------------------------------------- the benchmark


def _spec_of(t: Targets) -> Any:
    from latentrt.families import get_family
    from latentrt.reference.models import detect_family, resolve

    if t.family:
        return get_family(t.family)
    assert t.checkpoint is not None
    return detect_family(resolve(t.checkpoint)[0])


def _check_args(labels: Sequence[str], runs: int, warmup: int, batch: int, precision: str) -> None:
    unknown = [b for b in labels if b not in BACKENDS]
    if unknown:
        raise InvalidRequest(f"unknown backend(s) {', '.join(unknown)}; choose among {', '.join(BACKENDS)}")
    if not labels:
        raise InvalidRequest("name at least one backend")
    if runs < 1 or warmup < 0 or batch < 1:
        raise InvalidRequest(f"need runs >= 1, warmup >= 0 and batch >= 1 (got {runs}, {warmup}, {batch})")
    if precision not in ("fp32", "int8"):
        raise InvalidRequest(f"unknown precision {precision!r}; choose fp32 or int8 (int8: adds an int8-UNet "
                             "ONNX Runtime engine set next to the fp32 one)")


def _cold(sample: Sample) -> dict[str, Any]:
    return {"end_to_end_ms": round(sample.total_ms, 3),
            "stages_ms": {k: round(sum(v), 3) for k, v in sample.stages.items() if k != "total"}}


def run_bench(model_or_dir: str | os.PathLike[str], *, backends: Sequence[str] = ("reference", "onnxruntime"),
              steps: int | None = None, guidance: float | None = None, sizes: Sequence[Size] | None = None,
              batch: int = 1, warmup: int = 1, runs: int = 5, sweep: Mapping[str, Sequence[Any]] | None = None,
              out_dir: str | os.PathLike[str] = "bench-out", progress: Progress | None = None,
              precision: str = "fp32", int8_recipe: str | None = None, device: str = "cpu", seed: int = 0,
              prompt: str = PROMPT, flops: bool = True, plots: bool = True,
              build_dir: str | os.PathLike[str] | None = None) -> BenchRecord:
    """Benchmark backends side by side on one model; writes bench.json, bench.md and PNG plots to `out_dir`.

    Args:
        model_or_dir: a checkpoint (diffusers folder, tiny:<family>), an ONNX export, or an engine folder.
        backends: any of reference (diffusers), torch, onnxruntime, onnxruntime-int8, tensorrt (CUDA only).
        steps / guidance: sampling settings (default: the family's).
        sizes: (height, width) pixel sizes; the first is the main case, more are measured as a size sweep.
        batch: images per prompt.
        warmup / runs: unrecorded rounds per case, then measured rounds (interleaved across backends).
        sweep: {"steps": [1, 2, 4]}, {"size": ["256x256", "512x512"]} and/or {"batch": [1, 2]}.
        out_dir: where the reports go (and built engines, unless `build_dir` is given).
        progress: called with a BenchEvent after each generation and at each phase.
        precision: "int8" also benchmarks an int8-UNet copy of the ONNX Runtime engines ("onnxruntime-int8").
        int8_recipe: the quantization recipe (`latentrt.engines.quantize.RECIPES`; default its DEFAULT_RECIPE).
        device: "cpu" or "cuda".
        seed / prompt: the request every run repeats.
        flops: count UNet FLOPs (PyTorch flop counter) and report achieved GFLOP/s.
        plots: write PNG plots (matplotlib, Agg).
        build_dir: where the ONNX export and engines built for the benchmark go (default: `out_dir`).
    """
    from latentrt.engines.quantize import DEFAULT_RECIPE, RECIPES

    from .denoisers import needs_cfg

    labels: list[str] = list(dict.fromkeys([*backends, *([INT8] if precision == "int8" else [])]))
    if INT8 in labels and "onnxruntime" not in labels:
        labels.insert(labels.index(INT8), "onnxruntime")  # the fp32 engines calibrate and anchor the int8 ones
    _check_args(labels, runs, warmup, batch, precision)
    recipe = int8_recipe or DEFAULT_RECIPE
    if recipe not in RECIPES:
        raise InvalidRequest(f"unknown int8 recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    with removed_if_failed(out_dir, build_dir):  # a failed bench leaves no folder the user did not have
        out = check_writable(Path(out_dir))
        builds = check_writable(Path(build_dir)) if build_dir is not None else out
        dev = torch.device(device)
        machine = machine_info(dev, peaks=flops)
        state = {"done": 0, "total": 0}

        def say(message: str) -> None:
            log.info("%s", message)
            if progress:
                progress(BenchEvent(state["done"], state["total"], message))

        def tick() -> None:
            state["done"] += 1
            if progress:
                progress(BenchEvent(state["done"], state["total"]))

        t = prepare_targets(model_or_dir, labels, builds, dev, say)
        spec = _spec_of(t)
        main = BenchCase(*(list(sizes)[0] if sizes else spec.native_size), batch=batch,
                         steps=steps if steps is not None else spec.sampling.steps)
        scale: float = spec.sampling.guidance if guidance is None else float(guidance)
        sweeps = sweep_cases(main, dict(sweep or {}))
        if sizes and len(sizes) > 1 and "size" not in sweeps:
            sweeps["size"] = sweep_cases(main, {"size": list(sizes)})["size"]
        cases = list({c.name: c for c in [main, *(c for cs in sweeps.values() for c in cs)]}.values())
        calib = len(CALIBRATION_PROMPTS) if INT8 in labels and INT8 not in t.folders and \
            RECIPES[recipe].method == "static" else 0
        state["total"] = len(labels) + calib + sum((warmup + runs) * len(labels) for _ in cases) - len(labels) * min(warmup, 1)

        runners: dict[str, Runner] = {}
        try:
            for label in labels:
                if label == INT8:
                    fp32 = runners["onnxruntime"]
                    assert isinstance(fp32, PipelineRunner)
                    prepare_int8(t, fp32, main, scale, recipe, builds, say, tick)
                say(f"loading {label}")
                runners[label] = make_runner(label, t, dev)
            info = {label: {"describe": r.describe, "load_s": round(r.load_s, 3), "rss_load_mb": round(r.rss_load_mb, 1),
                            "folder": str(t.folders.get(label, t.checkpoint))} for label, r in runners.items()}
            say("cold runs")
            for label, r in runners.items():
                info[label]["cold"] = _cold(r.generate(main, seed, prompt, scale))
                tick()
            results: dict[str, dict[str, Any]] = {}
            for i, case in enumerate(cases):
                say(f"case {i + 1}/{len(cases)}: {case.name}")
                rounds = warmup - 1 if i == 0 and warmup else warmup  # the cold run was the first warm-up
                samples = measure_case(runners, case, warmup=rounds, runs=runs, seed=seed, prompt=prompt,
                                       guidance=scale, tick=tick)
                f = spec.vae_scale_factor
                cfg = needs_cfg(scale)
                gflop = unet_gflop(t.checkpoint, t.family, case, cfg) if flops and t.checkpoint else None
                results[case.name] = case_result(case, samples, gflop, (case.height // f, case.width // f),
                                                 case.batch * (2 if cfg else 1),
                                                 machine.get("peak", {}).get("fp32_gemm_gflops"))
        finally:
            for r in runners.values():
                r.close()
        machine.update({"peak_rss_mb": round(peak_rss_mb(), 1), "loadavg_end": _loadavg()})
        settings = {"model": os.fspath(model_or_dir), "checkpoint": t.checkpoint, "family": spec.name,
                    "backends": labels, "steps": main.steps, "guidance": scale, "size": [main.height, main.width],
                    "batch": batch, "warmup": warmup, "runs": runs, "seed": seed, "prompt": prompt, "device": str(dev),
                    "precision": precision, "int8_recipe": recipe if INT8 in labels else None,
                    "sweep": {k: [c.name for c in v] for k, v in sweeps.items()},
                    "ratio_definition": "reference p50 / backend p50 (> 1: faster than the diffusers pipeline); "
                                        "unet_per_step compares single UNet calls"}
        record = BenchRecord(machine, settings, t.build, info, [results[c.name] for c in cases],
                             {k: sweep_summary(k, v, results) for k, v in sweeps.items()})
        write_reports(record, out, plots=plots)
        return record
