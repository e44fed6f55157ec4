"""Report writers of `latentrt bench`: bench.md (Markdown tables), PNG plots (matplotlib, Agg) and bench.json."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from latentrt.manifest import atomic_write_bytes, atomic_write_json

from .cases import BenchRecord
from .stats import stage_p50


def _fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def _stage_cell(r: Mapping[str, Any], stages: Sequence[str], per: str = "per_run") -> str:
    values = [stage_p50(r, s, per) for s in stages if s in r["stages"]]
    return _fmt(sum(v for v in values if v is not None)) if values else "–"


def case_table(case: Mapping[str, Any]) -> list[str]:
    """Markdown rows of one case: one row per backend."""
    baseline = case.get("image_baseline", "reference")
    lines = [f"### {case['name']} (latent {case['latent'][0]}x{case['latent'][1]}, UNet batch {case['unet_batch']})",
             "",
             "| backend | end-to-end p50 ms | p90 | p99 | images/s | speedup vs reference | text encoder(s) ms | "
             f"UNet ms/step p50 | UNet total ms | VAE decode ms | pipeline overhead | image vs {baseline} (fp32) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, r in case["results"].items():
        e2e = r["end_to_end_ms"]
        speed = case.get("vs_reference", {}).get(label, {}).get("end_to_end")
        ov = r["overhead"]
        overhead = f"{ov['pipeline_pct']:.2f}%" if "pipeline_pct" in ov else f"{ov['untimed_pct']:.2f}% untimed"
        img = case.get("image_vs_reference", {}).get(label)
        img_cell = f"PSNR {img['psnr_db']:.1f} dB, max {img['max_abs_diff']:.3g}" if img else \
            ("(baseline)" if label == baseline else "–")
        speed_cell = "1 (baseline)" if label == "reference" else "–" if speed is None else f"{speed:,.2f}x"
        lines.append(f"| {label} | {_fmt(e2e['p50'])} | {_fmt(e2e['p90'])} | {_fmt(e2e['p99'])} | "
                     f"{r['images_per_s']:.3f} | {speed_cell} | "
                     f"{_stage_cell(r, ('text_encoder', 'text_encoder_2'))} | {_fmt(stage_p50(r, 'unet', 'per_call'))} | "
                     f"{_fmt(stage_p50(r, 'unet'))} | {_stage_cell(r, ('vae_decoder',))} | {overhead} | {img_cell} |")
    if "int8_vs_fp32" in case:
        q = case["int8_vs_fp32"]
        lines += ["", f"int8 vs fp32 ONNX Runtime: end-to-end {_fmt(q['speedup'].get('end_to_end'), 2)}x, UNet/step "
                      f"{_fmt(q['speedup'].get('unet_per_step'), 2)}x; final image PSNR {q['image']['psnr_db']:.1f} dB, "
                      f"max |diff| {q['image']['max_abs_diff']:.3g} (pixel values in [0, 1])."]
    for label, q in case.get("vs_fp32", {}).items():
        if label == "onnxruntime-int8":
            continue  # stated above
        lines += ["", f"{label} vs {q['fp32']} (fp32): end-to-end {_fmt(q['speedup'].get('end_to_end'), 2)}x, UNet/step "
                      f"{_fmt(q['speedup'].get('unet_per_step'), 2)}x, VAE decode {_fmt(q['speedup'].get('vae_decoder'), 2)}x; "
                      f"final image PSNR {q['image']['psnr_db']:.1f} dB, max |diff| {q['image']['max_abs_diff']:.3g}."]
    for base, others in case.get("vs", {}).items():
        lines += ["", f"vs {base} (speedup = {base} p50 / backend p50; image difference from {base}'s):", "",
                  "| backend | end-to-end | UNet/step | VAE decode | image |", "|---|---:|---:|---:|---|"]
        for label, q in others.items():
            sp, img = q["speedup"], q["image"]
            lines.append(f"| {label} | {_fmt(sp.get('end_to_end'), 2)}x | {_fmt(sp.get('unet_per_step'), 2)}x | "
                         f"{_fmt(sp.get('vae_decoder'), 2)}x | PSNR {img['psnr_db']:.1f} dB, max "
                         f"{img['max_abs_diff']:.3g} |")
    if "flops" in case:
        fl = case["flops"]
        share = fl.get("fraction_of_fp32_gemm_peak", {})
        rates = ", ".join(f"{k} {v:,.0f}" + (f" ({100 * share[k]:.0f}% of fp32 GEMM peak)" if k in share else "")
                          for k, v in fl["unet_gflops"].items())
        lines += ["", f"UNet: {fl['unet_gflop_per_call']:.2f} GFLOP per call; achieved GFLOP/s: {rates}."]
    return lines + [""]


def format_markdown(record: BenchRecord) -> str:
    """The human-readable report (bench.md)."""
    m, s = record.machine, record.settings
    tools = m.get("tools", {})
    peak = m.get("peak", {})
    lines = [f"# LatentRT bench: {s['model']} ({s['family']})", "",
             f"- Machine: {m.get('gpu') or m['cpu']}; {m['cores']} cores; flags {', '.join(m.get('cpu_flags', []))}; "
             f"load average {m.get('loadavg_start')} -> {m.get('loadavg_end')}",
             f"- Measured GEMM peak: fp32 {_fmt(peak.get('fp32_gemm_gflops'), 0)} GFLOP/s, int8 "
             f"{_fmt(peak.get('int8_gemm_gops'), 0)} GOP/s" if peak else "- GEMM peak: not measured",
             f"- Versions: torch {tools.get('torch')}, diffusers {tools.get('diffusers')}, onnxruntime "
             f"{tools.get('onnxruntime') or tools.get('onnxruntime-gpu')}, latentrt {tools.get('latentrt')}",
             f"- Settings: {s['steps']} steps, guidance {s['guidance']}, {s['warmup']} warm-up + {s['runs']} measured "
             f"runs per backend (interleaved), seed {s['seed']}, device {s['device']}, peak RSS {m.get('peak_rss_mb')} MB",
             f"- Speedup = {s['ratio_definition']}. Pipeline overhead = end-to-end minus the engines' own compute.",
             ""]
    if record.build:
        lines += ["Build: " + ", ".join(f"{k} {v} s" if k.endswith("_s") else f"{k} {v}" for k, v in
                                        record.build.items() if k != "int8"), ""]
    lines += ["| backend | load s | cold end-to-end ms | RSS added at load MB | UNet runs on |", "|---|---:|---:|---:|---|"]
    for label, b in record.backends.items():
        unet = next((d for d in b["describe"] if "unet" in d), b["describe"][0] if b["describe"] else "")
        lines.append(f"| {label} | {b['load_s']:.2f} | {_fmt(b.get('cold', {}).get('end_to_end_ms'))} | "
                     f"{b['rss_load_mb']:.0f} | {unet} |")
    lines.append("")
    for case in record.cases:
        lines += case_table(case)
    for key, sw in record.sweeps.items():
        lines += [f"### sweep: {key}", "", "| backend | " + " | ".join(str(x) for x in sw["x"]) + " | fit |",
                  "|---|" + "---:|" * len(sw["x"]) + "---|"]
        for label, series in sw["series"].items():
            ys = series["unet_per_step_p50_ms" if key == "size" else "end_to_end_p50_ms"]
            fit = (sw.get("fit") or {}).get(label)
            fit_text = f"fixed {fit['fixed_ms']:.1f} ms + {fit['slope_ms']:.2f} ms per {sw['x_label']}" if fit else "–"
            lines.append(f"| {label} | " + " | ".join(_fmt(y) for y in ys) + f" | {fit_text} |")
        lines += ["", f"(values: {'UNet ms/step p50' if key == 'size' else 'end-to-end ms p50'} vs {sw['x_label']})",
                  ""]
    lines += [f"![{name}]({path})" for name, path in record.files.items() if path.endswith(".png")]
    return "\n".join(lines) + "\n"


STAGE_COLORS = {"text_encoder": "#8da0cb", "text_encoder_2": "#a6d854", "vae_encoder": "#e78ac3",
                "unet": "#fc8d62", "vae_decoder": "#66c2a5", "other": "#b3b3b3"}


def plot_stages(case: Mapping[str, Any], path: Path) -> None:
    """Horizontal stacked bars: mean time per stage for each backend (other = untimed pipeline work)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(case["results"])
    fig, ax = plt.subplots(figsize=(8, 0.7 * len(labels) + 1.6))
    left = np.zeros(len(labels))
    for stage, color in STAGE_COLORS.items():
        if stage == "other":
            vals = np.array([case["results"][b]["overhead"]["untimed_ms"] for b in labels])
        else:
            vals = np.array([case["results"][b]["stages"].get(stage, {}).get("per_run", {}).get("mean", 0.0)
                             for b in labels])
        if np.any(vals > 0):
            ax.barh(labels, vals, left=left, color=color, label=stage)
            left += np.maximum(vals, 0)
    ax.set_xlabel("milliseconds per image batch (mean)")
    ax.set_title(f"per-stage time, {case['name']}")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(key: str, sweep: Mapping[str, Any], path: Path) -> None:
    """Sweep lines per backend (size: UNet ms/step vs latent pixels; steps / batch: end-to-end and images/s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(sweep["x"], dtype=float)
    panels = 2 if key == "batch" else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    y_key = "unet_per_step_p50_ms" if key == "size" else "end_to_end_p50_ms"
    for label, series in sweep["series"].items():
        y = np.array([np.nan if v is None else v for v in series[y_key]], dtype=float)
        line, = axes[0][0].plot(x, y, "o-", label=label)
        fit = (sweep.get("fit") or {}).get(label)
        if fit:
            axes[0][0].plot(x, fit["fixed_ms"] + fit["slope_ms"] * x, ":", color=line.get_color())
        if panels == 2:
            axes[0][1].plot(x, series["images_per_s"], "o-", label=label)
    axes[0][0].set_xlabel(sweep["x_label"])
    axes[0][0].set_ylabel("UNet ms per step (p50)" if key == "size" else "end-to-end ms (p50)")
    axes[0][0].set_title({"steps": "end-to-end vs steps (dotted: fixed + per-step fit)",
                          "size": "UNet time per step vs latent size", "batch": "end-to-end vs batch"}[key])
    axes[0][0].legend(fontsize=8)
    if panels == 2:
        axes[0][1].set_xlabel(sweep["x_label"])
        axes[0][1].set_ylabel("images / s")
        axes[0][1].set_title("throughput vs batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(record: BenchRecord, out: Path, plots: bool = True) -> None:
    """bench.json, bench.md and the PNG plots into `out` (record.files lists them, relative to `out`)."""
    if plots and record.cases:
        plot_stages(record.cases[0], out / "stages.png")
        record.files["stages"] = "stages.png"
        for key, sw in record.sweeps.items():
            plot_sweep(key, sw, out / f"sweep-{key}.png")
            record.files[f"sweep-{key}"] = f"sweep-{key}.png"
    record.files.update({"json": "bench.json", "markdown": "bench.md"})
    atomic_write_bytes(out / "bench.md", format_markdown(record).encode())
    atomic_write_json(out / "bench.json", _finite(record.to_json()))


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: write them as strings ("inf" PSNR means identical images)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
