"""`latentrt build ONNX_DIR -o ENGINE_DIR --backend tensorrt|onnxruntime|openvino`: ONNX export -> engines.

`--backend onnxruntime --precision int8 [--int8-recipe NAME]` builds fp32 CPU engines with an int8 UNet.
A static int8 recipe calibrates on recorded UNet inputs: `--calibration-feeds FILE.npz`, or recorded by
fp32 sampling runs in `latentrt.workflows.build` (the `latentrt build` verb), which runs this parser and
`run` with its recording `build_engines`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from latentrt.choices import BuildBackend, Device, Precision, values
from latentrt.manifest_checks import ORT_LEVELS as LEVELS

from .profiles import STRATEGIES
from .recipes import DEFAULT_RECIPE, RECIPES

INT8_RECIPES = tuple(RECIPES)
BuildFunction = Callable[..., Path]  # `engines.build.build_engines` or a workflow wrapping it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("onnx_dir", metavar="ONNX_DIR", help="folder written by `latentrt export`")
    parser.add_argument("-o", "--output", metavar="ENGINE_DIR", help="engine folder to write (not needed with --plan)")
    parser.add_argument("--backend", choices=values(BuildBackend), default=BuildBackend.TENSORRT.value,
                        help="tensorrt (NVIDIA GPU, fp16 plans), onnxruntime (CPU, or CUDA EP with --device cuda) or "
                             "openvino (CPU, OpenVINO IR; pip install 'latentrt[openvino]')")
    parser.add_argument("--sizes", metavar="HxW,...", help="pixel sizes the TensorRT profiles cover, e.g. "
                        "512x512,768x1344 (default: the family's aspect-ratio buckets)")
    parser.add_argument("--batch", metavar="MIN:MAX", default="1:4", help="images per prompt (default 1:4)")
    parser.add_argument("--opt-batch", type=int, metavar="N", help="batch the kernels are tuned for (default: MIN)")
    parser.add_argument("--profiles", choices=STRATEGIES, default="grouped",
                        help="one dynamic profile, one per size, or aspect-ratio groups (default)")
    parser.add_argument("--groups", type=int, default=3, metavar="K", help="number of groups for --profiles grouped")
    parser.add_argument("--prompt-windows", type=int, default=3, metavar="N",
                        help="longest prompt the TensorRT profiles cover, in 75-token windows (default 3: 225 "
                             "tokens; ONNX Runtime engines take any length)")
    cfg = parser.add_mutually_exclusive_group()
    cfg.add_argument("--cfg", dest="cfg", action="store_true", default=None,
                     help="plan the UNet batch for classifier-free guidance (default: the family's default)")
    cfg.add_argument("--no-cfg", dest="cfg", action="store_false", help="plan the UNet batch without guidance")
    parser.add_argument("--plan", action="store_true", help="print the optimization-profile plan and exit")
    parser.add_argument("--precision", choices=values(Precision),
                        help="default: fp16 for TensorRT and the CUDA EP, fp32 on the CPU; int8 (--backend "
                             "onnxruntime or openvino, CPU only): fp32 engines with an int8 UNet, see --int8-recipe; "
                             "bf16 (--backend openvino): the CPU's bf16 inference precision")
    parser.add_argument("--components", metavar="NAME,...", help="build only these components, e.g. unet,vae_decoder")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild even unchanged engines, and replace another model's engines (or another "
                             "LatentRT artifact) in ENGINE_DIR. A folder holding anything LatentRT did not write is "
                             "never replaced, with or without --overwrite")
    trt = parser.add_argument_group("TensorRT")
    trt.add_argument("--opt-level", type=int, default=3, metavar="N", help="builder optimization level 0-5 (3)")
    trt.add_argument("--refittable", action="store_true", help="build refittable engines")
    trt.add_argument("--timing-cache", metavar="PATH", help="timing cache file to reuse and update")
    trt.add_argument("--workspace-mb", type=int, metavar="MB", help="builder workspace limit")
    trt.add_argument("--strongly-typed", action="store_true", help="take tensor types from the ONNX graph")
    trt.add_argument("--fp16-fixed-vae", action="store_true",
                     help="the SDXL VAE is an fp16-fixed one: build it in fp16 (default: fp32)")
    int8 = parser.add_argument_group("int8 UNet (--backend onnxruntime --precision int8)")
    int8.add_argument("--int8-recipe", choices=INT8_RECIPES, metavar="NAME",
                      help="quantization recipe: " + ", ".join(INT8_RECIPES) + f" (default {DEFAULT_RECIPE}: static "
                           "QDQ calibrated by fp32 sampling runs; dynamic-* need no calibration)")
    int8.add_argument("--calibration-size", metavar="HxW",
                      help="pixel size of the fp32 calibration runs (default: the family's native size capped to "
                           "256 px)")
    int8.add_argument("--calibration-steps", type=int, default=4, metavar="N",
                      help="sampling steps of each calibration run (default 4)")
    int8.add_argument("--calibration-guidance", type=float, metavar="G",
                      help="guidance scale of the calibration runs (default: the family's; 1 = no guidance, as "
                           "1-step Turbo sampling runs: calibrate an int8 VAE decoder on the latents it will see)")
    int8.add_argument("--calibration-feeds", metavar="FILE.npz",
                      help="UNet inputs already recorded by fp32 sampling runs (`latentrt.engines.calibration."
                           "Calibration.save`): used instead of new calibration runs")
    ort = parser.add_argument_group("ONNX Runtime")
    ort.add_argument("--device", choices=values(Device), default=Device.CPU.value,
                     help="execution provider to prepare for")
    ort.add_argument("--threads", type=int, metavar="N", help="intra-op threads recorded for sessions")
    ort.add_argument("--graph-opt", choices=LEVELS, default="extended",
                     help="offline graph optimization level for the CPU (default extended; 'all' ties the file "
                          "to this CPU type)")


    ov = parser.add_argument_group("OpenVINO (--backend openvino)")
    ov.add_argument("--static", action="store_true",
                    help="compile static-shape engines at run time for the planned sizes (--sizes), dynamic ones for "
                         "any other size")
    ov.add_argument("--component-precision", metavar="NAME=PREC,...",
                    help="per-component precision, e.g. text_encoder=fp32,vae_decoder=int8 (int8: the UNet and, with "
                         "--precision int8, the VAE decoder; an int8 build runs the rest in bf16 where the CPU has it)")


def parse_batch(text: str) -> tuple[int, int]:
    """'1:4' -> (1, 4); '2' -> (2, 2)."""
    from latentrt.errors import UnsupportedShape

    lo, _, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise UnsupportedShape(f"cannot read --batch {text!r}: expected MIN:MAX, e.g. 1:4") from None
    return a, b


def _one_size(text: str) -> tuple[int, int]:
    """'256x256' -> (256, 256)."""
    from latentrt.buckets import parse_sizes
    from latentrt.errors import UnsupportedShape

    sizes = parse_sizes(text)
    if len(sizes) != 1:
        raise UnsupportedShape(f"--calibration-size takes one HxW size, e.g. 256x256 (got {text!r})")
    return sizes[0]


def run(args: argparse.Namespace, build: BuildFunction | None = None) -> int:
    """Plan or build; `build` is the function called with `build_engines`' arguments (default: the stage's own)."""
    from latentrt.buckets import parse_sizes
    from latentrt.errors import InvalidRequest

    from .build import build_engines, plan_for_export, read_onnx_export
    from .build_openvino import parse_component_precisions
    from .profiles import format_plan

    sizes = parse_sizes(args.sizes) if args.sizes else None
    calibration_size = _one_size(args.calibration_size) if args.calibration_size else None
    batch = parse_batch(args.batch)
    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    if args.plan:
        plan = plan_for_export(read_onnx_export(args.onnx_dir), sizes=sizes, batch=batch, strategy=args.profiles,
                               groups=args.groups, cfg=args.cfg, opt_batch=args.opt_batch, components=components,
                               prompt_windows=args.prompt_windows)
        print(format_plan(plan))
        if args.backend in (BuildBackend.ONNXRUNTIME, BuildBackend.OPENVINO):
            print(f"({args.backend} engines are fully dynamic: the plan applies to --backend tensorrt"
                  f"{' and to --static' if args.backend == BuildBackend.OPENVINO else ''})")
        return 0
    if not args.output:
        raise InvalidRequest("-o ENGINE_DIR is required (or pass --plan to only print the profile plan)")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    out = (build or build_engines)(
        args.onnx_dir, args.output, backend=args.backend, sizes=sizes, batch=batch, strategy=args.profiles,
        groups=args.groups, cfg=args.cfg, opt_batch=args.opt_batch, precision=args.precision, components=components,
        progress=_printer(rows), overwrite=args.overwrite, device=args.device, threads=args.threads,
        graph_optimization_level=args.graph_opt, fp16_fixed_vae=args.fp16_fixed_vae,
        optimization_level=args.opt_level, refittable=args.refittable, strongly_typed=args.strongly_typed,
        workspace_mb=args.workspace_mb, timing_cache=args.timing_cache, int8_recipe=args.int8_recipe,
        prompt_windows=args.prompt_windows, calibration_size=calibration_size,
        calibration_steps=args.calibration_steps, calibration_guidance=args.calibration_guidance,
        calibration=args.calibration_feeds, static_shapes=args.static,
        component_precisions=parse_component_precisions(args.component_precision))
    print(_summary(rows, out, args.backend, time.perf_counter() - start))
    return 0


def _guidance(detail: dict[str, Any]) -> str:
    g = detail.get("calibration_guidance")
    return "" if g is None else f", guidance {g:g}"


def _printer(rows: list[dict[str, Any]]) -> Any:
    def show(event: Any) -> None:
        head = f"[{event.index + 1}/{event.total}] {event.component}"
        if event.stage == "calibrate":
            d = event.detail
            print(f"{event.component}: recording int8 calibration inputs (fp32 sampling at {d['calibration_size']}, "
                  f"{d['calibration_steps']} step(s){_guidance(d)}, {d['runs']} run(s)) ...", file=sys.stderr,
                  flush=True)
            return
        if event.stage == "start" and event.precision == Precision.INT8 and "calibration" in event.detail:
            cal = event.detail["calibration"]
            how = (f"calibrating with fp32 sampling at {cal['calibration_size']}, {cal['calibration_steps']} step(s)"
                   f"{_guidance(cal)}"
                   if cal["calibration_size"] else "no calibration")
            print(f"[{event.index + 1}/{event.total}] unet: quantizing to int8 ({event.detail['recipe']}, {how}) ...",
                  file=sys.stderr, flush=True)
            return
        if event.stage == "start":
            note = f" ({event.detail['note']})" if event.detail.get("note") else ""
            print(f"{head}: building {event.backend} {event.precision}, {event.detail['profiles']} profile(s)"
                  f"{note} ...", file=sys.stderr, flush=True)
            return
        d = event.detail
        rows.append({"component": event.component, "stage": event.stage, "precision": d.get("precision", ""),
                     "profiles": len(d.get("profiles", [])), "size_mb": d.get("size_mb", 0.0),
                     "build_s": d.get("build_s", 0.0), "device_memory_mb": d.get("device_memory_mb")})
        what = "unchanged, reused" if event.stage == "reused" else f"done in {d.get('build_s', 0.0):.1f} s"
        print(f"{head}: {what} ({d.get('size_mb', 0.0):.1f} MB)", file=sys.stderr, flush=True)

    return show


def _summary(rows: list[dict[str, Any]], out: Any, backend: str, seconds: float) -> str:
    lines = [f"{backend} engines in {out} ({seconds:.1f} s)",
             f"  {'component':<15} {'precision':<9} {'profiles':>8} {'size MB':>9} {'build s':>8} {'device MB':>9}"]
    for r in rows:
        mem = f"{r['device_memory_mb']:.0f}" if r["device_memory_mb"] is not None else "-"
        build = "reused" if r["stage"] == "reused" else f"{r['build_s']:.1f}"
        lines.append(f"  {r['component']:<15} {r['precision']:<9} {r['profiles']:>8} {r['size_mb']:>9.1f} "
                     f"{build:>8} {mem:>9}")
    return "\n".join(lines)
