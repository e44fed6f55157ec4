"""One benchmark over loaded runners: cold runs, interleaved measured rounds per case, the record and reports.

Loading what the runners run from (exporting, building, quantizing what is missing) is the workflow's part
(`latentrt.workflows.bench`); everything here only measures.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from latentrt.families import FamilySpec

from ..denoisers import needs_cfg
from .cases import INT8, BenchCase, BenchEvent, BenchRecord, Progress, Sample
from .report import write_reports
from .runner import Runner, measure_case
from .stats import case_result, loadavg, peak_rss_mb, sweep_summary, unet_gflop
from .targets import Targets

log = logging.getLogger(__name__)


class Reporter:
    """Progress of one benchmark: phase messages and finished generations, to the log and a `Progress` callback."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.done = 0
        self.total = 0

    def say(self, message: str) -> None:
        log.info("%s", message)
        if self.progress:
            self.progress(BenchEvent(self.done, self.total, message))

    def tick(self) -> None:
        self.done += 1
        if self.progress:
            self.progress(BenchEvent(self.done, self.total))


def generations(labels: Sequence[str], cases: Sequence[BenchCase], warmup: int, runs: int,
                calibration: int = 0) -> int:
    """How many generations a benchmark runs: calibration, one cold run per backend (the first warm-up round),
    then warm-up and measured rounds per case."""
    return calibration + len(labels) + sum((warmup + runs) * len(labels) for _ in cases) - len(labels) * min(warmup, 1)


def _cold(sample: Sample) -> dict[str, Any]:
    return {"end_to_end_ms": round(sample.total_ms, 3),
            "stages_ms": {k: round(sum(v), 3) for k, v in sample.stages.items() if k != "total"}}


def measure(runners: Mapping[str, Runner], t: Targets, spec: FamilySpec, cases: Sequence[BenchCase], *,
            warmup: int, runs: int, seed: int, prompt: str, guidance: float, flops: bool,
            machine: Mapping[str, Any], reporter: Reporter,
            compare_to: Sequence[str] = ()) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Cold runs of the first case, then every case measured; (per-backend info, per-case results by name).
    `compare_to`: labels every other backend is also compared with (speedup and image difference)."""
    info = {label: {"describe": r.describe, "load_s": round(r.load_s, 3), "rss_load_mb": round(r.rss_load_mb, 1),
                    "folder": str(t.folders.get(label, t.checkpoint))} for label, r in runners.items()}
    reporter.say("cold runs")
    for label, r in runners.items():
        info[label]["cold"] = _cold(r.generate(cases[0], seed, prompt, guidance))
        reporter.tick()
    results: dict[str, Any] = {}
    cfg = needs_cfg(guidance)
    f = spec.vae_scale_factor
    for i, case in enumerate(cases):
        reporter.say(f"case {i + 1}/{len(cases)}: {case.name}")
        rounds = warmup - 1 if i == 0 and warmup else warmup  # the cold run was the first warm-up
        samples = measure_case(runners, case, warmup=rounds, runs=runs, seed=seed, prompt=prompt, guidance=guidance,
                               tick=reporter.tick)
        gflop = unet_gflop(t.checkpoint, t.family, case, cfg) if flops and t.checkpoint else None
        results[case.name] = case_result(case, samples, gflop, (case.height // f, case.width // f),
                                         case.batch * (2 if cfg else 1),
                                         machine.get("peak", {}).get("fp32_gemm_gflops"), compare_to)
    return info, results


def finish(model_or_dir: str | os.PathLike[str], t: Targets, spec: FamilySpec, labels: Sequence[str],
           cases: Sequence[BenchCase], sweeps: Mapping[str, Sequence[BenchCase]], info: dict[str, dict[str, Any]],
           results: Mapping[str, Any], machine: dict[str, Any], out: Path, *, guidance: float, warmup: int, runs: int,
           seed: int, prompt: str, device: str, precision: str, int8_recipe: str, plots: bool,
           compare_to: Sequence[str] = ()) -> BenchRecord:
    """The record of a finished benchmark (`cases[0]` is the main case), written to `out` as bench.json, bench.md
    and PNG plots."""
    main = cases[0]
    machine.update({"peak_rss_mb": round(peak_rss_mb(), 1), "loadavg_end": loadavg()})
    settings = {"model": os.fspath(model_or_dir), "checkpoint": t.checkpoint, "family": spec.name,
                "backends": list(labels), "steps": main.steps, "guidance": guidance, "size": [main.height, main.width],
                "batch": main.batch, "warmup": warmup, "runs": runs, "seed": seed, "prompt": prompt, "device": device,
                "precision": precision, "int8_recipe": int8_recipe if INT8 in labels else None,
                "sweep": {k: [c.name for c in v] for k, v in sweeps.items()}, "compare_to": list(compare_to),
                "engines": {k: str(t.folders[k]) for k in t.named},
                "ratio_definition": "reference p50 / backend p50 (> 1: faster than the diffusers pipeline); "
                                    "unet_per_step compares single UNet calls"}
    record = BenchRecord(machine, settings, t.build, info, [results[c.name] for c in cases],
                         {k: sweep_summary(k, v, results) for k, v in sweeps.items()})
    write_reports(record, out, plots=plots)
    return record
