"""`latentrt bench MODEL|DIR -o OUT`: per-stage latency of backends side by side, with a tqdm progress bar."""

from __future__ import annotations

import argparse

from latentrt.runtime.bench.cli import Bar, add_arguments, check_size, parse_engines, parse_sweeps

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    from latentrt.runtime.bench import PROMPT, format_markdown
    from latentrt.workflows.bench import run_bench

    sweep = parse_sweeps(args.sweep)  # every value checked before anything is built or measured
    sizes = [check_size(s) for s in args.size] if args.size else None
    engines = parse_engines(args.engines)
    compare_to = [c.strip() for item in args.compare_to or [] for c in item.split(",") if c.strip()]
    bar = Bar(args.progress)
    try:
        record = run_bench(args.model, backends=[b.strip() for b in args.backends.split(",") if b.strip()],
                           steps=args.steps, guidance=args.guidance, sizes=sizes, batch=args.batch,
                           warmup=args.warmup, runs=args.runs, sweep=sweep, out_dir=args.output,
                           progress=bar, precision=args.precision, int8_recipe=args.int8_recipe, device=args.device,
                           seed=args.seed, prompt=args.prompt or PROMPT, flops=args.flops, plots=args.plots,
                           build_dir=args.build_dir, engines=engines, compare_to=compare_to)
    finally:
        bar.close()
    print(format_markdown(record))
    print(f"wrote {', '.join(record.files.values())} to {args.output}")
    return 0
