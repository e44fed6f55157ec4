"""`latentrt demo`: the whole path on a built-in model, on the CPU — export, build, generate, time.

By default it runs the trained demo model's Turbo student (`demo-turbo`, 1 step; `--model demo`: the
multi-step teacher, 20 DDIM steps with guidance), which draws the procedural scenes it was trained on
("a red circle on the left", see latentrt.scenes); the scene detector then says whether the picture
matches the prompt. `--family F` runs F's tiny model instead: the real architecture with random
weights, so the image is noise and the point is to see every stage run and what each costs.
`--score N` also scores N evaluation prompts. Later runs reuse the export.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from latentrt.errors import InvalidRequest
from latentrt.families import FAMILIES
from latentrt.paths import TINY_PREFIX
from latentrt.scenes import SIZE as SCENE_SIZE

DEMO_FAMILIES = tuple(dict.fromkeys(spec.name for spec in FAMILIES.values()))  # every registered family has a tiny model
DEMO_MODELS = ("demo-turbo", "demo")  # the trained built-in models (latentrt.reference.demo_model), default first
DEMO_PROMPT = "a green circle on the right"  # drawn right by both shipped models at seed 0
TINY_PROMPT = "a lighthouse on a cliff at sunset, oil painting"
TINY_SIZE = 256


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", default="latentrt-demo", help="working folder (default ./latentrt-demo)")
    parser.add_argument("--model", default=DEMO_MODELS[0], choices=DEMO_MODELS,
                        help="trained demo model: demo-turbo (1-4 steps, default) or demo (20 steps, guidance)")
    parser.add_argument("--family", choices=DEMO_FAMILIES,
                        help="run this family's tiny model (random weights: noise) instead of a trained one")
    parser.add_argument("--prompt", help=f"the prompt (default {DEMO_PROMPT!r}; tiny models: {TINY_PROMPT!r})")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--size", type=int, help=f"image side in pixels, a multiple of 64 (default: the model's "
                                                 f"native size, 64; tiny models {TINY_SIZE})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--score", type=int, default=0, metavar="N",
                        help="trained models: also score N evaluation prompts with the scene detector")


def exported(folder: Path, model: str) -> bool:
    """Whether `folder` already holds a complete export of `model`."""
    from latentrt.errors import LatentRTError
    from latentrt.manifest import ONNX_KIND, read_manifest

    try:
        return read_manifest(folder, ONNX_KIND).get("source", {}).get("model") == model
    except LatentRTError:
        return False


def export_step(model: str, folder: Path) -> Path:
    import warnings

    from latentrt.export.onnx import export_model

    if exported(folder, model):
        print(f"[1/3] export: reusing {folder}")
        return folder
    print(f"[1/3] export {model} -> {folder}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        return export_model(model, folder, overwrite=True, progress=lambda line: print(f"      {line}", flush=True))


def build_step(onnx_dir: Path, folder: Path) -> Path:
    """ONNX Runtime CPU engines; the ONNX export itself when the engine builder is not installed."""
    try:
        from latentrt.engines.build import build_engines
    except ImportError as e:
        print(f"[2/3] build: engine builder unavailable ({e}); running the ONNX export directly")
        return onnx_dir
    print(f"[2/3] build ONNX Runtime CPU engines -> {folder}")
    return build_engines(onnx_dir, folder, backend="onnxruntime", overwrite=True)


def run(args: argparse.Namespace) -> int:
    from latentrt.buckets import check_multiple
    from latentrt.reference.demo_model import demo_folder
    from latentrt.runtime.cli_generate import StepBar
    from latentrt.runtime.images import save_png
    from latentrt.runtime.pipeline import load_pipeline
    from latentrt.runtime.request import GenerationRequest
    from latentrt.runtime.timing import format_table

    tiny = args.family is not None
    args.prompt = args.prompt or (TINY_PROMPT if tiny else DEMO_PROMPT)
    args.size = args.size or (TINY_SIZE if tiny else SCENE_SIZE)
    check_multiple((args.size, args.size))
    if args.score < 0:
        raise InvalidRequest(f"--score {args.score}: give a number of prompts >= 0")
    root = Path(args.output)
    model = f"{TINY_PREFIX}{args.family}" if tiny else str(demo_folder(args.model))
    name = f"{args.family} tiny" if tiny else args.model
    start = time.perf_counter()
    onnx_dir = export_step(model, root / "onnx")
    engines = build_step(onnx_dir, root / "engines")
    print(f"[3/3] generate {args.size}x{args.size} on ONNX Runtime (CPU)")
    pipe = load_pipeline(engines, backend="onnxruntime")
    bar = StepBar(True)
    try:
        result = pipe.generate(_request(GenerationRequest, args, pipe), callback=bar)
    finally:
        bar.close()
        pipe.close()
    out = save_png(result.images[0], root / "demo.png", result.metadata(0))
    note = "random weights, so expect noise" if tiny else f"model {args.model}"
    print(f"wrote {out} (seed {result.seed}; {note}) in {time.perf_counter() - start:.1f} s end to end")
    if not tiny:
        print(describe_detection(args.prompt, result.images[0]))
    print(format_table(result.timing, title=f"timing ({name}, {result.settings['steps']} steps, "
                                            f"{result.settings['sampler']}, ONNX Runtime CPU)"))
    if args.score and not tiny:
        print(score_engines(engines, args.score, args.steps, args.seed))
    return 0


def describe_detection(prompt: str, image: Any) -> str:
    """One line: what the scene detector sees in the image, and whether it matches the prompt."""
    from latentrt.scenes import PHRASES, detect, parse_caption

    d = detect(image)
    seen = f"a {d.colour} {d.shape} {PHRASES[d.position]}" if d.shape and d.position else "no object"
    try:
        verdict = "matches the prompt" if (d.shape, d.colour, d.position) == parse_caption(prompt) else \
            "does not match the prompt"
    except ValueError:
        verdict = "the prompt is outside the scene grammar, so no verdict"
    return f"scene detector: {seen} ({verdict})"


def score_engines(engines: Path, count: int, steps: int | None, seed: int) -> str:
    """Scene-match score of `count` evaluation prompts on the engines (one image each, seeds seed, seed+1, ...)."""
    from latentrt.runtime.pipeline import load_pipeline
    from latentrt.runtime.request import GenerationRequest
    from latentrt.scenes import attribute_scores, evaluation_prompts

    prompts = evaluation_prompts(count)
    pipe = load_pipeline(engines, backend="onnxruntime")
    try:
        images = [pipe.generate(GenerationRequest(prompt=p, steps=steps, seed=seed + i)).images[0]
                  for i, p in enumerate(prompts)]
    finally:
        pipe.close()
    s = attribute_scores(prompts, images)
    return (f"scene-match score over {count} prompts: {s['all']:.1%} (shape {s['shape']:.1%}, colour "
            f"{s['colour']:.1%}, position {s['position']:.1%})")


def _request(cls: Any, args: argparse.Namespace, pipe: Any) -> Any:
    """The demo's request; a denoiser that takes a mask (inpainting) gets a synthetic init image and a centre mask."""
    image = mask = None
    if pipe.spec.takes_mask:
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (args.size, args.size), (70, 110, 160))
        mask = Image.new("L", (args.size, args.size), 0)
        q = args.size // 4
        ImageDraw.Draw(mask).rectangle((q, q, 3 * q, 3 * q), fill=255)
    return cls(prompt=args.prompt, steps=args.steps, width=args.size, height=args.size, seed=args.seed,
               image=image, mask=mask)
