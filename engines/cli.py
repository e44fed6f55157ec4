"""`latentrt build ONNX_DIR -o ENGINE_DIR --backend tensorrt|onnxruntime`: ONNX export -> engines."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

BACKENDS = ("tensorrt", "onnxruntime")
STRATEGIES = ("dynamic", "per-bucket", "grouped")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("onnx_dir", metavar="ONNX_DIR", help="folder written by `latentrt export`")
    parser.add_argument("-o", "--output", metavar="ENGINE_DIR", help="engine folder to write (not needed with --plan)")
    parser.add_argument("--backend", choices=BACKENDS, default="tensorrt",
                        help="tensorrt (NVIDIA GPU, fp16 plans) or onnxruntime (CPU, or CUDA EP with --device cuda)")
    parser.add_argument("--sizes", metavar="HxW,...", help="pixel sizes the TensorRT profiles cover, e.g. "
                        "512x512,768x1344 (default: the family's aspect-ratio buckets)")
    parser.add_argument("--batch", metavar="MIN:MAX", default="1:4", help="images per prompt (default 1:4)")
    parser.add_argument("--opt-batch", type=int, metavar="N", help="batch the kernels are tuned for (default: MIN)")
    parser.add_argument("--profiles", choices=STRATEGIES, default="grouped",
                        help="one dynamic profile, one per size, or aspect-ratio groups (default)")
    parser.add_argument("--groups", type=int, default=3, metavar="K", help="number of groups for --profiles grouped")
    cfg = parser.add_mutually_exclusive_group()
    cfg.add_argument("--cfg", dest="cfg", action="store_true", default=None,
                     help="plan the UNet batch for classifier-free guidance (default: the family's default)")
    cfg.add_argument("--no-cfg", dest="cfg", action="store_false", help="plan the UNet batch without guidance")
    parser.add_argument("--plan", action="store_true", help="print the optimization-profile plan and exit")
    parser.add_argument("--precision", choices=("fp16", "fp32"),
                        help="default: fp16 for TensorRT and the CUDA EP, fp32 on the CPU")
    parser.add_argument("--components", metavar="NAME,...", help="build only these components, e.g. unet,vae_decoder")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild even unchanged engines, and replace an output folder that holds something else")
    trt = parser.add_argument_group("TensorRT")
    trt.add_argument("--opt-level", type=int, default=3, metavar="N", help="builder optimization level 0-5 (3)")
    trt.add_argument("--refittable", action="store_true", help="build refittable engines")
    trt.add_argument("--timing-cache", metavar="PATH", help="timing cache file to reuse and update")
    trt.add_argument("--workspace-mb", type=int, metavar="MB", help="builder workspace limit")
    trt.add_argument("--strongly-typed", action="store_true", help="take tensor types from the ONNX graph")
    trt.add_argument("--fp16-fixed-vae", action="store_true",
                     help="the SDXL VAE is an fp16-fixed one: build it in fp16 (default: fp32)")
    ort = parser.add_argument_group("ONNX Runtime")
    ort.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="execution provider to prepare for")
    ort.add_argument("--threads", type=int, metavar="N", help="intra-op threads recorded for sessions")
    ort.add_argument("--graph-opt", choices=("disable", "basic", "extended", "all"), default="extended",
                     help="offline graph optimization level for the CPU (default extended; 'all' ties the file "
                          "to this CPU type)")


def parse_batch(text: str) -> tuple[int, int]:
    """'1:4' -> (1, 4); '2' -> (2, 2)."""
    from latentrt.errors import UnsupportedShape

    lo, _, hi = text.partition(":")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise UnsupportedShape(f"cannot read --batch {text!r}: expected MIN:MAX, e.g. 1:4") from None
    return a, b


def run(args: argparse.Namespace) -> int:
    from latentrt.buckets import parse_sizes
    from latentrt.errors import InvalidRequest

    from .build import build_engines, plan_for_export, read_onnx_export
    from .profiles import format_plan

    sizes = parse_sizes(args.sizes) if args.sizes else None
    batch = parse_batch(args.batch)
    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    if args.plan:
        plan = plan_for_export(read_onnx_export(args.onnx_dir), sizes=sizes, batch=batch, strategy=args.profiles,
                               groups=args.groups, cfg=args.cfg, opt_batch=args.opt_batch, components=components)
        print(format_plan(plan))
        if args.backend == "onnxruntime":
            print("(ONNX Runtime engines are fully dynamic: the plan applies to --backend tensorrt)")
        return 0
    if not args.output:
        raise InvalidRequest("-o ENGINE_DIR is required (or pass --plan to only print the profile plan)")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    out = build_engines(args.onnx_dir, args.output, backend=args.backend, sizes=sizes, batch=batch,
                        strategy=args.profiles, groups=args.groups, cfg=args.cfg, opt_batch=args.opt_batch,
                        precision=args.precision, components=components, progress=_printer(rows),
                        overwrite=args.overwrite, device=args.device, threads=args.threads,
                        graph_optimization_level=args.graph_opt, fp16_fixed_vae=args.fp16_fixed_vae,
                        optimization_level=args.opt_level, refittable=args.refittable,
                        strongly_typed=args.strongly_typed, workspace_mb=args.workspace_mb,
                        timing_cache=args.timing_cache)
    print(_summary(rows, out, args.backend, time.perf_counter() - start))
    return 0


def _printer(rows: list[dict[str, Any]]) -> Any:
    def show(event: Any) -> None:
        head = f"[{event.index + 1}/{event.total}] {event.component}"
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
