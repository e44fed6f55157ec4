"""`latentrt demo`: the whole path on a built-in tiny model, on the CPU — export, build, generate, time.

The tiny model has the real architecture of its family with random weights, so the image is noise;
the point is to see every stage run and what each costs. Later runs reuse the export and engines.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from latentrt.families import FAMILIES
from latentrt.paths import TINY_PREFIX

DEMO_FAMILIES = tuple(dict.fromkeys(spec.name for spec in FAMILIES.values()))  # every registered family has a tiny model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", default="latentrt-demo", help="working folder (default ./latentrt-demo)")
    parser.add_argument("--family", default="sd1", choices=DEMO_FAMILIES, help="which tiny model (default sd1)")
    parser.add_argument("--prompt", default="a lighthouse on a cliff at sunset, oil painting", help="the prompt")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the family's)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels, a multiple of 64 (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


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
    from latentrt.runtime.cli_generate import StepBar
    from latentrt.runtime.images import save_png
    from latentrt.runtime.pipeline import load_pipeline
    from latentrt.runtime.request import GenerationRequest
    from latentrt.runtime.timing import format_table

    check_multiple((args.size, args.size))
    root = Path(args.output)
    model = f"{TINY_PREFIX}{args.family}"
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
    print(f"wrote {out} (seed {result.seed}; random weights, so expect noise) in "
          f"{time.perf_counter() - start:.1f} s end to end")
    print(format_table(result.timing, title=f"timing ({args.family} tiny, {result.settings['steps']} steps, "
                                            f"{result.settings['sampler']}, ONNX Runtime CPU)"))
    return 0


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
