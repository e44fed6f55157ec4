"""The SD x4 upscaler (issue 12, H3): 7-channel UNet, noise-level class labels, an f = 4 VAE, v-prediction, tiling.

The tiny `sd-x4-upscaler` checkpoint (diffusers `StableDiffusionUpscalePipeline` folder with its DDPM
`low_res_scheduler` and `max_noise_level`) is detected, exported (every component, parity checked in ONNX
Runtime at 2 shapes), built for ONNX Runtime, run from `latentrt generate --image low.png --condition
noise_level=N` and compared with the diffusers pipeline loaded from the same folder: the low-res image
(16x16, preprocessed as its VaeImageProcessor does) noised by `low_res_scheduler.add_noise` at the noise
level with noise drawn before the initial latents, concatenated to the scaled latents, `class_labels =
noise_level`, CFG, decoded by the f = 4 VAE to 64x64; same seed (CPU generator) and settings.

Tolerances (max |diff| per pixel of the [0, 1] images, the bounds of tests/test_pipeline.py): ONNX Runtime
1e-3, torch backend 2e-5 (measured: ORT ~1e-6, torch ~2e-6). The CLI image equals the API's exactly.
Tiling (latentrt.runtime.tiles): a tile that covers the image gives exactly the untiled images and latents;
a 48x32 input in 32 px tiles overlapping by 16 px equals each tile's own output where no other tile
reaches, and its step between adjacent pixels is at most the largest step inside the tiles plus
max |a - b| over the overlap / (overlap x 4), the bound of linear blending (no seam beyond it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from latentrt.cli import main
from latentrt.errors import InvalidRequest
from latentrt.families import SamplerId
from latentrt.manifest import ONNX_KIND, read_manifest
from latentrt.runtime.images import read_png_metadata
from latentrt.runtime.pipeline import GenerationRequest, Pipeline, load_pipeline
from latentrt.runtime.tiles import generate_tiled, tile_boxes

IMAGE_TOL = {"onnxruntime": 1e-3, "torch": 2e-5}
PROMPT = "a sharp photo of a cat"
SETTINGS: dict[str, Any] = dict(steps=3, guidance=7.5, seed=4)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Any) -> Path:
    return tiny_checkpoint("sd-x4-upscaler")


@pytest.fixture(scope="module")
def engines(onnx_export_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from latentrt.engines.build import build_engines

    return build_engines(onnx_export_dir("sd-x4-upscaler"), tmp_path_factory.mktemp("x4") / "engines",
                         backend="onnxruntime")


@pytest.fixture(scope="module")
def pipe(engines: Path) -> Any:
    pipeline = load_pipeline(engines)
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def low(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("x4-inputs")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:48, 0:32]
    smooth = np.stack([128 + 100 * np.sin(xx / 5.0), 128 + 90 * np.cos(yy / 7.0), 60 + 3 * xx + 2 * yy], -1)
    large = Image.fromarray(np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8))
    small = large.crop((0, 0, 16, 16))
    small.save(root / "low.png")
    large.save(root / "large.png")
    return {"root": root, "small": small, "large": large}


REFERENCE: dict[tuple[str, int], np.ndarray] = {}


def diffusers_images(checkpoint: Path, image: Image.Image, sampler: str, noise_level: int) -> np.ndarray:
    """StableDiffusionUpscalePipeline from the same folder, with the sampler's scheduler class (cached per module)."""
    key = (sampler, noise_level)
    if key not in REFERENCE:
        import diffusers

        from latentrt.runtime.scheduler_config import SAMPLER_CLASSES

        ref: Any = diffusers.StableDiffusionUpscalePipeline.from_pretrained(str(checkpoint))
        ref.set_progress_bar_config(disable=True)
        cls, overrides = SAMPLER_CLASSES[SamplerId(sampler)]
        ref.scheduler = getattr(diffusers, cls.name).from_config(ref.scheduler.config, **overrides)
        out = ref(prompt=PROMPT, image=image, noise_level=noise_level, num_inference_steps=SETTINGS["steps"],
                  guidance_scale=SETTINGS["guidance"], generator=torch.Generator("cpu").manual_seed(SETTINGS["seed"]),
                  output_type="np")
        REFERENCE[key] = np.asarray(out.images)
    return REFERENCE[key]


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_detected_with_its_structure(checkpoint: Path, onnx_export_dir: Any) -> None:
    from latentrt.reference.models import detect_family, load_checkpoint

    assert detect_family(checkpoint).name == "sd-x4-upscaler"
    loaded = load_checkpoint(checkpoint)
    assert loaded.dims.vae_scale_factor == 4 and loaded.dims.unet_in_channels == 7
    assert loaded.dims.unet_config == {"num_class_embeds": 1000}
    assert loaded.dims.extra["max_noise_level"] == 350
    assert loaded.dims.extra["low_res_schedule"] == {"beta_start": 0.0001, "beta_end": 0.02,
                                                     "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
    m = read_manifest(onnx_export_dir("sd-x4-upscaler"), ONNX_KIND)
    assert list(m["components"]) == ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    assert all(len(c["parity"]["checks"]) >= 2 for c in m["components"].values())
    assert m["model"]["dims"]["extra"]["max_noise_level"] == 350 and m["model"]["vae_scaling_factor"] == 0.08333


def test_built_unet_takes_the_noise_level_as_class_labels(checkpoint: Path, engines: Path) -> None:
    from diffusers import UNet2DConditionModel

    built = read_manifest(engines)
    session = ort.InferenceSession(str(engines / built["components"]["unet"]["path"]),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["sample", "timestep", "encoder_hidden_states", "class_labels"]
    unet: Any = UNet2DConditionModel.from_pretrained(str(checkpoint / "unet")).eval()
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 7, 16, 16, generator=g), torch.randn(2, 77, 48, generator=g)
    t, levels = torch.tensor([900.0, 20.0]), torch.tensor([20, 350])
    with torch.no_grad():
        ref = unet(sample, t, encoder_hidden_states=context, class_labels=levels).sample
        other = unet(sample, t, encoder_hidden_states=context, class_labels=levels + 1).sample
    got = session.run(None, {"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": context.numpy(),
                             "class_labels": levels.numpy()})[0]
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=1e-4, atol=1e-4)
    assert float((other - ref).abs().max()) > 1e-3


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize(("sampler", "level"), [("ddim", 20), ("euler_a", 100)])
def test_matches_the_diffusers_upscale_pipeline(checkpoint: Path, engines: Path, low: dict[str, Any], backend: str,
                                                sampler: str, level: int) -> None:
    pipe = load_pipeline(engines if backend == "onnxruntime" else checkpoint, backend=backend)
    try:
        ours = pipe.generate(GenerationRequest(prompt=PROMPT, image=low["small"], sampler=sampler,
                                               conditioning={"noise_level": level}, **SETTINGS))
    finally:
        pipe.close()
    ref = diffusers_images(checkpoint, low["small"], sampler, level)
    assert ours.array is not None and ours.array.shape == ref.shape == (1, 64, 64, 3)
    assert ours.latents.shape == (1, 4, 16, 16) and ours.settings["mode"] == "txt2img"
    diff = max_diff(ours.array, ref)
    print(f"x4 upscaler {sampler} noise {level} {backend}: max |diff| {diff:.2e}")
    assert diff <= IMAGE_TOL[backend]
    other = diffusers_images(checkpoint, low["small"], sampler, level + 50)
    assert max_diff(other, ref) > 10 * IMAGE_TOL[backend]  # the noise level reaches the image


def test_cli_upscales_an_image(engines: Path, pipe: Pipeline, low: dict[str, Any], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "up.png"
    assert main(["generate", str(engines), "-p", PROMPT, "--image", str(low["root"] / "low.png"), "--condition",
                 "noise_level=20", "--steps", "3", "--guidance", "7.5", "--seed", "4", "--sampler", "ddim",
                 "--no-progress", "-o", str(out)]) == 0
    assert f"wrote {out} (64x64, seed 4)" in capsys.readouterr().out
    settings = json.loads(read_png_metadata(out)["latentrt"])
    assert settings["family"] == "sd-x4-upscaler" and settings["conditioning"] == {"noise_level": 20}
    api = pipe.generate(GenerationRequest(prompt=PROMPT, image=low["small"], sampler="ddim",
                                          conditioning={"noise_level": 20}, **SETTINGS))
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api.images[0]))


def test_a_tile_that_covers_the_image_is_the_untiled_run(pipe: Pipeline, low: dict[str, Any]) -> None:
    request = GenerationRequest(prompt=PROMPT, image=low["small"], sampler="ddim", **SETTINGS)
    whole = pipe.generate(request)
    tiled = generate_tiled(pipe, request, tile=32, overlap=8)
    assert tiled.settings["tiles"] == 1 and tiled.array is not None and whole.array is not None
    assert np.array_equal(tiled.array, whole.array) and torch.equal(tiled.latents, whole.latents)


def test_a_large_input_is_upscaled_in_tiles_without_seams(pipe: Pipeline, low: dict[str, Any]) -> None:
    large = low["large"]  # 32 wide, 48 high: two 32x32 tiles, rows 0-32 and 16-48
    request = GenerationRequest(prompt=PROMPT, image=large, sampler="ddim", **SETTINGS)
    tiled = generate_tiled(pipe, request, tile=32, overlap=16)
    assert tiled.array is not None and tiled.array.shape == (1, 192, 128, 3) and tiled.settings["tiles"] == 2
    assert tiled.latents.shape == (1, 4, 48, 32)
    boxes = tile_boxes((48, 32), 32, 16)
    assert boxes == [(0, 0, 32, 32), (16, 0, 32, 32)]
    parts = []
    for top, left, h, w in boxes:
        crop = large.crop((left, top, left + w, top + h))
        result = pipe.generate(GenerationRequest(prompt=PROMPT, image=crop, sampler="ddim", **SETTINGS))
        assert result.array is not None
        parts.append(result.array[0].astype(np.float64))
    out = tiled.array[0].astype(np.float64)
    np.testing.assert_allclose(out[:64], parts[0][:64], atol=1e-6)  # only the first tile reaches rows 0-64
    np.testing.assert_allclose(out[128:], parts[1][64:], atol=1e-6)  # only the second reaches rows 128-192
    a, b = parts[0][64:], parts[1][:64]  # both tiles over output rows 64-128
    inner = max(float(np.abs(np.diff(p, axis=ax)).max()) for p in parts for ax in (0, 1))
    bound = inner + float(np.abs(a - b).max()) / (16 * 4)
    steps = max(float(np.abs(np.diff(out, axis=ax)).max()) for ax in (0, 1))
    print(f"tiled: largest step {steps:.3f}, inside tiles {inner:.3f}, bound {bound:.3f}")
    assert steps <= bound + 1e-6
    naive = np.concatenate([parts[0][:96], parts[1][32:]])  # pasted at the overlap's middle: a hard seam
    assert float(np.abs(out[95] - out[96]).max()) < float(np.abs(naive[95] - naive[96]).max())


def test_cli_tiles(engines: Path, low: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "tiled.png"
    assert main(["generate", str(engines), "-p", PROMPT, "--image", str(low["root"] / "large.png"), "--tile", "32",
                 "--tile-overlap", "16", "--steps", "2", "--seed", "1", "--no-progress", "-o", str(out)]) == 0
    assert Image.open(out).size == (128, 192)
    settings = json.loads(read_png_metadata(out)["latentrt"])
    assert settings["tiles"] == 2 and settings["tile_overlap"] == 16


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"conditioning": {"noise_level": 351}}, r"noise_level'\] must be a whole number in \[0, 350\]"),
    ({"conditioning": {"noise_level": -1}}, r"in \[0, 350\]"),
    ({"conditioning": {"noise_level": 2.5}}, "must be a whole number"),
    ({"conditioning": {"noise_level": True}}, "must be a whole number"),
    ({"conditioning": {"strength": 3}}, "takes no conditioning value 'strength'"),
    ({"image": None}, "give --image"),
    ({"mask": "MASK"}, "and no mask"),
    ({"strength": 0.5}, "strength applies to img2img"),
])
def test_bad_requests_are_refused(pipe: Pipeline, low: dict[str, Any], kwargs: dict[str, Any], needle: str) -> None:
    fields: dict[str, Any] = {"prompt": PROMPT, "image": low["small"], "steps": 2, **kwargs}
    if fields.get("mask") == "MASK":
        fields["mask"] = low["small"]
    with pytest.raises(InvalidRequest, match=needle):
        pipe.check(GenerationRequest(**fields))


@pytest.mark.parametrize(("tile", "overlap", "needle"), [
    (10, None, "multiple of 16"), (32, 32, r"overlap must be a whole number in \[0, 32\)"), (32, -1, "overlap")])
def test_bad_tiles_are_refused(pipe: Pipeline, low: dict[str, Any], tile: int, overlap: int | None,
                               needle: str) -> None:
    from latentrt.runtime.tiles import check_tiled

    with pytest.raises(InvalidRequest, match=needle):
        check_tiled(pipe, GenerationRequest(prompt=PROMPT, image=low["large"], steps=2), tile, overlap)
