"""Request validation and artifact errors: each user mistake raises a named error with an actionable message."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from latentrt.errors import InvalidRequest, MissingComponent, StaleArtifact, UnsupportedShape
from latentrt.families import get_family
from latentrt.runtime.engine_set import load_engines, parse_device
from latentrt.runtime.pipeline import GenerationRequest, Pipeline, load_pipeline


@pytest.fixture(scope="module")
def sd1(onnx_export_dir: Callable[[str], Path]) -> Pipeline:
    return load_pipeline(onnx_export_dir("sd1"))


@pytest.fixture(scope="module")
def turbo(onnx_export_dir: Callable[[str], Path]) -> Pipeline:
    return load_pipeline(onnx_export_dir("sdxl-turbo"))


def req(**kw: object) -> GenerationRequest:
    base: dict[str, object] = dict(prompt="a cat", width=64, height=64, seed=0, steps=2)
    base.update(kw)
    return GenerationRequest(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kw", "match"), [
    ({"steps": 0}, "steps must be a whole number >= 1"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"guidance": -1.0}, "guidance must be >= 0"),
    ({"guidance": float("nan")}, "guidance must be >= 0"),
    ({"sampler": "k_heun_pp"}, "unknown sampler 'k_heun_pp'"),  # was 'heun', a sampler since issue 9
    ({"num_images_per_prompt": 0}, "num_images_per_prompt must be >= 1"),
    ({"width": 64, "height": None}, "give both width and height"),
    ({"aspect": "16:9"}, "either width and height or an aspect ratio"),
    ({"strength": 0.5}, "strength applies to img2img"),
    ({"denoising_end": 1.5}, "denoising_end must be a fraction"),
    ({"negative_prompt": ["a", "b"]}, "2 negative prompts for 1 prompts"),
    ({"prompt": []}, "prompt must be a string or a non-empty list"),
    ({"prompt": ["a cat"] * 9}, "need a UNet batch of 18; the engines take at most 16"),
])
def test_invalid_requests(sd1: Pipeline, kw: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        sd1.generate(req(**kw))


def test_size_not_a_multiple_names_nearest_valid_sizes(sd1: Pipeline) -> None:
    with pytest.raises(UnsupportedShape, match=r"100x64 .* nearest valid: 64x64, 128x64"):
        sd1.generate(req(height=100, width=64))


def test_aspect_snaps_to_a_family_bucket(sd1: Pipeline) -> None:
    settings, notes = sd1.resolve(req(width=None, height=None, aspect="16:9"))
    assert (settings.height, settings.width) in get_family("sd1").buckets
    assert settings.width > settings.height and notes == [f"aspect 16:9 -> bucket {settings.height}x"
                                                          f"{settings.width} (HxW)"]


def test_size_outside_engine_range_snaps_with_a_note(sd1: Pipeline) -> None:
    (_, hi_h), _ = sd1.engines.latent_range()
    tall = hi_h * 8 + 64  # one valid size step beyond what the engines take
    settings, notes = sd1.resolve(req(height=tall, width=64 * 4))
    assert (settings.height, settings.width) in get_family("sd1").buckets
    assert notes and notes[0].startswith(f"snapped {tall}x256 to bucket {settings.height}x{settings.width}")


def test_default_size_is_the_family_native_size(sd1: Pipeline) -> None:
    settings, notes = sd1.resolve(req(width=None, height=None))
    assert (settings.height, settings.width) == (512, 512) and notes == []


def test_unreadable_init_image(sd1: Pipeline, tmp_path: Path) -> None:
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(InvalidRequest, match="cannot read the init image"):
        sd1.generate(req(image=bad, strength=0.5))
    with pytest.raises(InvalidRequest, match="cannot read the init image"):
        sd1.generate(req(image=tmp_path / "missing.png", strength=0.5))


def test_mask_errors(sd1: Pipeline, onnx_export_dir: Callable[[str], Path]) -> None:
    image = Image.new("RGB", (64, 64), (10, 20, 30))
    # issue 14: a mask on a 4-channel model is legacy inpainting now (tests/test_legacy_inpaint.py), no longer
    # "a mask needs an inpainting model"; what stays refused: a mask alone, and a second-order sampler (diffusers
    # blends between the two stages of its steps)
    with pytest.raises(InvalidRequest, match="a mask needs an init image"):
        sd1.generate(req(mask=Image.new("L", (64, 64), 255)))
    with pytest.raises(InvalidRequest, match="does not work with the second-order sampler heun"):
        sd1.check(req(image=image, mask=Image.new("L", (64, 64), 255), sampler="heun"))
    inpaint = load_pipeline(onnx_export_dir("sd1-inpaint"))
    with pytest.raises(InvalidRequest, match=r"the mask is 32x64 \(HxW\) but the image is 64x64"):
        inpaint.generate(req(image=image, mask=Image.new("L", (64, 32), 255)))
    with pytest.raises(InvalidRequest, match="inpainting model: give an init image and a mask"):
        inpaint.generate(req())


def test_turbo_img2img_needs_steps_times_strength_of_one(turbo: Pipeline) -> None:
    image = Image.new("RGB", (64, 64), (200, 100, 50))
    with pytest.raises(InvalidRequest, match=r"steps x strength must be at least 1 .*1 x 0.5 = 0.5"):
        turbo.generate(req(image=image, steps=1, strength=0.5, guidance=0.0))
    settings, _ = turbo.resolve(req(image=image, steps=None, strength=0.5))
    assert settings.steps == 2 and settings.guidance == 0.0  # Turbo default: enough steps for one to run


def test_missing_component_file(onnx_export_dir: Callable[[str], Path], tmp_path: Path) -> None:
    folder = shutil.copytree(onnx_export_dir("sd1"), tmp_path / "sd1")
    (folder / "unet" / "model.onnx").unlink()
    with pytest.raises(MissingComponent, match=r"unet: .*model.onnx is missing"):
        load_engines(folder)


def test_component_from_another_model_is_stale(onnx_export_dir: Callable[[str], Path], tmp_path: Path) -> None:
    folder = shutil.copytree(onnx_export_dir("sd1"), tmp_path / "sd1")
    shutil.rmtree(folder / "unet")
    shutil.copytree(onnx_export_dir("sd2") / "unet", folder / "unet")
    with pytest.raises(StaleArtifact, match="unet: .*does not match the hash"):
        load_engines(folder)


def test_component_overwritten_in_place_is_stale_on_reload(onnx_export_dir: Callable[[str], Path],
                                                           tmp_path: Path) -> None:
    """Replacing a file inside a component folder (folder mtime unchanged) is caught by the next load."""
    folder = shutil.copytree(onnx_export_dir("sd1"), tmp_path / "sd1")
    load_engines(folder).close()  # hashes every component (and caches the digests)
    shutil.copyfile(onnx_export_dir("sd2") / "unet" / "model.onnx", folder / "unet" / "model.onnx")
    with pytest.raises(StaleArtifact, match="unet: .*does not match the hash"):
        load_engines(folder)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "meta", ""])
def test_bad_device_is_invalid_request(onnx_export_dir: Callable[[str], Path], device: str) -> None:
    with pytest.raises(InvalidRequest, match=r"device must be cpu or cuda\[:N\]"):
        load_engines(onnx_export_dir("sd1"), device=device)


def test_parse_device() -> None:
    assert parse_device("cpu") == torch.device("cpu") and parse_device(" cuda:1") == torch.device("cuda", 1)
    assert parse_device(torch.device("cuda")) == torch.device("cuda")


def test_tokenizer_changed_is_stale(onnx_export_dir: Callable[[str], Path], tmp_path: Path) -> None:
    folder = shutil.copytree(onnx_export_dir("sd1"), tmp_path / "sd1")
    with open(folder / "tokenizer" / "vocab.json", "a") as f:
        f.write(" ")
    with pytest.raises(StaleArtifact, match="hash mismatch"):
        load_engines(folder)


def test_refiner_pairing(onnx_export_dir: Callable[[str], Path]) -> None:
    with pytest.raises(InvalidRequest, match="is a sd1 model, not an SDXL refiner"):
        load_pipeline(onnx_export_dir("sdxl"), refiner=onnx_export_dir("sd1"))
    with pytest.raises(InvalidRequest, match="continues SDXL base latents; .* is sd2"):
        load_pipeline(onnx_export_dir("sd2"), refiner=onnx_export_dir("sdxl-refiner"))


def test_backend_choice_errors(onnx_export_dir: Callable[[str], Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="unknown backend 'coreml'"):  # openvino is one now (issue 11)
        load_engines(onnx_export_dir("sd1"), backend="coreml")
    with pytest.raises(InvalidRequest, match="is an ONNX export; build tensorrt engines from it first"):
        load_engines(onnx_export_dir("sd1"), backend="tensorrt")
    with pytest.raises(MissingComponent, match="has no manifest.json"):
        load_engines(tmp_path)
