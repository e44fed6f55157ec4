"""`latentrt bench MODEL|DIR -o OUT`: per-stage latency of backends side by side, with a tqdm progress bar."""

from __future__ import annotations

import argparse
import sys
from typing import Any

BACKENDS = ("reference", "torch", "onnxruntime", "onnxruntime-int8", "tensorrt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL|DIR",
                        help="checkpoint (diffusers folder, tiny:<family>) exported and built here, an ONNX export, "
                             "or an engine folder")
    parser.add_argument("-o", "--output", required=True, help="folder for bench.json, bench.md, plots and built engines")
    parser.add_argument("--build-dir", help="where the ONNX export and built engines go (default: the -o folder)")
    parser.add_argument("--backends", default="reference,onnxruntime",
                        help=f"comma-separated, among {', '.join(BACKENDS)} (reference = the diffusers pipeline)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the family's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the family's; <= 1: no CFG batch)")
    parser.add_argument("--size", action="append", metavar="HxW",
                        help="image size, e.g. 512x512 (repeat for a size sweep; default: the family's)")
    parser.add_argument("--batch", type=int, default=1, help="images per prompt")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded warm-up rounds per case")
    parser.add_argument("--runs", type=int, default=5, help="measured rounds per case (interleaved across backends)")
    parser.add_argument("--sweep", action="append", metavar="KEY=V1,V2",
                        help="steps=1,2,4 | size=256x256,512x512 | batch=1,2 (repeatable)")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                        help="int8: also measure ONNX Runtime engines with an int8 UNet (onnxruntime-int8)")
    parser.add_argument("--int8-recipe", help="quantization recipe (see latentrt.engines.quantize.RECIPES)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--seed", type=int, default=0, help="seed every run repeats")
    parser.add_argument("--prompt", help="prompt every run repeats")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip the UNet FLOP count")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def parse_sweeps(items: list[str] | None) -> dict[str, list[str]]:
    """['steps=1,2,4', 'size=256x256,512x512'] -> {'steps': ['1', '2', '4'], 'size': [...]}."""
    from latentrt.errors import InvalidRequest

    out: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise InvalidRequest(f"cannot read --sweep {item!r}; write KEY=V1,V2 (steps=1,2,4)")
        out[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return out


class Bar:
    """tqdm over generations; phase messages are written above the bar."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, event: Any) -> None:
        if not self.enabled:
            if event.message:
                print(event.message, file=sys.stderr)
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=event.total, desc="bench", unit="run", file=sys.stderr)
        if event.total and self.bar.total != event.total:
            self.bar.total = event.total
        if event.message:
            self.bar.write(event.message, file=sys.stderr)
        self.bar.update(event.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    from latentrt.runtime.bench import PROMPT, format_markdown, parse_size, run_bench

    bar = Bar(args.progress)
    try:
        record = run_bench(args.model, backends=[b.strip() for b in args.backends.split(",") if b.strip()],
                           steps=args.steps, guidance=args.guidance,
                           sizes=[parse_size(s) for s in args.size] if args.size else None, batch=args.batch,
                           warmup=args.warmup, runs=args.runs, sweep=parse_sweeps(args.sweep), out_dir=args.output,
                           progress=bar, precision=args.precision, int8_recipe=args.int8_recipe, device=args.device,
                           seed=args.seed, prompt=args.prompt or PROMPT, flops=args.flops, plots=args.plots,
                           build_dir=args.build_dir)
    finally:
        bar.close()
    print(format_markdown(record))
    print(f"wrote {', '.join(record.files.values())} to {args.output}")
    return 0
