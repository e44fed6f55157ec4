"""`latentrt bench` end to end: export, build and quantize what the benchmark needs and is not given, then
measure with `latentrt.runtime.bench` (which only measures what it is handed)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentrt.choices import Backend, Precision
from latentrt.errors import BackendUnavailable, InvalidRequest, OutputConflict
from latentrt.manifest import ONNX_KIND, check_writable, read_manifest
from latentrt.outputs import removed_if_failed
from latentrt.paths import inside
from latentrt.runtime.bench import (
    CALIBRATION_PROMPTS,
    INT8,
    OPENVINO,
    OV_BF16,
    OV_INT8,
    OV_NAIVE,
    PROMPT,
    BenchCase,
    BenchRecord,
    PipelineRunner,
    Progress,
    Targets,
    collect_unet_feeds,
    make_runner,
    read_targets,
)
from latentrt.runtime.bench.cases import Size, check_args, plan_cases
from latentrt.runtime.bench.runner import Runner
from latentrt.runtime.bench.session import Reporter, finish, generations, measure
from latentrt.runtime.bench.stats import machine_info
from latentrt.runtime.bench.targets import add_named

__all__ = ["prepare_int8", "prepare_targets", "run_bench"]

ORT, TRT, TORCH = Backend.ONNXRUNTIME.value, Backend.TENSORRT.value, Backend.TORCH.value


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 3)


def prepare_targets(model_or_dir: str | os.PathLike[str], labels: Sequence[str], out_dir: Path, device: torch.device,
                    say: Callable[[str], None]) -> Targets:
    """Export / build whatever the requested backends need and is not given (timed); int8 comes later."""
    t = read_targets(model_or_dir)
    missing = [b for b in (ORT, TRT, OPENVINO, OV_BF16, OV_INT8) if b in labels and b not in t.folders]
    if TRT in missing and device.type != "cuda":
        raise BackendUnavailable("the tensorrt backend needs a CUDA GPU; bench on --device cuda or drop it")
    quantize = INT8 in labels and INT8 not in t.folders  # int8 is quantized from the fp32 export's UNet
    naive = OV_NAIVE in labels and OV_NAIVE not in t.folders  # runs the export's ONNX files
    if (missing or quantize or naive) and t.onnx_dir is None:
        if t.checkpoint is None:
            raise InvalidRequest(f"{model_or_dir} names no source checkpoint or ONNX export to build from")
        from latentrt.export.onnx import export_model

        say(f"exporting {t.checkpoint} to ONNX")
        t.onnx_dir, t.build["export_s"] = _timed(lambda: export_model(t.checkpoint or "", out_dir / "onnx",
                                                                       family=t.family, overwrite=True))
    for label in missing:
        backend, _, precision = label.partition("-")
        say(f"building {label} engines")
        dest, build_device = out_dir / f"engines-{label}", "cuda" if device.type == "cuda" else "cpu"
        t.folders[label], t.build[f"build_{label}_s"] = _timed(
            lambda b=backend, p=precision or None, d=dest, bd=build_device: _build_or_reuse(
                t.onnx_dir or "", d, backend=b, device=bd, precision=p))
    if naive and t.onnx_dir is not None:
        t.folders[OV_NAIVE] = t.onnx_dir
    if TORCH in labels:
        if t.checkpoint is None:
            raise InvalidRequest(f"{model_or_dir} names no source checkpoint: the torch backend cannot be loaded")
        t.folders[TORCH] = t.onnx_dir or Path(t.checkpoint)
    return t


def _build_or_reuse(onnx_dir: str | os.PathLike[str], dest: Path, **options: Any) -> Path:
    """Build engines into `dest`, reusing those an earlier bench of the same export left there whose cache keys
    still match (a full SD build takes tens of minutes on a small CPU); anything else there is replaced."""
    from latentrt.workflows.build import build_engines  # records int8 calibration feeds when it needs them

    try:
        return build_engines(onnx_dir, dest, overwrite=False, **options)
    except OutputConflict:  # another model's engines, or a folder that is not usable engines: replace it
        return build_engines(onnx_dir, dest, overwrite=True, **options)


def prepare_int8(t: Targets, fp32: PipelineRunner, case: BenchCase, guidance: float, recipe: str, out_dir: Path,
                 say: Callable[[str], None], tick: Callable[[], None]) -> None:
    """Quantize the UNet of the fp32 ONNX Runtime engines into `out_dir/engines-onnxruntime-int8` (static recipes:
    calibrated on the UNet inputs `fp32` sees while sampling the calibration prompts)."""
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
    t.folders[INT8] = quantize_engine_dir(t.folders[ORT], out_dir / f"engines-{INT8}", recipe=recipe,
                                          calibration_feeds=feeds, overwrite=True,
                                          onnx_path=inside(t.onnx_dir, unet.get("path"), f"{t.onnx_dir} unet path"))
    t.build["quantize_s"] = round(time.perf_counter() - start, 3)
    t.build["int8"] = read_manifest(t.folders[INT8])["components"]["unet"].get("int8")


def run_bench(model_or_dir: str | os.PathLike[str], *, backends: Sequence[str] = ("reference", ORT),
              steps: int | None = None, guidance: float | None = None, sizes: Sequence[Size] | None = None,
              batch: int = 1, warmup: int = 1, runs: int = 5, sweep: Mapping[str, Sequence[Any]] | None = None,
              out_dir: str | os.PathLike[str] = "bench-out", progress: Progress | None = None,
              precision: str = Precision.FP32.value, int8_recipe: str | None = None, device: str = "cpu",
              seed: int = 0, prompt: str = PROMPT, flops: bool = True, plots: bool = True,
              build_dir: str | os.PathLike[str] | None = None,
              engines: Mapping[str, str | os.PathLike[str]] | None = None,
              compare_to: Sequence[str] = ()) -> BenchRecord:
    """Benchmark backends side by side on one model; writes bench.json, bench.md and PNG plots to `out_dir`.

    Args:
        model_or_dir: a checkpoint (diffusers folder, tiny:<family>), an ONNX export, or an engine folder.
        backends: any of reference (diffusers, float32), reference-bf16 (diffusers in bfloat16), reference-1thread
            (diffusers float32, torch on one thread), torch, onnxruntime, onnxruntime-int8, tensorrt (CUDA only),
            openvino, openvino-bf16, openvino-int8 (built here when not given) and openvino-naive (the export's
            ONNX files on OpenVINO with default settings and the bf16 hint: the plain-OpenVINO baseline).
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
        engines: more engine folders to measure, each under a label of the caller's choosing ({"ours": folder}):
            engines `latentrt build` wrote from the same checkpoint, run on the backend their manifest names.
        compare_to: labels every other backend is also compared with (speedup and image difference), e.g.
            "openvino-naive" to rate each backend against plain OpenVINO.
    """
    from latentrt.engines.quantize import DEFAULT_RECIPE, RECIPES

    labels: list[str] = list(dict.fromkeys([*backends, *([INT8] if precision == Precision.INT8.value else [])]))
    if INT8 in labels and ORT not in labels:
        labels.insert(labels.index(INT8), ORT)  # the fp32 engines calibrate and anchor the int8 ones
    check_args(labels, runs, warmup, batch, precision)
    named = dict(engines or {})
    unknown = [k for k in compare_to if k not in labels and k not in named]
    if unknown:
        raise InvalidRequest(f"--compare-to {', '.join(unknown)}: not among the benchmarked labels "
                             f"({', '.join([*labels, *named])})")
    recipe = int8_recipe or DEFAULT_RECIPE
    if recipe not in RECIPES:
        raise InvalidRequest(f"unknown int8 recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    with removed_if_failed(out_dir, build_dir):  # a failed bench leaves no folder the user did not have
        out = check_writable(Path(out_dir))
        builds = check_writable(Path(build_dir)) if build_dir is not None else out
        dev = torch.device(device)
        machine = machine_info(dev, peaks=flops)
        reporter = Reporter(progress)
        t = prepare_targets(model_or_dir, labels, builds, dev, reporter.say)
        for name, folder in named.items():
            add_named(t, name, folder)
        labels += list(named)
        spec = t.spec()
        main = BenchCase(*(list(sizes)[0] if sizes else spec.native_size), batch=batch,
                         steps=steps if steps is not None else spec.sampling.steps)
        scale: float = spec.sampling.guidance if guidance is None else float(guidance)
        sweeps, cases = plan_cases(main, sizes, sweep)
        calibration = len(CALIBRATION_PROMPTS) if INT8 in labels and INT8 not in t.folders and \
            RECIPES[recipe].method == "static" else 0
        reporter.total = generations(labels, cases, warmup, runs, calibration)
        runners: dict[str, Runner] = {}
        try:
            for label in labels:
                if label == INT8:
                    fp32 = runners[ORT]
                    assert isinstance(fp32, PipelineRunner)
                    prepare_int8(t, fp32, main, scale, recipe, builds, reporter.say, reporter.tick)
                reporter.say(f"loading {label}")
                runners[label] = make_runner(label, t, dev, runners)
            info, results = measure(runners, t, spec, cases, warmup=warmup, runs=runs, seed=seed, prompt=prompt,
                                    guidance=scale, flops=flops, machine=machine, reporter=reporter,
                                    compare_to=compare_to)
        finally:
            for r in runners.values():
                r.close()
        return finish(model_or_dir, t, spec, labels, cases, sweeps, info, results, machine, out, guidance=scale,
                      warmup=warmup, runs=runs, seed=seed, prompt=prompt, device=str(dev), precision=precision,
                      int8_recipe=recipe, plots=plots, compare_to=compare_to)
