"""The built-in trained demo models and their scene detector (issue 13).

- The detector (latentrt.scenes.detect) reads ground-truth scenes back: >= 0.95 of 300 drawn scenes
  match their caption in shape, colour and position (measured: 1.0).
- The shipped folders load through the normal checkpoint path and are detected as `demo` / `demo-turbo`.
- A 1-step Turbo image through our ONNX Runtime engines matches diffusers' StableDiffusionPipeline on
  the same shipped weights, seed and scheduler config, with tests/test_pipeline.py's onnxruntime
  bounds: images 1e-3, latents 1e-3 x max(1, max|ref|); its PIL image is within 1 grey level.
- The multi-step model on our torch backend matches diffusers' pipeline (20 DDIM steps, CFG), with
  test_pipeline.py's torch bounds (images 2e-5, latents 1e-5 x max(1, max|ref|)).
- For a fixed prompt and seed the detector finds the prompt's scene in both models' images (a pair
  the shipped weights draw right, picked after training: a regression check, not a quality claim).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from latentrt import scenes
from latentrt.families import get_family
from latentrt.reference.demo_model import DEMO_MODELS, demo_folder
from latentrt.reference.models import detect_family

PROMPT = "a green circle on the right"  # a prompt/seed both shipped models draw right (picked after training;
SEED = 0  # the overall scene-match scores are in benchmarks/results/demo-model/)


def test_detector_reads_ground_truth_scenes() -> None:
    drawn = scenes.scenes(7, 300)
    captions = [s.caption for s in drawn]
    assert scenes.score(captions, [scenes.draw(s) for s in drawn]) >= 0.95


def test_detector_finds_nothing_on_a_plain_image_and_reads_each_attribute() -> None:
    blank = Image.new("RGB", (64, 64), scenes.BACKGROUNDS["grey"])
    assert scenes.detect(blank).shape is None and not scenes.match(PROMPT, blank)
    for shape in scenes.SHAPES:
        for position in scenes.POSITIONS:
            scene = scenes.Scene(shape, "blue", position, background="white")
            d = scenes.detect(scenes.draw(scene))
            assert (d.shape, d.colour, d.position) == (shape, "blue", position)


def test_caption_grammar_round_trips() -> None:
    captions = scenes.all_captions()
    assert len(captions) == len(set(captions)) == len(scenes.SHAPES) * len(scenes.COLOURS) * len(scenes.POSITIONS)
    for text in captions:
        assert scenes.caption(*scenes.parse_caption(text)) == text
    with pytest.raises(ValueError, match="not a demo scene caption"):
        scenes.parse_caption("a lighthouse on a cliff")
    assert scenes.evaluation_prompts(5) == scenes.evaluation_prompts(5)


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_shipped_folder_is_detected_as_its_family(name: str) -> None:
    folder = demo_folder(name)
    assert detect_family(folder).name == name
    spec = get_family(name)
    assert spec.native_size == (64, 64) and spec.buckets == ((64, 64),)
    assert spec.is_turbo == (name == "demo-turbo")
    weights = sorted(p.name for p in folder.rglob("*.safetensors"))
    assert weights and sum(p.stat().st_size for p in folder.rglob("*")) < 20 * 2 ** 20


def _diffusers(name: str, steps: int, guidance: float, output_type: str) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = _reference_pipeline(name)
    out: Any = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                    generator=torch.Generator("cpu").manual_seed(SEED), output_type=output_type)
    assert isinstance(pipe, StableDiffusionPipeline)
    return out.images


@functools.cache
def _reference_pipeline(name: str) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(demo_folder(name)), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def turbo_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from latentrt.engines.build import build_engines
    from latentrt.export.onnx import export_model

    root = tmp_path_factory.mktemp("demo-turbo")
    onnx_dir = export_model(str(demo_folder("demo-turbo")), root / "onnx", overwrite=True)
    return build_engines(onnx_dir, root / "engines", backend="onnxruntime", overwrite=True)


def test_turbo_one_step_on_onnxruntime_matches_diffusers(turbo_engines: Path) -> None:
    from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

    pipe = load_pipeline(turbo_engines, backend="onnxruntime")
    try:
        ours = pipe.generate(GenerationRequest(prompt=PROMPT, seed=SEED, width=64, height=64))
    finally:
        pipe.close()
    assert ours.settings["steps"] == 1 and ours.settings["sampler"] == "euler"
    ref_images = _diffusers("demo-turbo", 1, 0.0, "np")
    ref_latents = _diffusers("demo-turbo", 1, 0.0, "latent")
    scale = max(1.0, float(ref_latents.abs().max()))
    assert _max_diff(ours.latents, ref_latents) <= 1e-3 * scale
    assert _max_diff(ours.array, ref_images) <= 1e-3
    pil = np.asarray(ours.images[0]).astype(np.int16)
    assert np.abs(pil - (ref_images[0] * 255).round().astype(np.int16)).max() <= 1
    assert scenes.match(PROMPT, ours.images[0]), scenes.detect(ours.images[0])


def test_turbo_draws_the_prompted_scenes(turbo_engines: Path) -> None:
    """A quality floor over the first 20 evaluation prompts, 1 step on ONNX Runtime (seeds 0..19).

    Measured with the shipped weights: shape 0.95, colour 1.0, position 1.0, all three 0.95 (the 200-prompt
    scores are in benchmarks/results/demo-model/: 98% at 1 step). The floors sit below that (two misses
    more than measured), so the test guards against a broken model, sampler or decoder, not seed noise.
    """
    from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

    prompts = scenes.evaluation_prompts(20)
    pipe = load_pipeline(turbo_engines, backend="onnxruntime")
    try:
        images = [pipe.generate(GenerationRequest(prompt=p, seed=i, width=64, height=64)).images[0]
                  for i, p in enumerate(prompts)]
    finally:
        pipe.close()
    got = scenes.attribute_scores(prompts, images)
    assert min(got["shape"], got["colour"], got["position"]) >= 0.85, got
    assert got["all"] >= 0.85, got


def test_multi_step_on_torch_matches_diffusers() -> None:
    from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

    pipe = load_pipeline(demo_folder("demo"), backend="torch")
    ours = pipe.generate(GenerationRequest(prompt=PROMPT, seed=SEED, width=64, height=64))
    spec = get_family("demo")
    assert ours.settings["steps"] == spec.sampling.steps and ours.settings["sampler"] == "ddim"
    ref_images = _diffusers("demo", spec.sampling.steps, spec.sampling.guidance, "np")
    ref_latents = _diffusers("demo", spec.sampling.steps, spec.sampling.guidance, "latent")
    scale = max(1.0, float(ref_latents.abs().max()))
    assert _max_diff(ours.latents, ref_latents) <= 1e-5 * scale
    assert _max_diff(ours.array, ref_images) <= 2e-5
    assert scenes.match(PROMPT, ours.images[0]), scenes.detect(ours.images[0])
