"""Scene-match scores of the built-in demo models: PyTorch reference vs ONNX Runtime engines (fp32, fp16).

For each configuration, 200 evaluation prompts (latentrt.scenes.evaluation_prompts) are drawn in
batches of 4 (seed = batch index) and every image is checked by the scene detector (shape, colour,
position all as the prompt says). The PyTorch reference is diffusers' StableDiffusionPipeline on the
shipped folder; the engines are LatentRT's export + ONNX Runtime CPU build of the same folder.

    python training/score.py --out benchmarks/results/demo-model [--prompts 200] [--work /tmp/demo-score]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from latentrt import scenes

BATCH = 4


def reference_images(folder: Path, prompts: list[str], steps: int, guidance: float) -> list[Image.Image]:
    """diffusers StableDiffusionPipeline images, BATCH prompts per call, generator seeded with the batch index."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    for k in range(0, len(prompts), BATCH):
        out: Any = pipe(prompts[k: k + BATCH], num_inference_steps=steps, guidance_scale=guidance, height=64,
                        width=64, generator=torch.Generator().manual_seed(k // BATCH))
        images.extend(out.images)
    return images


def build(folder: Path, work: Path, precision: str) -> Path:
    """Export (once) and build ONNX Runtime CPU engines of the folder at `precision`."""
    from latentrt.engines.build import build_engines
    from latentrt.export.onnx import export_model

    onnx_dir = work / f"{folder.name}-onnx"
    if not (onnx_dir / "manifest.json").is_file():
        export_model(str(folder), onnx_dir, overwrite=True)
    return build_engines(onnx_dir, work / f"{folder.name}-{precision}", backend="onnxruntime", overwrite=True,
                         precision=precision)


def engine_images(engines: Path, prompts: list[str], steps: int, guidance: float) -> list[Image.Image]:
    """LatentRT runtime images on the engines, batched and seeded as `reference_images`."""
    from latentrt.runtime.pipeline import load_pipeline
    from latentrt.runtime.request import GenerationRequest

    pipe = load_pipeline(engines, backend="onnxruntime")
    images: list[Image.Image] = []
    try:
        for k in range(0, len(prompts), BATCH):
            req = GenerationRequest(prompt=prompts[k: k + BATCH], steps=steps, guidance=guidance, seed=k // BATCH,
                                    width=64, height=64)
            images.extend(pipe.generate(req).images)
    finally:
        pipe.close()
    return images


def grid(images: list[Image.Image], columns: int = 8) -> Image.Image:
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (64 * columns, 64 * rows))
    for i, im in enumerate(images):
        sheet.paste(im.resize((64, 64)), (64 * (i % columns), 64 * (i // columns)))
    return sheet


def write_report(out: Path, rows: list[dict[str, Any]], prompts: int, labels: list[str] | None = None) -> None:
    """scores.json and a Markdown table (README.md) in `out`; rows in plan order, the multi-step model first."""
    labels = labels or []
    order = {"demo": 0, "demo-turbo": 1}
    rows.sort(key=lambda r: (order.get(r["model"], 2), labels.index(r["config"]) if r["config"] in labels else 0))
    meta = {"prompts": prompts, "prompt_seed": 2026, "batch": BATCH, "seeds": "batch index",
            "detector": "latentrt.scenes.detect", "torch": torch.__version__, "threads": 1}
    (out / "scores.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Demo model scene-match scores", "",
             f"{prompts} evaluation prompts (`latentrt.scenes.evaluation_prompts`), {BATCH} per batch, seed = "
             "batch index; an image counts when the detector finds the prompt's shape, colour and position. "
             "Seconds per image: CPU, 1 thread, on a shared 2-core machine (not a benchmark).", "",
             "| configuration | backend | steps | all three | shape | colour | position | s / image |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['backend']} | {r['steps']} | {r['all']:.1%} | {r['shape']:.1%} | "
              f"{r['colour']:.1%} | {r['position']:.1%} | {r['seconds_per_image']:.3f} |" for r in rows]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/demo-model"))
    p.add_argument("--work", type=Path, default=Path("/tmp/latentrt-demo-score"))
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--weights", type=Path, help="folder holding demo/ and demo-turbo/ (default: the shipped ones)")
    p.add_argument("--skip-fp16", action="store_true")
    p.add_argument("--models", default="demo,demo-turbo",
                   help="which models to score (rows of the others already in scores.json are kept)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from latentrt.reference.demo_model import demo_folder

    def folder(name: str) -> Path:
        return args.weights / name if args.weights else demo_folder(name)

    prompts = scenes.evaluation_prompts(args.prompts)
    precisions = ["fp32"] if args.skip_fp16 else ["fp32", "fp16"]
    # (label, model, backend, precision, steps, guidance)
    plan: list[tuple[str, str, str, str, int, float]] = [("demo DDIM 20 CFG 4", "demo", "torch", "fp32", 20, 4.0)]
    plan += [(f"demo DDIM 20 CFG 4 ({pr})", "demo", "onnxruntime", pr, 20, 4.0) for pr in precisions]
    plan += [("demo DDIM 4 CFG 4 (no distillation)", "demo", "torch", "fp32", 4, 4.0)]
    for steps in (1, 2, 4):
        plan.append((f"demo-turbo Euler {steps}", "demo-turbo", "torch", "fp32", steps, 0.0))
        plan += [(f"demo-turbo Euler {steps} ({pr})", "demo-turbo", "onnxruntime", pr, steps, 0.0)
                 for pr in precisions]
    wanted = set(args.models.split(","))
    plan = [row for row in plan if row[1] in wanted]
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    engines: dict[tuple[str, str], Path] = {}
    labels = [row[0] for row in plan]
    kept = json.loads((args.out / "scores.json").read_text())["rows"] if (args.out / "scores.json").is_file() else []
    rows = [r for r in kept if r["model"] not in wanted]
    for label, model, backend, precision, steps, guidance in plan:
        t0 = time.perf_counter()
        if backend == "torch":
            images = reference_images(folder(model), prompts, steps, guidance)
        else:
            if (model, precision) not in engines:
                engines[model, precision] = build(folder(model), args.work, precision)
            t0 = time.perf_counter()
            images = engine_images(engines[model, precision], prompts, steps, guidance)
        seconds = time.perf_counter() - t0
        s = scenes.attribute_scores(prompts, images)
        rows.append({"config": label, "model": model, "backend": "PyTorch (diffusers)" if backend == "torch" else
                     f"ONNX Runtime CPU {precision}", "steps": steps, "guidance": guidance, **s,
                     "seconds_per_image": round(seconds / len(prompts), 4)})
        print(f"{label:40s} all {s['all']:.3f} shape {s['shape']:.3f} colour {s['colour']:.3f} "
              f"position {s['position']:.3f} ({seconds:.0f} s)", flush=True)
        if backend == "torch" and steps in (20, 1):
            grid(images[:32]).save(args.out / f"{model}-{steps}-steps.png")
    write_report(args.out, rows, len(prompts), labels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
