"""Step caching (DeepCache, arXiv:2312.00858): speed and image difference of `--step-cache N` vs N = 1.

Runs one LatentRT pipeline (an export made with `latentrt export --step-cache`) at several cache
intervals N, interleaved: round i runs the intervals in an order rotated by i, after `--warmup`
unrecorded rounds, so drift of a shared machine hits every N alike. Records per N: end-to-end and
UNet time (full `unet` + `unet_shallow` stages) p50 over the measured rounds, the speedup vs N = 1,
the count of full and shallow UNet calls, and the final image's max |diff| and PSNR vs N = 1's
(same seed, prompt and sampler). Writes `step-cache.json` and `step-cache.md` into the output folder.

    latentrt export tiny:sd1 -o /tmp/sd1-sc --step-cache
    python benchmarks/step_cache.py /tmp/sd1-sc --size 64x64 --steps 20 -o benchmarks/results/step-cache/tiny-sd1

Run it from outside the repository root (or with the package installed), as the other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from latentrt.runtime.pipeline import GenerationRequest, GenerationResult, load_pipeline
from latentrt.step_cache import SHALLOW

PROMPT = "a photograph of an astronaut riding a horse"
UNET_STAGES = ("unet", SHALLOW)


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (inf when identical)."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def one_run(pipe: Any, interval: int, args: argparse.Namespace) -> GenerationResult:
    height, width = args.size
    request = GenerationRequest(prompt=PROMPT, steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                                width=width, height=height, seed=args.seed, step_cache=interval)
    return pipe.generate(request)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved rounds over the intervals; per interval the timing samples, call counts and first image."""
    pipe = load_pipeline(args.folder, backend=args.backend)
    samples: dict[int, dict[str, list[float]]] = {n: {"total_ms": [], "unet_ms": []} for n in args.intervals}
    images: dict[int, np.ndarray] = {}
    counts: dict[int, dict[str, int]] = {}
    try:
        for i in range(args.warmup + args.runs):
            order = args.intervals[i % len(args.intervals):] + args.intervals[:i % len(args.intervals)]
            for n in order:
                result = one_run(pipe, n, args)
                summary = result.timing.summary()
                if n not in images:
                    assert result.array is not None
                    images[n] = result.array
                    counts[n] = {s: summary[s].count if s in summary else 0 for s in UNET_STAGES}
                if i >= args.warmup:
                    samples[n]["total_ms"].append(summary["total"].total_ms)
                    samples[n]["unet_ms"].append(sum(summary[s].total_ms for s in UNET_STAGES if s in summary))
    finally:
        pipe.close()
    return {"samples": samples, "images": images, "counts": counts}


def report(args: argparse.Namespace, got: dict[str, Any]) -> dict[str, Any]:
    base = got["images"][1]
    base_total = statistics.median(got["samples"][1]["total_ms"])
    base_unet = statistics.median(got["samples"][1]["unet_ms"])
    rows = []
    for n in args.intervals:
        s = got["samples"][n]
        total, unet = statistics.median(s["total_ms"]), statistics.median(s["unet_ms"])
        rows.append({"interval": n, "full_calls": got["counts"][n]["unet"], "shallow_calls": got["counts"][n][SHALLOW],
                     "total_ms_p50": round(total, 2), "unet_ms_p50": round(unet, 2),
                     "total_ms": [round(x, 2) for x in s["total_ms"]], "unet_ms": [round(x, 2) for x in s["unet_ms"]],
                     "speedup_total": round(base_total / total, 3), "speedup_unet": round(base_unet / unet, 3),
                     "max_abs_diff": float(np.abs(got["images"][n] - base).max()),
                     "psnr_db": round(psnr(got["images"][n], base), 2)})
    return {"folder": str(args.folder), "backend": args.backend, "size": list(args.size), "steps": args.steps,
            "guidance": args.guidance, "sampler": args.sampler, "seed": args.seed, "runs": args.runs,
            "warmup": args.warmup, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                               "loadavg_after": list(os.getloadavg())},
            "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "rows": rows}


def markdown(record: dict[str, Any], note: str) -> str:
    h, w = record["size"]
    lines = [f"# Step caching (DeepCache uniform schedule), {record['backend']}, {h}x{w}, {record['steps']} "
             f"{record['sampler']} steps, guidance {record['guidance']}",
             "", f"{record['folder']}; {record['runs']} measured rounds after {record['warmup']} warm-up, interleaved; "
             f"p50 over rounds; PSNR / max |diff| of the final image vs N = 1 (same seed). {record['when']}, "
             f"load average after {record['machine']['loadavg_after'][0]:.2f} on {record['machine']['cpus']} CPUs.",
             *(["", note] if note else []), "",
             "| N | full / shallow UNet calls | end to end ms | speedup | UNet ms | UNet speedup | PSNR dB | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        lines.append(f"| {r['interval']} | {r['full_calls']} / {r['shallow_calls']} | {r['total_ms_p50']:.1f} | "
                     f"{r['speedup_total']:.2f}x | {r['unet_ms_p50']:.1f} | {r['speedup_unet']:.2f}x | "
                     f"{r['psnr_db']:.2f} | {r['max_abs_diff']:.4f} |")
    return "\n".join(lines) + "\n"


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("folder", help="export (or engine folder) made with `latentrt export --step-cache`")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for step-cache.json / .md")
    parser.add_argument("--size", type=parse_size, default=(64, 64), help="HxW pixels (default 64x64)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--intervals", default="1,2,3,5", help="comma-separated N (1 is always included)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--note", default="", help="a line recorded in the Markdown (e.g. machine state)")
    args = parser.parse_args()
    args.intervals = sorted({1, *(int(x) for x in args.intervals.split(",") if x.strip())})
    record = report(args, measure(args))
    record["note"] = args.note
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "step-cache.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.output / "step-cache.md").write_text(markdown(record, args.note))
    print(markdown(record, args.note))


if __name__ == "__main__":
    main()
