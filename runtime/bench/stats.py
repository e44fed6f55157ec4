"""Statistics of `latentrt bench`: percentiles, per-stage summaries, ratios, sweep fits, UNet FLOPs and
the machine's measured GEMM peak. Pure functions of measured samples (plus the machine probes)."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentrt.manifest import tool_versions
from latentrt.names import DIM_LATENT_HEIGHT, DIM_LATENT_WIDTH, DIM_SEQUENCE, DIM_UNET_BATCH
from latentrt.parity import compare

from .cases import BACKENDS, INT8, REFERENCE, BenchCase, Sample, fp32_label

PERCENTILES = (50, 90, 99)


# ---------------------------------------------------------------------------- statistics


def percentile_stats(values: Sequence[float]) -> dict[str, float]:
    """mean, min, max, p50, p90, p99 (linear interpolation) of a list of milliseconds."""
    a = np.asarray(values, dtype=np.float64)
    out = {"n": int(a.size), "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}
    out.update({f"p{q}": float(np.percentile(a, q)) for q in PERCENTILES})
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def psnr_db(got: np.ndarray, ref: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two images in [0, 1] (inf when identical), from `latentrt.parity`."""
    return compare({"image": got}, {"image": ref}, peak=1.0).tensor("image").psnr_db


def image_diff(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """max |diff| (in [0, 1] units) and PSNR (dB) between two image batches (`latentrt.parity` report)."""
    t = compare({"image": got}, {"image": ref}, peak=1.0).tensor("image")
    return {"max_abs_diff": round(t.max_abs_diff, 6), "psnr_db": round(t.psnr_db, 3)}


def stage_stats(samples: Sequence[Sample]) -> dict[str, dict[str, Any]]:
    """Per stage: statistics of the per-run sum and of single calls (unet: per step)."""
    names = list(dict.fromkeys(s for sample in samples for s in sample.stages))
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        per_run = [sum(x.stages.get(name, [])) for x in samples]
        calls = [v for x in samples for v in x.stages.get(name, [])]
        out[name] = {"calls_per_run": len(calls) / len(samples), "per_run": percentile_stats(per_run),
                     "per_call": percentile_stats(calls) if calls else None}
    return out


def overhead(samples: Sequence[Sample]) -> dict[str, Any]:
    """End-to-end minus timed stages, and end-to-end minus the engines' own compute (ms and % of total)."""
    totals = np.array([x.total_ms for x in samples])
    staged = np.array([sum(sum(v) for k, v in x.stages.items() if k != "total") for x in samples])
    out: dict[str, Any] = {"untimed_ms": round(float(np.mean(totals - staged)), 4),
                           "untimed_pct": round(float(100 * np.mean((totals - staged) / totals)), 4)}
    if all(x.engine_ms is not None for x in samples):
        engine = np.array([x.engine_ms or 0.0 for x in samples])
        out.update({"engine_ms": round(float(np.mean(engine)), 4),
                    "pipeline_ms": round(float(np.mean(totals - engine)), 4),
                    "pipeline_pct": round(float(100 * np.mean((totals - engine) / totals)), 4)})
    return out


def summarize(samples: Sequence[Sample], case: BenchCase) -> dict[str, Any]:
    """The figures of one backend on one case."""
    stats = stage_stats(samples)
    e2e = stats["total"]["per_run"]
    peaks = [x.gpu_peak_mb for x in samples if x.gpu_peak_mb is not None]
    return {
        "end_to_end_ms": e2e,
        "images_per_s": round(case.batch * len(samples) / (sum(x.total_ms for x in samples) / 1e3), 5),
        "stages": stats,
        "overhead": overhead(samples),
        "gpu_peak_mb": round(max(peaks), 2) if peaks else None,
        "runs_ms": [round(x.total_ms, 3) for x in samples],
    }


# ---------------------------------------------------------------------------- machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD / matrix extensions that decide CPU speed (AVX2, AVX-512, VNNI, AMX)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                                    "amx_int8") if f in have]
    return []


def rss_mb() -> float:
    """Current resident memory of this process (Linux /proc; 0 elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (getrusage; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 1024


def measure_peak_gflops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Measured dense GEMM throughput: fp32 (torch.mm) and int8 (ONNX Runtime MatMulInteger) on this CPU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = {"fp32_gemm_gflops": round(2 * n**3 / _best_of(lambda: a @ b, repeats) / 1e9, 1)}
    with contextlib.suppress(Exception):  # the int8 figure is informative only
        out["int8_gemm_gops"] = round(2 * n**3 / _int8_gemm_seconds(n, repeats) / 1e9, 1)
    return out


def _best_of(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _int8_gemm_seconds(n: int, repeats: int) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-127, 127, (n, n)).astype(np.int8), "W")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["X", "W"], ["Y"])], "int8_gemm",
                              [helper.make_tensor_value_info("X", TensorProto.UINT8, [n, n])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # ONNX Runtime 1.32 reads IR versions up to 13
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.integers(0, 255, (n, n)).astype(np.uint8)
    return _best_of(lambda: session.run(None, {"X": x}), repeats)


def machine_info(device: torch.device, peaks: bool = True) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "device": str(device),
                            "tools": tool_versions(), "loadavg_start": loadavg()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    elif peaks:
        info["peak"] = measure_peak_gflops()
    return info


def loadavg() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


# ---------------------------------------------------------------------------- cases


def stage_p50(summary: Mapping[str, Any], stage: str, per: str = "per_run") -> float | None:
    """The median of one stage of a backend's summary (per run, or per call: unet per step); None if absent."""
    entry = summary["stages"].get(stage)
    return None if entry is None or entry.get(per) is None else float(entry[per]["p50"])


def ratios(base: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, float]:
    """base p50 / other p50 for end to end and each shared stage (unet: per step)."""
    out: dict[str, float] = {}
    for stage in base["stages"]:
        per = "per_call" if stage == "unet" else "per_run"
        a, b = stage_p50(base, stage, per), stage_p50(other, stage, per)
        if a is not None and b:
            out["end_to_end" if stage == "total" else ("unet_per_step" if stage == "unet" else stage)] = round(a / b, 4)
    return out


def image_baseline(labels: Sequence[str]) -> str | None:
    """What images are compared with: the diffusers reference, else the first fp32 LatentRT backend."""
    if REFERENCE in labels:
        return REFERENCE
    return next((k for k in labels if k in BACKENDS and fp32_label(k) is None), None)


def case_result(case: BenchCase, samples: Mapping[str, list[Sample]], flops: float | None,
                latent: tuple[int, int], unet_batch: int, peak_gflops: float | None = None,
                compare_to: Sequence[str] = ()) -> dict[str, Any]:
    """Per-backend figures of one case, with ratios to the reference and image differences (and, for each label
    in `compare_to`, every other backend's speedup over it and image difference from it)."""
    results = {label: summarize(s, case) for label, s in samples.items()}
    out: dict[str, Any] = {"name": case.name, "case": case.__dict__, "latent": list(latent), "unet_batch": unet_batch,
                           "results": results}
    if REFERENCE in results:
        out["vs_reference"] = {k: ratios(results[REFERENCE], v) for k, v in results.items() if k != REFERENCE}
    baseline = image_baseline(list(results))
    if baseline is not None:  # every other backend's final image against the fp32 baseline's
        base_image = samples[baseline][-1].image
        out["image_baseline"] = baseline
        out["image_vs_reference"] = {k: image_diff(s[-1].image, base_image) for k, s in samples.items()
                                     if k != baseline}
    out["vs_fp32"] = {k: {"fp32": f, "speedup": ratios(results[f], results[k]),
                          "image": image_diff(samples[k][-1].image, samples[f][-1].image)}
                      for k in results if (f := fp32_label(k)) is not None and f in results}
    if INT8 in results and "onnxruntime" in results:
        out["int8_vs_fp32"] = {"speedup": ratios(results["onnxruntime"], results[INT8]),
                               "image": image_diff(samples[INT8][-1].image, samples["onnxruntime"][-1].image)}
    if compare_to:
        out["vs"] = {base: {k: {"speedup": ratios(results[base], results[k]),
                                "image": image_diff(samples[k][-1].image, samples[base][-1].image)}
                            for k in results if k != base} for base in compare_to if base in results}
    if flops:
        out["flops"] = _flop_rates(flops, results, peak_gflops)
    return out


def _flop_rates(gflop: float, results: Mapping[str, Any], peak_gflops: float | None) -> dict[str, Any]:
    rates = {}
    for label, r in results.items():
        ms = stage_p50(r, "unet", "per_call")
        if ms:
            rates[label] = round(gflop / (ms / 1e3), 2)
    out: dict[str, Any] = {"unet_gflop_per_call": round(gflop, 3), "unet_gflops": rates,
                           "note": "int8 rates count the same (fp32-equivalent) operations"}
    if peak_gflops:
        out["fraction_of_fp32_gemm_peak"] = {k: round(v / peak_gflops, 4) for k, v in rates.items()}
    return out


def unet_gflop(checkpoint: str, family: str | None, case: BenchCase, cfg: bool) -> float:
    """FLOPs of one UNet call at the case's shape (torch.utils.flop_counter on the PyTorch model), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    from latentrt.reference.models import load_checkpoint
    from latentrt.reference.wrappers import wrap
    from latentrt.tensors import dummy_inputs

    loaded = _LOADED.get(checkpoint) or _LOADED.setdefault(checkpoint, load_checkpoint(checkpoint, family))
    io = loaded.ios()["unet"]
    f = loaded.dims.vae_scale_factor
    sizes = {DIM_UNET_BATCH: case.batch * (2 if cfg else 1), DIM_LATENT_HEIGHT: case.height // f,
             DIM_LATENT_WIDTH: case.width // f, DIM_SEQUENCE: loaded.dims.max_tokens}
    feed = [torch.from_numpy(v) for v in dummy_inputs(io, sizes).values()]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        wrap("unet", loaded)(*feed)
    return counter.get_total_flops() / 1e9


_LOADED: dict[str, Any] = {}


# ---------------------------------------------------------------------------- sweeps


def sweep_summary(key: str, cases: Sequence[BenchCase], by_name: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Series per backend along a sweep, with a linear fit (steps: fixed + per-step cost)."""
    first = by_name[cases[0].name]
    f = cases[0].height // first["latent"][0]
    x = {"steps": [c.steps for c in cases], "batch": [c.batch for c in cases],
         "size": [(c.height // f) * (c.width // f) for c in cases]}[key]
    series: dict[str, dict[str, list[float | None]]] = {}
    for label in first["results"]:
        rows = [by_name[c.name]["results"][label] for c in cases]
        series[label] = {"end_to_end_p50_ms": [r["end_to_end_ms"]["p50"] for r in rows],
                         "unet_per_step_p50_ms": [stage_p50(r, "unet", "per_call") for r in rows],
                         "images_per_s": [r["images_per_s"] for r in rows]}
    out: dict[str, Any] = {"x": x, "x_label": {"steps": "steps", "batch": "images per prompt",
                                               "size": "latent pixels (h/8 x w/8)"}[key],
                           "cases": [c.name for c in cases], "series": series}
    if len(set(x)) >= 2:
        y_key = "unet_per_step_p50_ms" if key == "size" else "end_to_end_p50_ms"
        out["fit"] = {label: _linear_fit(x, s[y_key]) for label, s in series.items()}
        out["fit_of"] = y_key
    return out


def _linear_fit(x: Sequence[float], y: Sequence[float | None]) -> dict[str, float] | None:
    """Least-squares y = fixed + slope * x (steps sweep: fixed cost and cost per step)."""
    pts = [(a, b) for a, b in zip(x, y) if b is not None]
    if len({a for a, _ in pts}) < 2:
        return None
    slope, fixed = np.polyfit([a for a, _ in pts], [b for _, b in pts], 1)
    return {"fixed_ms": round(float(fixed), 3), "slope_ms": round(float(slope), 4)}
