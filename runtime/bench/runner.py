"""Runners of `latentrt bench`: a LatentRT pipeline or the diffusers pipeline, one generation -> one `Sample`.

Both are timed with a `StageTimer` (perf_counter on CPU, CUDA events + NVTX ranges on CUDA): the LatentRT
pipeline times its own stages, the diffusers pipeline is timed from module hooks. The engines' own compute
time is what the pipeline's timer recorded for the engine components' stages.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from latentrt.choices import Backend
from latentrt.errors import InvalidRequest
from latentrt.families import FamilySpec

from ..backends.base import Engine
from ..timing import StageTimer, TimingRecord
from .cases import (
    CALIBRATION_PROMPTS,
    OV_NAIVE,
    REF_1THREAD,
    REF_BF16,
    REFERENCE,
    BenchCase,
    Sample,
    runtime_backend,
)
from .stats import rss_mb
from .targets import Targets

REFINER_PREFIX = "refiner_"  # the pipeline's stage names for the SDXL refiner's engines


def request_inputs(spec: FamilySpec, case: BenchCase) -> dict[str, Any]:
    """Extra inputs the family needs for a txt2img-like run: an init image (+ mask) for inpainting / refiner.

    A denoiser that takes a mask needs an init image and a mask; a refiner (its family `refines` others'
    latents) runs image-to-image on its own, as its diffusers pipeline does, so it gets an init image.
    """
    from PIL import Image

    if not (spec.takes_mask or spec.refines):
        return {}
    y, x = np.mgrid[0:case.height, 0:case.width]
    rgb = np.stack([x / case.width, y / case.height, 0.5 + 0 * x], axis=-1)
    out: dict[str, Any] = {"image": Image.fromarray((255 * rgb).astype(np.uint8))}
    if spec.takes_mask:
        box = (abs(y - case.height / 2) < case.height / 4) & (abs(x - case.width / 2) < case.width / 4)
        out["mask"] = Image.fromarray((255 * box).astype(np.uint8))
    return out


def stages_of(record: TimingRecord) -> dict[str, list[float]]:
    """Stage -> its entries in ms, in the order they were recorded."""
    stages: dict[str, list[float]] = {}
    for name, ms in record.entries:
        stages.setdefault(name, []).append(ms)
    return stages


def engine_ms(record: TimingRecord, components: Collection[str]) -> float:
    """The engines' own compute: the entries of the engine components' stages (the refiner's included)."""
    return float(sum(ms for name, ms in record.entries if name.removeprefix(REFINER_PREFIX) in components))


class _FeedRecorder:
    """Stands in for one engine while calibration data is recorded: copies each feed, then runs the engine."""

    def __init__(self, engine: Engine, feeds: list[dict[str, np.ndarray]]):
        self._engine, self._feeds = engine, feeds

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def run(self, feed: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        self._feeds.append({k: v.detach().float().cpu().numpy().copy() for k, v in feed.items()})
        return self._engine.run(feed, *args, **kwargs)


@contextlib.contextmanager
def recording_feeds(engines: dict[str, Engine], component: str,
                    feeds: list[dict[str, np.ndarray]]) -> Iterator[None]:
    """Append every feed `component` runs (float32 numpy copies) to `feeds` while the body runs."""
    engine = engines[component]
    engines[component] = cast(Engine, _FeedRecorder(engine, feeds))
    try:
        yield
    finally:
        engines[component] = engine


class PipelineRunner:
    """A LatentRT pipeline on one backend."""

    def __init__(self, label: str, folder: str | os.PathLike[str], backend: str, device: torch.device):
        from ..pipeline import load_pipeline

        self.label, self.device = label, device
        before, start = rss_mb(), time.perf_counter()
        self.pipe = load_pipeline(folder, backend=backend, device=device)
        self.load_s = time.perf_counter() - start
        self.rss_load_mb = rss_mb() - before
        self.describe = self.pipe.engines.describe()

    def generate(self, case: BenchCase, seed: int, prompt: str, guidance: float) -> Sample:
        from ..pipeline import GenerationRequest

        _reset_gpu_peak(self.device)
        request = GenerationRequest(prompt=prompt, steps=case.steps, guidance=guidance, width=case.width,
                                    height=case.height, seed=seed, num_images_per_prompt=case.batch,
                                    **request_inputs(self.pipe.spec, case))
        result = self.pipe.generate(request)
        assert result.array is not None
        return Sample(stages_of(result.timing), engine_ms(result.timing, set(self.pipe.engines.engines)),
                      _gpu_peak(self.device), result.array)

    def close(self) -> None:
        self.pipe.close()


class NaiveOpenVinoRunner(PipelineRunner):
    """OpenVINO driven the plain way: one model per component compiled straight from the export's ONNX files with
    the plugin's default settings plus the bf16 inference precision hint, run by the same sampling loop."""

    def __init__(self, onnx_dir: str | os.PathLike[str]):
        from latentrt.manifest import ONNX_KIND, read_manifest

        from ..engine_set import load_onnx_openvino
        from ..pipeline import Pipeline

        self.label, self.device = OV_NAIVE, torch.device("cpu")
        before, start = rss_mb(), time.perf_counter()
        folder = Path(onnx_dir)
        self.pipe = Pipeline(load_onnx_openvino(folder, read_manifest(folder, ONNX_KIND), inference_precision="bf16"))
        self.load_s = time.perf_counter() - start
        self.rss_load_mb = rss_mb() - before
        self.describe = self.pipe.engines.describe()


class DiffusersModel:
    """The diffusers pipeline of a checkpoint (eager PyTorch in one dtype), loaded once and timed per stage from
    module hooks into `timer`; the float32 one is shared by "reference" and "reference-1thread"."""

    def __init__(self, checkpoint: str, device: torch.device, family: str | None, dtype: torch.dtype):
        from diffusers import DiffusionPipeline

        from latentrt.families import get_family
        from latentrt.reference.models import detect_family, quiet_progress, resolve

        folder, _ = resolve(checkpoint)
        self.device, self.dtype = device, dtype
        before, start = rss_mb(), time.perf_counter()
        with quiet_progress():
            self.pipe: Any = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype)
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.load_s = time.perf_counter() - start
        self.rss_load_mb = rss_mb() - before
        self.spec = get_family(family) if family else detect_family(folder)
        self.timer = StageTimer(device)
        self._hook()

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
            with self.timer.stage(stage):
                return fn(*args, **kwargs)

        return timed


class ReferenceRunner:
    """The diffusers pipeline (eager PyTorch) on the checkpoint's own folder: float32 on torch's threads
    ("reference"), bfloat16 ("reference-bf16") or float32 on one thread ("reference-1thread": eager torch degrades
    badly on a busy machine, so both baselines are worth quoting). Given a loaded `model` (the other float32
    label's; `make_runner` passes one of the same dtype and device), it runs that one: no second copy of the
    weights, no load time of its own."""

    def __init__(self, checkpoint: str, device: torch.device, family: str | None = None, *,
                 dtype: torch.dtype = torch.float32, threads: int | None = None, model: DiffusersModel | None = None):
        self.device, self.threads = device, threads
        self.label = REF_BF16 if dtype == torch.bfloat16 else REF_1THREAD if threads == 1 else REFERENCE
        shared = model is not None
        self.model = model or DiffusersModel(checkpoint, device, family, dtype)
        self.load_s, self.rss_load_mb = (0.0, 0.0) if shared else (self.model.load_s, self.model.rss_load_mb)
        self.spec = self.model.spec
        where = f"{device}, {threads} thread(s)" if threads else str(device)
        self.describe = [f"diffusers {type(self.model.pipe).__name__} (eager PyTorch "
                         f"{str(dtype).removeprefix('torch.')}) on {where}" + (", weights shared" if shared else "")]

    def generate(self, case: BenchCase, seed: int, prompt: str, guidance: float) -> Sample:
        _reset_gpu_peak(self.device)
        kwargs = request_inputs(self.spec, case)
        if "mask" in kwargs:
            kwargs["mask_image"] = kwargs.pop("mask")
        generator = torch.Generator("cpu").manual_seed(seed)
        timer = self.model.timer = StageTimer(self.device)
        threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with timer.stage("total"):
                out = self.model.pipe(prompt=prompt, num_inference_steps=case.steps, guidance_scale=guidance,
                                      height=case.height, width=case.width, num_images_per_prompt=case.batch,
                                      generator=generator, output_type="np", **kwargs)
        finally:
            torch.set_num_threads(threads)
        return Sample(stages_of(timer.record()), None, _gpu_peak(self.device), np.asarray(out.images, dtype=np.float32))

    def close(self) -> None:
        self.model = cast(DiffusersModel, None)


def _reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _gpu_peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


Runner = PipelineRunner | ReferenceRunner


def make_runner(label: str, t: Targets, device: torch.device, loaded: Mapping[str, Runner] | None = None) -> Runner:
    """The runner of one benchmark label, over the folder `t` holds for it. `loaded`: the runners made so far (a
    diffusers label reuses another's pipeline of the same dtype instead of loading the weights twice)."""
    if label in (REFERENCE, REF_BF16, REF_1THREAD):
        if t.checkpoint is None:
            raise InvalidRequest(f"the {label} backend needs the source checkpoint, which the folder does not name")
        dtype = torch.bfloat16 if label == REF_BF16 else torch.float32
        model = next((r.model for r in (loaded or {}).values() if isinstance(r, ReferenceRunner)
                      and r.model.dtype == dtype and r.model.device == device), None)
        return ReferenceRunner(t.checkpoint, device, t.family, dtype=dtype,
                               threads=1 if label == REF_1THREAD else None, model=model)
    if label == OV_NAIVE:
        return NaiveOpenVinoRunner(t.folders[label])
    if label in t.named:
        return PipelineRunner(label, t.folders[label], t.named[label], device)
    return PipelineRunner(label, t.folders[label], runtime_backend(label), device)


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


# ---------------------------------------------------------------------------- int8 calibration data


def collect_unet_feeds(runner: PipelineRunner, case: BenchCase, guidance: float, prompts: Sequence[str],
                       limit: int = 32, tick: Callable[[], None] | None = None,
                       decoder_feeds: list[dict[str, np.ndarray]] | None = None) -> list[dict[str, np.ndarray]]:
    """UNet inputs seen while `runner` (fp32) samples `prompts` (one seed each): calibration data for static int8,
    at most `limit` of them, evenly spread over the runs. With a `decoder_feeds` list, the VAE decoder's inputs
    (one per run) are appended to it too."""
    feeds: list[dict[str, np.ndarray]] = []
    engines = runner.pipe.engines.engines
    with recording_feeds(engines, "unet", feeds), \
            recording_feeds(engines, "vae_decoder", decoder_feeds) if decoder_feeds is not None \
            else contextlib.nullcontext():
        for seed, prompt in enumerate(prompts):
            runner.generate(case, seed, prompt, guidance)
            if tick:
                tick()
    if len(feeds) > limit:
        keep = np.linspace(0, len(feeds) - 1, limit).round().astype(int)
        feeds = [feeds[i] for i in dict.fromkeys(keep.tolist())]
    return feeds


def calibration_feeds(folder: str | os.PathLike[str], *, height: int, width: int, steps: int,
                      guidance: float | None = None, prompts: Sequence[str] = CALIBRATION_PROMPTS,
                      limit: int = 32, decoder_feeds: list[dict[str, np.ndarray]] | None = None,
                      ) -> list[dict[str, np.ndarray]]:
    """Static-int8 calibration data for the engine builder: UNet inputs recorded while the fp32 engines (or ONNX
    export) in `folder` sample `prompts` (one seed each) on ONNX Runtime (CPU) at the given size and steps (and
    the VAE decoder's inputs appended to `decoder_feeds` when given)."""
    ort = Backend.ONNXRUNTIME.value
    runner = PipelineRunner(ort, folder, ort, torch.device("cpu"))
    try:
        scale = runner.pipe.spec.sampling.guidance if guidance is None else float(guidance)
        return collect_unet_feeds(runner, BenchCase(height, width, 1, steps), scale, prompts, limit=limit,
                                  decoder_feeds=decoder_feeds)
    finally:
        runner.close()
