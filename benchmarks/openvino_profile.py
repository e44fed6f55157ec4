"""Where does an OpenVINO engine spend its time? Per-op profile of one component, by op type and kernel precision.

Compiles a component of one or more OpenVINO engine folders exactly as the runtime does (the manifest's inference
precision, thread count and the LATENCY hint) plus `PERF_COUNT`, runs it on the same random inputs, and sums
OpenVINO's own per-node timings over the measured calls. The kernel name OpenVINO reports (`exec_type`, e.g.
`brgconv_avx512_I8`, `brgemm_avx512_BF16`) ends in the precision the node actually ran in, which shows what
int8 quantization reached and what it left in bf16 / fp32:

    python benchmarks/openvino_profile.py ENGINES_BF16 ENGINES_INT8 --component unet --size 256x256 \
        --unet-batch 2 --runs 5 -o out.json        # also writes out.md
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from latentrt.manifest import read_manifest
from latentrt.names import DIM_LATENT_HEIGHT, DIM_LATENT_WIDTH, DIM_UNET_BATCH
from latentrt.paths import inside
from latentrt.runtime.backends.openvino import OpenVinoEngine
from latentrt.tensors import dummy_inputs, io_from_json, opt_sizes

PRECISION = re.compile(r"_(I8|U8|BF16|FP16|FP32|F32|I32|I64)$", re.IGNORECASE)


def kernel_precision(exec_type: str) -> str:
    """'brgconv_avx512_I8' -> 'int8'; 'jit_avx512_BF16' -> 'bf16'; anything else -> its suffix or 'other'."""
    m = PRECISION.search(exec_type)
    if not m:
        return "other"
    tag = m.group(1).upper()
    return {"I8": "int8", "U8": "int8", "BF16": "bf16", "FP16": "fp16", "FP32": "fp32", "F32": "fp32", "I32": "int32", "I64": "int64"}.get(tag, tag)


def profile(folder: Path, component: str, sizes: dict[str, int], runs: int) -> dict[str, Any]:
    """Per-node OpenVINO timings of one component, summed over `runs` calls after one warm-up call."""
    import openvino as ov

    entry = read_manifest(folder)["components"][component]
    io = io_from_json(entry["io"])
    info = entry["openvino"]
    engine = OpenVinoEngine(inside(folder, entry["path"], f"{folder} {component} path"), io,
                            inference_precision=info["inference_precision"], threads=info.get("threads") or None)
    config = {**engine.config(), "PERF_COUNT": True}
    engine.close()
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(inside(folder, entry["path"], "path"))), "CPU", config)
    request = compiled.create_infer_request()
    full = dict(opt_sizes(io), **{k: v for k, v in sizes.items() if k in io.dims})
    feed = dummy_inputs(io, full, seed=0)
    request.infer(feed)  # warm-up (first-call allocations), not counted
    by_kind: dict[tuple[str, str], float] = defaultdict(float)
    by_node: dict[str, list[Any]] = {}
    walls = []
    for _ in range(runs):
        start = time.perf_counter()
        request.infer(feed)
        walls.append(1000 * (time.perf_counter() - start))
        for p in request.get_profiling_info():
            ms = p.real_time.total_seconds() * 1000
            if p.status != p.Status.EXECUTED or ms <= 0:
                continue
            by_kind[(p.node_type, kernel_precision(p.exec_type))] += ms / runs
            node = by_node.setdefault(p.node_name, [p.node_type, p.exec_type, 0.0])
            node[2] += ms / runs
    total = sum(by_kind.values())
    per_precision: dict[str, float] = defaultdict(float)
    for (_, prec), ms in by_kind.items():
        per_precision[prec] += ms
    kinds = sorted(by_kind.items(), key=lambda kv: -kv[1])
    nodes = sorted(by_node.items(), key=lambda kv: -kv[1][2])
    return {
        "folder": str(folder), "component": component, "sizes": full, "runs": runs,
        "inference_precision": info["inference_precision"], "int8": "int8" in entry,
        "wall_ms_per_call": round(sorted(walls)[len(walls) // 2], 1), "profiled_ms_per_call": round(total, 1),
        "by_precision": {k: {"ms": round(v, 1), "share": round(v / total, 4)} for k, v in
                         sorted(per_precision.items(), key=lambda kv: -kv[1])},
        "by_op": [{"op": op, "precision": prec, "ms": round(ms, 2), "share": round(ms / total, 4)}
                  for (op, prec), ms in kinds],
        "top_nodes": [{"node": name, "op": op, "kernel": kernel, "ms": round(ms, 2)}
                      for name, (op, kernel, ms) in nodes[:25]],
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        lines += [f"## {r['folder']} / {r['component']} ({'int8' if r['int8'] else r['inference_precision']})", "",
                  f"wall p50 {r['wall_ms_per_call']} ms per call, OpenVINO-profiled {r['profiled_ms_per_call']} ms; "
                  f"sizes {r['sizes']}", "",
                  "| kernel precision | ms per call | share |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['ms']:,.1f} | {100 * v['share']:.1f}% |" for k, v in r["by_precision"].items()]
        lines += ["", "| op | kernel precision | ms per call | share |", "|---|---|---:|---:|"]
        lines += [f"| {o['op']} | {o['precision']} | {o['ms']:,.1f} | {100 * o['share']:.1f}% |"
                  for o in r["by_op"][:20]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("engines", type=Path, nargs="+", help="OpenVINO engine folders (latentrt build output)")
    parser.add_argument("--component", default="unet")
    parser.add_argument("--size", default="256x256", help="HxW pixels")
    parser.add_argument("--unet-batch", type=int, default=2, help="UNet rows (2: one image with CFG)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("-o", "--output", type=Path, required=True, help="JSON file (a .md table is written next to it)")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    sizes = {DIM_LATENT_HEIGHT: h // 8, DIM_LATENT_WIDTH: w // 8}
    if args.component == "unet":
        sizes[DIM_UNET_BATCH] = args.unet_batch
    results = [profile(folder, args.component, sizes, args.runs) for folder in args.engines]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"size": args.size, "results": results}, indent=1) + "\n")
    args.output.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
