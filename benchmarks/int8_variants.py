"""Compare int8 UNet recipes (and fp32 ONNX Runtime session settings) on one model: speed and image cost.

For each recipe in `latentrt.engines.quantize.RECIPES` the UNet of fp32 ONNX Runtime engines is
quantized (static recipes calibrated on UNet inputs recorded while the fp32 pipeline samples four
calibration prompts), then measured against fp32 on:

- UNet latency per call (one CFG step), interleaved with the fp32 UNet, same feed;
- UNet output error on held-out feeds (a prompt and seed not used for calibration);
- final image: max |diff| and PSNR vs the fp32 engines at the same seed (held-out prompt).

It also times the fp32 UNet under ONNX Runtime session settings (optimization level, threads,
spinning) to show what the "free" knobs give. Usage (from the repository root):

    python -m benchmarks.int8_variants MODEL_OR_ENGINES -o benchmarks/results/int8-midsize --size 256x256 --steps 10
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentrt.engines.quantize import (
    RECIPES,
    compare_outputs,
    fuse_attention,
    quantize_engine_dir,
    source_unet,
)
from latentrt.manifest import atomic_write_bytes, atomic_write_json, read_manifest
from latentrt.runtime.bench import (
    CALIBRATION_PROMPTS,
    BenchCase,
    PipelineRunner,
    collect_unet_feeds,
    image_diff,
    parse_size,
    percentile_stats,
    rotated,
)
from latentrt.runtime.bench.stats import machine_info
from latentrt.workflows.bench import prepare_targets

log = logging.getLogger(__name__)

HELD_OUT_PROMPT = "a red fox sitting in fresh snow, morning light"
HELD_OUT_SEED = 1234


def ort_session(path: Path, *, level: str = "all", threads: int | None = None, spinning: bool = True) -> Any:
    """A CPU InferenceSession with the given optimization level / intra-op threads / spinning."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    if threads:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_sessions(sessions: Mapping[str, Any], feed: Mapping[str, np.ndarray], runs: int,
                  tick: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """One warm-up call each, then `runs` interleaved rounds; per-call statistics in ms."""
    labels = list(sessions)
    for label in labels:
        sessions[label].run(None, dict(feed))
    times: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(runs):
        for label in rotated(labels, i):
            start = time.perf_counter()
            sessions[label].run(None, dict(feed))
            times[label].append((time.perf_counter() - start) * 1e3)
            tick()
    return {label: percentile_stats(v) for label, v in times.items()}


def final_image(runner: PipelineRunner, case: BenchCase, guidance: float) -> np.ndarray:
    return runner.generate(case, HELD_OUT_SEED, HELD_OUT_PROMPT, guidance).image


def run(model: str, out: Path, case: BenchCase, guidance: float, runs: int, recipes: Sequence[str]) -> dict[str, Any]:
    """Quantize with each recipe, measure, and return the record (also written to `out`)."""
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    t = prepare_targets(model, ["onnxruntime"], out, device, lambda m: log.info("%s", m))
    fp32 = PipelineRunner("onnxruntime", t.folders["onnxruntime"], "onnxruntime", device)
    feeds = collect_unet_feeds(fp32, case, guidance, CALIBRATION_PROMPTS)
    held_out = _held_out_feeds(fp32, case, guidance)
    reference_image = final_image(fp32, case, guidance)
    engines = Path(t.folders["onnxruntime"])
    fp32_unet = engines / read_manifest(engines)["components"]["unet"]["path"]
    export_unet = source_unet(engines, read_manifest(engines))
    record: dict[str, Any] = {"machine": machine_info(device), "model": model, "case": case.__dict__,
                              "guidance": guidance, "calibration_feeds": len(feeds), "held_out_feeds": len(held_out),
                              "recipes": {}}
    sessions = {"fp32": ort_session(fp32_unet)}
    for name in recipes:
        log.info("recipe %s", name)
        dest = out / f"engines-int8-{name}"
        quantize_engine_dir(engines, dest, recipe=name, calibration_feeds=feeds)
        unet = dest / "unet" / "model.onnx"
        int8 = PipelineRunner(name, dest, "onnxruntime", device)
        image = final_image(int8, case, guidance)
        int8.close()
        sessions[name] = ort_session(unet)
        record["recipes"][name] = {
            "recipe": RECIPES[name].__dict__,
            "quantize": read_manifest(dest)["components"]["unet"]["int8"],
            "unet_output_vs_fp32": compare_outputs(fp32_unet, unet, held_out),
            "image_vs_fp32": image_diff(image, reference_image),
        }
    fp32.close()
    record["unet_latency_ms"] = time_sessions(sessions, held_out[len(held_out) // 2], runs)
    fp32_session = sessions["fp32"]
    sessions.clear()  # free the int8 sessions before loading seven fp32 ones
    base = record["unet_latency_ms"]["fp32"]["p50"]
    for name in recipes:
        record["recipes"][name]["unet_speedup"] = round(base / record["unet_latency_ms"][name]["p50"], 3)
    fused = out / "fp32-fused-attention.onnx"
    record["fp32_fused_attention"] = fuse_attention(export_unet, fused)
    record["fp32_session_settings_ms"] = time_sessions(
        {"engine graph, ENABLE_ALL, default threads": fp32_session,
         "export + fused attention (MultiHeadAttention), ENABLE_ALL": ort_session(fused),
         "raw export, ENABLE_ALL": ort_session(export_unet),
         "raw export, ENABLE_EXTENDED": ort_session(export_unet, level="extended"),
         "raw export, ENABLE_BASIC": ort_session(export_unet, level="basic"),
         "engine graph, 1 thread": ort_session(fp32_unet, threads=1),
         "engine graph, no spinning": ort_session(fp32_unet, spinning=False)},
        held_out[len(held_out) // 2], runs)
    atomic_write_json(out / "int8-variants.json", record)
    atomic_write_bytes(out / "int8-variants.md", format_markdown(record).encode())
    return record


def _held_out_feeds(runner: PipelineRunner, case: BenchCase, guidance: float) -> list[dict[str, np.ndarray]]:
    """UNet inputs of one sampling run on a prompt and seed outside the calibration set."""
    feeds: list[dict[str, np.ndarray]] = []
    unet = runner.pipe.engines.engines["unet"]
    unet.record = lambda feed: feeds.append({k: v.float().cpu().numpy().copy() for k, v in feed.items()})  # type: ignore[attr-defined]
    try:
        runner.generate(case, HELD_OUT_SEED, HELD_OUT_PROMPT, guidance)
    finally:
        unet.record = None  # type: ignore[attr-defined]
    return feeds


def format_markdown(record: Mapping[str, Any]) -> str:
    c = record["case"]
    lat = record["unet_latency_ms"]
    lines = [f"# int8 UNet recipes: {record['model']}", "",
             f"Case {c['height']}x{c['width']}, {c['steps']} steps, guidance {record['guidance']}; "
             f"{record['calibration_feeds']} calibration feeds (4 prompts), held-out prompt/seed for every error figure. "
             f"Machine: {record['machine']['cpu']} ({record['machine']['cores']} cores), load average "
             f"{record['machine'].get('loadavg_start')}.", "",
             "| recipe | method | ops | per-channel | fp32 edges | fp32 skip convs | fused attention | UNet p50 ms | "
             "UNet speedup | UNet rel. L2 err | UNet max err / max | image PSNR vs fp32 | image max diff | size MB |",
             "|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| fp32 | – | – | – | – | – | – | {lat['fp32']['p50']:.1f} | 1.00 | 0 | 0 | ∞ | 0 | – |"]
    for name, r in record["recipes"].items():
        rc = r["recipe"]
        lines.append(f"| {name} | {rc['method']} | {'+'.join(rc['op_types'])} | {rc['per_channel']} | {rc['fp32_edges']} | "
                     f"{rc['fp32_skip_convs']} | {rc['fuse_attention']} | {lat[name]['p50']:.1f} | {r['unet_speedup']:.2f} | "
                     f"{r['unet_output_vs_fp32']['rel_l2_mean']:.4f} | {r['unet_output_vs_fp32']['relative']:.4f} | "
                     f"{r['image_vs_fp32']['psnr_db']:.1f} dB | {r['image_vs_fp32']['max_abs_diff']:.3f} | "
                     f"{r['quantize']['size_mb']['int8']:.0f} |")
    lines += ["", "fp32 UNet under ONNX Runtime session settings (p50 ms per call):", ""]
    lines += [f"- {k}: {v['p50']:.1f}" for k, v in record["fp32_session_settings_ms"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("model", help="checkpoint, ONNX export or fp32 ONNX Runtime engine folder")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    h, w = parse_size(args.size)
    record = run(args.model, args.output, BenchCase(h, w, 1, args.steps), args.guidance, args.runs,
                 [r for r in args.recipes.split(",") if r])
    print(format_markdown(record))
    print(json.dumps(record["unet_latency_ms"], indent=1))


if __name__ == "__main__":
    main()
