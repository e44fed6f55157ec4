"""One table per case from the full-size backend matrix of issue 11, recorded as interleaved runs per case.

Ten full-size SD 1.5 pipelines do not fit in one process on a 24 GiB machine (page-cache thrash measured at
~0.5 GB/s of re-reads, and an OOM kill at 512x512 with CFG), so each case is several `latentrt bench` runs that
share two anchors, `openvino-naive` (plain OpenVINO bf16) and `ours` (our best build, `--engines ours=DIR`):
run A holds the diffusers and ONNX Runtime labels (split into A1 / A2 where A did not fit), run B the OpenVINO
ones. Ratios are taken within a run (`vs openvino-naive` from each run's own `--compare-to openvino-naive`); a
label from a run without diffusers is put against diffusers by chaining through the anchor (reference / naive
in the diffusers run times naive / label in its own run), marked as chained.

    python benchmarks/matrix_summary.py benchmarks/results/sd15-256-4cfg-a benchmarks/results/sd15-256-4cfg-b \
        ... -o benchmarks/results/sd15-matrix.md

Runs are grouped into cases by their settings (size, steps, guidance); a run's name is its folder's last
`-` part (a, b, a1, ...).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ANCHOR = "openvino-naive"
ORDER = ("reference", "reference-1thread", "reference-bf16", "onnxruntime", "onnxruntime-int8", "openvino",
         "openvino-bf16", "openvino-int8", ANCHOR, "ours")


def _p50(result: Mapping[str, Any], stage: str, per: str = "per_run") -> float | None:
    entry = result["stages"].get(stage)
    return None if entry is None or entry.get(per) is None else float(entry[per]["p50"])


def _fmt(v: float | None, digits: int = 0) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def case_rows(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown rows of one case from its runs (name -> a bench.json with one case)."""
    ref_over_anchor = None
    for run in runs.values():
        res = run["cases"][0]["results"]
        if "reference" in res and ANCHOR in res:
            ref_over_anchor = res["reference"]["end_to_end_ms"]["p50"] / res[ANCHOR]["end_to_end_ms"]["p50"]
    rows: dict[str, list[str]] = {}
    for name, run in runs.items():
        case = run["cases"][0]
        res, vs = case["results"], case.get("vs", {}).get(ANCHOR, {})
        for label, r in res.items():
            if label in rows:
                continue  # an anchor's first run stands for it in the time columns
            speed = 1.0 if label == ANCHOR else vs.get(label, {}).get("speedup", {}).get("end_to_end")
            if label == "reference":
                vs_ref = "1x"
            elif "vs_reference" in case and label in case["vs_reference"]:
                vs_ref = f"{case['vs_reference'][label]['end_to_end']:.2f}x"
            elif ref_over_anchor and speed:
                vs_ref = f"{ref_over_anchor * speed:.2f}x (chained)"
            else:
                vs_ref = "–"
            img = case.get("image_vs_reference", {}).get(label)
            base = case.get("image_baseline")
            img_cell = "(baseline)" if label == base else f"{img['psnr_db']:.1f} dB vs {base}" if img else "–"
            rows[label] = [label, name, _fmt(r["end_to_end_ms"]["p50"]), "–" if speed is None else f"{speed:.2f}x",
                           vs_ref, _fmt(_p50(r, "unet", "per_call")), _fmt(_p50(r, "vae_decoder")), img_cell]
    for anchor in (ANCHOR, "ours"):  # the anchors: every run's time (absolute times drift between runs)
        if anchor in rows:
            held = [n for n, run in runs.items() if anchor in run["cases"][0]["results"]]
            rows[anchor][1] = ", ".join(held)
            rows[anchor][2] = " / ".join(_fmt(runs[n]["cases"][0]["results"][anchor]["end_to_end_ms"]["p50"])
                                         for n in held)
    if "ours" in rows:  # and every run's ratio
        ratios = [run["cases"][0].get("vs", {}).get(ANCHOR, {}).get("ours", {}).get("speedup", {}).get("end_to_end")
                  for run in runs.values()]
        rows["ours"][3] = " / ".join(f"{x:.2f}x" for x in ratios if x)
    ordered = [rows[k] for k in ORDER if k in rows] + [v for k, v in rows.items() if k not in ORDER]
    return ["| " + " | ".join(row) + " |" for row in ordered]


def summary(groups: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    lines = ["# Full-size SD 1.5 architecture: every CPU backend (issue 11)", "",
             "Each case is two or three `latentrt bench` runs, each interleaved within itself (A: diffusers + ONNX "
             "Runtime, split into A1 / A2 where it did not fit in memory; B: OpenVINO), all holding "
             "`openvino-naive` and `ours`. Speedups are within a run; the anchors' times and 'ours vs naive' are "
             "given per run, in the order of the run column (absolute times drift between runs on this shared "
             "machine; ratios within a run much less). UNet and decode times of the anchors are their first "
             "run's. Generated by `benchmarks/matrix_summary.py` from the bench.json files named under each table.",
             ""]
    for title, runs in groups.items():
        first = next(iter(runs.values()))
        m = first["machine"]
        rounds = "; ".join(f"{n}: {r['settings']['warmup']} warm-up + {r['settings']['runs']} rounds"
                           for n, r in runs.items())
        ours = first["settings"].get("engines", {}).get("ours", "?")
        lines += [f"## {title}", "", f"{rounds}; {m['cpu']}, {m['cores']} cores; ours = `{ours}`; runs: "
                  + ", ".join(f"`{r['dir']}`" for r in runs.values()), "",
                  "| backend | run | end to end p50 ms | vs openvino-naive | vs diffusers fp32 | UNet ms/call | "
                  "VAE decode ms | image PSNR vs fp32 |", "|---|---|---:|---:|---:|---:|---:|---|"]
        lines += case_rows(runs) + [""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bench output folders")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for d in args.runs:
        record = json.loads((d / "bench.json").read_text())
        record["dir"] = d.name
        s = record["settings"]
        kind = "no CFG" if s["guidance"] <= 1 else f"CFG {s['guidance']}"
        title = f"{s['size'][0]}x{s['size'][1]}, {s['steps']} step(s), {kind}"
        groups.setdefault(title, {})[d.name.rsplit("-", 1)[-1].upper()] = record
    args.output.write_text(summary(groups))
    print(args.output.read_text())


if __name__ == "__main__":
    main()
