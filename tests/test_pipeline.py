"""Runtime vs diffusers: our pipeline on ONNX Runtime and on PyTorch matches the diffusers pipeline of each family.

Every case loads the same tiny random-weight diffusers folder in diffusers (AutoPipeline* /
StableDiffusionXL*Pipeline, scheduler set from the same config for the same sampler,
`generator=torch.Generator("cpu").manual_seed(seed)`) and compares the final latents and the
[0, 1] images (diffusers `output_type="latent"` / `"np"`). Everything is float32 on the CPU.

Tolerances (max |diff|), per backend, the same for every family:
- torch (the checkpoint's own modules behind our pipeline): images 2e-5, latents 1e-5 x max(1, max|ref|)
  (measured: 0 to 5e-6; not bit-exact because we encode a prompt and its negative in one text-encoder batch).
- onnxruntime (the exported graphs; the export itself is ~1e-6..1e-5 from PyTorch per call, and the
  error compounds over steps): images 1e-3, latents 1e-3 x max(1, max|ref|) (measured: <= 6e-6 / 2.5e-5).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from latentrt.errors import InvalidRequest
from latentrt.families import SamplerId
from latentrt.runtime.conditioning import SizeConditioning
from latentrt.runtime.pipeline import GenerationRequest, GenerationResult, Pipeline, load_pipeline
from latentrt.runtime.scheduler_config import SAMPLER_CLASSES

BACKENDS = ("onnxruntime", "torch")
IMAGE_TOL = {"onnxruntime": 1e-3, "torch": 2e-5}
LATENT_TOL = {"onnxruntime": 1e-3, "torch": 1e-5}


@dataclass(frozen=True)
class Case:
    id: str
    family: str
    kind: str  # txt2img | img2img | inpaint | refiner
    sampler: str
    steps: int
    guidance: float
    size: tuple[int, int] = (64, 64)  # (height, width) pixels
    prompt: str | tuple[str, ...] = "a photo of an astronaut riding a horse"
    negative: str | tuple[str, ...] | None = None
    num_images: int = 1
    strength: float | None = None
    seed: int = 42
    sizes: dict[str, Any] = field(default_factory=dict)  # SDXL micro-conditioning (diffusers kwarg names)


CASES = [
    Case("sd1-euler_a-cfg", "sd1", "txt2img", "euler_a", 3, 7.5),
    Case("sd1-batch", "sd1", "txt2img", "euler", 2, 5.0, prompt=("a red fox", "a blue bird in a tree"),
         negative=("blurry", "dark"), num_images=2, size=(64, 128)),
    Case("sd1-img2img", "sd1", "img2img", "euler_a", 4, 7.5, size=(64, 128), strength=0.6),
    Case("sd1-inpaint-full", "sd1-inpaint", "inpaint", "euler_a", 3, 7.5, strength=1.0),
    Case("sd1-inpaint-0.75", "sd1-inpaint", "inpaint", "euler", 4, 6.0, strength=0.75, negative="lowres"),
    Case("sd1-ddim", "sd1", "txt2img", "ddim", 3, 7.5, size=(64, 128)),
    Case("sdxl-turbo-ddim-2", "sdxl-turbo", "txt2img", "ddim", 2, 0.0),
    Case("sd2-dpmpp_2m", "sd2", "txt2img", "dpmpp_2m", 3, 7.5, size=(128, 64)),
    Case("sd2-v-dpmpp_2m_karras", "sd2-v", "txt2img", "dpmpp_2m_karras", 3, 6.0),
    Case("sd2-v-euler_a", "sd2-v", "txt2img", "euler_a", 3, 6.0, size=(64, 128)),
    Case("sdxl-zero-negative", "sdxl", "txt2img", "euler_a", 3, 5.0),
    Case("sdxl-negative-sizes", "sdxl", "txt2img", "euler", 2, 5.0, negative="ugly", size=(64, 128),
         sizes={"original_size": (128, 256), "crops_coords_top_left": (8, 0), "target_size": (64, 128)}),
    Case("sdxl-img2img", "sdxl", "img2img", "euler", 4, 5.0, strength=0.5),
    Case("sdxl-refiner", "sdxl", "refiner", "euler_a", 5, 5.0),
    Case("sdxl-turbo-1", "sdxl-turbo", "txt2img", "euler", 1, 0.0),
    Case("sdxl-turbo-4", "sdxl-turbo", "txt2img", "euler_a", 4, 0.0),
    Case("sdxl-turbo-img2img", "sdxl-turbo", "img2img", "euler", 2, 0.0, strength=0.5),
    Case("sd-turbo-1", "sd-turbo", "txt2img", "euler", 1, 0.0),
]


def init_image(height: int, width: int) -> Image.Image:
    """A deterministic RGB test image: gradients plus speckle."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, 128 + 0 * x], axis=-1) + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def init_mask(height: int, width: int) -> Image.Image:
    """White (repaint) rectangle in the middle, soft-edged grey pixels around it to exercise binarisation."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    draw.rectangle((width // 4 - 2, height // 4 - 2, 3 * width // 4 + 2, 3 * height // 4 + 2), fill=100)
    draw.rectangle((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=255)
    return mask


# ---------------------------------------------------------------------------- diffusers side


@functools.cache
def diffusers_pipe(folder: str, kind: str) -> Any:
    import diffusers

    cls = {"txt2img": diffusers.AutoPipelineForText2Image, "img2img": diffusers.AutoPipelineForImage2Image,
           "inpaint": diffusers.AutoPipelineForInpainting,
           "refiner": diffusers.StableDiffusionXLImg2ImgPipeline}[kind]
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_sampler(pipe: Any, sampler: str) -> Any:
    """Set the diffusers pipeline's scheduler to the class (and settings) our sampler reproduces."""
    import diffusers

    cls, overrides = SAMPLER_CLASSES[SamplerId(sampler)]
    pipe.scheduler = getattr(diffusers, cls.name).from_config(pipe.scheduler.config, **overrides)
    return pipe


def diffusers_kwargs(case: Case) -> dict[str, Any]:
    h, w = case.size
    kw: dict[str, Any] = dict(prompt=list(case.prompt) if isinstance(case.prompt, tuple) else case.prompt,
                              num_inference_steps=case.steps, guidance_scale=case.guidance,
                              num_images_per_prompt=case.num_images, **case.sizes)
    if case.negative is not None:
        kw["negative_prompt"] = list(case.negative) if isinstance(case.negative, tuple) else case.negative
    if case.kind == "txt2img":
        kw.update(height=h, width=w)
    if case.kind in ("img2img", "inpaint"):
        kw.update(image=init_image(h, w), strength=case.strength)
    if case.kind == "inpaint":
        kw.update(mask_image=init_mask(h, w), height=h, width=w)
    return kw


def run_diffusers(case: Case, folder: Callable[[str], Path], output_type: str) -> Any:
    """The diffusers pipeline's output for a case ("np" images or "latent" latents)."""
    g = torch.Generator("cpu").manual_seed(case.seed)
    kw = diffusers_kwargs(case)
    if case.kind != "refiner":
        pipe = with_sampler(diffusers_pipe(str(folder(case.family)), case.kind), case.sampler)
        return pipe(**kw, generator=g, output_type=output_type).images
    base = with_sampler(diffusers_pipe(str(folder("sdxl")), "txt2img"), case.sampler)
    refiner = with_sampler(diffusers_pipe(str(folder("sdxl-refiner")), "refiner"), case.sampler)
    h, w = case.size
    latents = base(**kw, height=h, width=w, denoising_end=0.8, output_type="latent", generator=g).images
    return refiner(**kw, image=latents, denoising_start=0.8, output_type=output_type, generator=g).images


# ---------------------------------------------------------------------------- our side


@functools.cache
def our_pipeline(folder: str, backend: str, refiner: str | None = None) -> Pipeline:
    return load_pipeline(folder, backend=backend, refiner=refiner)


def request_for(case: Case) -> GenerationRequest:
    h, w = case.size
    prompt = list(case.prompt) if isinstance(case.prompt, tuple) else case.prompt
    negative = list(case.negative) if isinstance(case.negative, tuple) else case.negative
    image = init_image(h, w) if case.kind in ("img2img", "inpaint") else None
    mask = init_mask(h, w) if case.kind == "inpaint" else None
    return GenerationRequest(prompt=prompt, negative_prompt=negative, steps=case.steps, guidance=case.guidance,
                             sampler=case.sampler, width=w, height=h, seed=case.seed,
                             num_images_per_prompt=case.num_images, image=image, mask=mask, strength=case.strength,
                             sizes=SizeConditioning(**case.sizes))


def run_ours(case: Case, folder: Callable[[str], Path], backend: str) -> GenerationResult:
    if case.kind == "refiner":
        pipe = our_pipeline(str(folder("sdxl")), backend, str(folder("sdxl-refiner")))
    else:
        pipe = our_pipeline(str(folder(case.family)), backend)
    return pipe.generate(request_for(case))


# ---------------------------------------------------------------------------- the comparison


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_diffusers(case: Case, backend: str, onnx_export_dir: Callable[[str], Path],
                           tiny_checkpoint: Callable[[str], Path]) -> None:
    ours = run_ours(case, onnx_export_dir, backend)
    ref_images = run_diffusers(case, tiny_checkpoint, "np")
    ref_latents = run_diffusers(case, tiny_checkpoint, "latent")
    n = (len(case.prompt) if isinstance(case.prompt, tuple) else 1) * case.num_images
    assert ours.array is not None and ours.array.shape == ref_images.shape == (n, *case.size, 3)
    assert ours.latents.shape == ref_latents.shape
    assert len(ours.images) == n and ours.images[0].size == (case.size[1], case.size[0])
    lat_scale = max(1.0, float(ref_latents.abs().max()))
    print(f"{case.id} {backend}: latents {max_diff(ours.latents, ref_latents):.2e} (scale {lat_scale:.1f}), "
          f"images {max_diff(ours.array, ref_images):.2e}")
    assert max_diff(ours.latents, ref_latents) <= LATENT_TOL[backend] * lat_scale
    assert max_diff(ours.array, ref_images) <= IMAGE_TOL[backend]
    # PIL output rounds as diffusers' numpy_to_pil does (a float ulp can flip a value sitting on .5)
    pil = np.stack([np.asarray(im) for im in ours.images]).astype(np.int16)
    assert np.abs(pil - (ref_images * 255).round().astype(np.int16)).max() <= 1
    assert ours.settings["sampler"] == case.sampler and ours.settings["steps"] == case.steps
    assert ours.seed == case.seed and ours.settings["backend"] == backend


def test_unet_calls_per_step(onnx_export_dir: Callable[[str], Path]) -> None:
    """CFG runs one doubled UNet batch per step; Turbo's guidance 0 runs no CFG batch."""
    cfg = our_pipeline(str(onnx_export_dir("sd1")), "onnxruntime").generate(
        GenerationRequest("a cat", steps=3, guidance=7.5, width=64, height=64, seed=1))
    turbo = our_pipeline(str(onnx_export_dir("sd-turbo")), "onnxruntime").generate(
        GenerationRequest("a cat", steps=2, width=64, height=64, seed=1))
    assert cfg.timing.summary()["unet"].count == 3
    assert turbo.timing.summary()["unet"].count == 2 and turbo.settings["guidance"] == 0.0
    stages = cfg.timing.stages()
    assert stages == ["text_encoder", "unet", "vae_decoder", "total"]


def test_same_seed_same_image_across_backends(onnx_export_dir: Callable[[str], Path]) -> None:
    """One request on two backends gives the same image; another seed gives another image."""
    folder = str(onnx_export_dir("sd2"))
    req = GenerationRequest("a lighthouse", steps=3, width=64, height=64, seed=123, sampler="euler_a")
    a = our_pipeline(folder, "onnxruntime").generate(req)
    b = our_pipeline(folder, "torch").generate(req)
    c = our_pipeline(folder, "onnxruntime").generate(GenerationRequest("a lighthouse", steps=3, width=64, height=64,
                                                                       seed=124, sampler="euler_a"))
    assert max_diff(a.array, b.array) <= IMAGE_TOL["onnxruntime"]
    assert max_diff(a.array, c.array) > 1e-2


def test_random_seed_is_reported_and_reproducible(onnx_export_dir: Callable[[str], Path]) -> None:
    pipe = our_pipeline(str(onnx_export_dir("sd-turbo")), "onnxruntime")
    first = pipe.generate(GenerationRequest("a boat", width=64, height=64))
    again = pipe.generate(GenerationRequest("a boat", width=64, height=64, seed=first.seed))
    assert max_diff(first.array, again.array) == 0.0


def test_latent_output_skips_decoder(onnx_export_dir: Callable[[str], Path]) -> None:
    pipe = our_pipeline(str(onnx_export_dir("sd-turbo")), "onnxruntime")
    full = pipe.generate(GenerationRequest("a boat", width=64, height=64, seed=5))
    latent = pipe.generate(GenerationRequest("a boat", width=64, height=64, seed=5, output_type="latent"))
    assert latent.images == [] and latent.array is None and "vae_decoder" not in latent.timing.stages()
    assert torch.equal(latent.latents, full.latents)


def test_refiner_timing_and_settings(onnx_export_dir: Callable[[str], Path]) -> None:
    """Base + refiner: the base stops at 0.8 of the schedule, the refiner runs the rest and decodes."""
    pipe = our_pipeline(str(onnx_export_dir("sdxl")), "onnxruntime", str(onnx_export_dir("sdxl-refiner")))
    r = pipe.generate(GenerationRequest("a castle", steps=5, width=64, height=64, seed=3, guidance=5.0))
    counts = {s: v.count for s, v in r.timing.summary().items()}
    assert counts["unet"] == 4 and counts["refiner_unet"] == 1
    assert counts["refiner_vae_decoder"] == 1 and "vae_decoder" not in counts
    assert counts["text_encoder"] == counts["text_encoder_2"] == counts["refiner_text_encoder_2"] == 1
    assert r.settings["denoising_end"] == 0.8 and r.settings["refiner"] == "tiny:sdxl-refiner"


def test_python_api_generate(onnx_export_dir: Callable[[str], Path]) -> None:
    """`latentrt.generate(folder, prompt, **settings)` is the pipeline in one call."""
    import latentrt

    folder = onnx_export_dir("sd-turbo")
    one_call = latentrt.generate(str(folder), "a red boat", steps=2, width=64, height=64, seed=4, backend="torch")
    pipe = our_pipeline(str(folder), "torch")
    assert isinstance(one_call, GenerationResult) and one_call.settings["backend"] == "torch"
    assert torch.equal(one_call.latents, pipe.generate(GenerationRequest("a red boat", steps=2, width=64, height=64,
                                                                         seed=4)).latents)


def test_continue_from_latents_equals_refiner_handoff(onnx_export_dir: Callable[[str], Path]) -> None:
    """Base with denoising_end, then the refiner from those latents by hand = the built-in handoff."""
    base = our_pipeline(str(onnx_export_dir("sdxl")), "onnxruntime")
    refiner = our_pipeline(str(onnx_export_dir("sdxl-refiner")), "onnxruntime")
    request = dict(prompt="a castle", steps=5, width=64, height=64, guidance=5.0, sampler="euler")
    joint = base.generate(GenerationRequest(**request, seed=8), refiner=refiner)  # type: ignore[arg-type]
    half = base.generate(GenerationRequest(**request, seed=8, denoising_end=0.8, output_type="latent"))  # type: ignore[arg-type]
    rest = refiner.generate(GenerationRequest(**request, seed=8, latents=half.latents, denoising_start=0.8))  # type: ignore[arg-type]
    assert torch.equal(joint.latents, rest.latents)
    with pytest.raises(InvalidRequest, match="give denoising_start"):
        refiner.generate(GenerationRequest("a castle", latents=half.latents))


def test_refiner_runs_its_own_scheduler(onnx_export_dir: Callable[[str], Path]) -> None:
    """No sampler given: the refiner plans from its own scheduler config (as diffusers' refiner does), not the base's."""
    base = our_pipeline(str(onnx_export_dir("sdxl")), "onnxruntime")
    refiner = our_pipeline(str(onnx_export_dir("sdxl-refiner")), "onnxruntime")
    refiner.engines.scheduler_config = dict(refiner.engines.scheduler_config, _class_name="DDIMScheduler",
                                            clip_sample=False)
    request = dict(prompt="a castle", steps=5, width=64, height=64, guidance=5.0)
    joint = base.generate(GenerationRequest(**request, seed=8), refiner=refiner)  # type: ignore[arg-type]
    assert joint.settings["sampler"] != "ddim" and joint.settings["refiner_sampler"] == "ddim"
    half = base.generate(GenerationRequest(**request, seed=8, denoising_end=0.8, output_type="latent"))  # type: ignore[arg-type]
    rest = refiner.generate(GenerationRequest(**request, seed=8, latents=half.latents, denoising_start=0.8))  # type: ignore[arg-type]
    assert rest.settings["sampler"] == "ddim" and torch.equal(joint.latents, rest.latents)
    explicit = base.generate(GenerationRequest(**request, seed=8, sampler="euler"), refiner=refiner)  # type: ignore[arg-type]
    assert explicit.settings["sampler"] == explicit.settings["refiner_sampler"] == "euler"
