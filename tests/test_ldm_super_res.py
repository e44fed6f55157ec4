"""LDM super-resolution: the low-res image concatenated to the latents of a UNet2DModel on VQ-f4 (issue 12, item 1).

The family `ldm-super-res` declares one concatenated piece, `LOW_RES_IMAGE` (3 channels in [-1, 1] at
latent resolution, `request_image=True`): the request's image conditions the model (no img2img), and its
size sets the latent size, so a 32x32 image gives a 128x128 output at a factor of 4.

Reference we did not write: diffusers `LDMSuperResolutionPipeline` loaded from the same tiny folder (its
preprocess: Lanczos resize to sides that are multiples of 32, /255, 2x - 1; latents from `randn_tensor`
with a CPU generator, times `init_noise_sigma`; the image concatenated to the latents at every step; DDIM
with eta 0; `vqvae.decode` of the latents unscaled; clamp to [-1, 1], / 2 + 0.5).

Tolerances: [0, 1] images max |diff| per pixel: ONNX Runtime engines 1e-3, torch backend 2e-5, the bounds
tests/test_pipeline.py uses for every built-in family (measured: ORT 1.7e-6, torch 1.2e-6).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from latentrt.cli import main
from latentrt.errors import InvalidRequest
from latentrt.families import LOW_RES_IMAGE, get_family
from latentrt.manifest import ONNX_KIND, read_manifest
from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

IMAGE_TOL = {"onnxruntime": 1e-3, "torch": 2e-5}
FAST = ["--steps", "2", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def folder(tiny_checkpoint: Any) -> Path:
    return tiny_checkpoint("ldm-super-res")


@pytest.fixture(scope="module")
def engines(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from latentrt.engines.build import build_engines
    from latentrt.export.onnx import export_model

    root = tmp_path_factory.mktemp("ldm-super-res")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_dir = export_model(folder, root / "onnx")
    m = read_manifest(onnx_dir, ONNX_KIND)
    assert m["family"] == "ldm-super-res" and all(c["parity"]["checks"] for c in m["components"].values())
    unet = m["components"]["unet"]["io"]["inputs"]
    assert [i["name"] for i in unet] == ["sample", "timestep"] and unet[0]["shape"][1] == 6  # 3 latent + 3 image
    return build_engines(onnx_dir, root / "engines", backend="onnxruntime")


def low_res(seed: int = 0, size: tuple[int, int] = (32, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8))


def reference(folder: Path, image: Image.Image, steps: int, seed: int) -> np.ndarray:
    import diffusers

    ref: Any = diffusers.LDMSuperResolutionPipeline.from_pretrained(str(folder))
    ref.set_progress_bar_config(disable=True)
    return ref(image, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=steps, eta=0.0,
               output_type="np").images


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_spec_declares_the_low_res_image_piece() -> None:
    spec = get_family("ldm-super-res")
    assert spec.denoiser.concat == (LOW_RES_IMAGE,) and spec.denoiser.image_piece == LOW_RES_IMAGE
    assert spec.unet_in_channels == 6 and spec.unscaled_latents


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_matches_ldm_super_resolution_pipeline(folder: Path, engines: Path, backend: str) -> None:
    image = low_res()
    pipe = load_pipeline(engines if backend == "onnxruntime" else folder, backend=backend)
    try:
        ours = pipe.generate(GenerationRequest(image=image, steps=3, seed=11))
    finally:
        pipe.close()
    ref = reference(folder, image, 3, 11)
    assert ours.array is not None and ours.array.shape == ref.shape == (1, 128, 128, 3)
    assert ours.notes == [] and ours.settings["strength"] is None
    diff = max_diff(ours.array, ref)
    print(f"ldm-super-res {backend}: images max |diff| {diff:.2e}")
    assert diff <= IMAGE_TOL[backend]
    assert max_diff(reference(folder, low_res(1), 3, 11), ref) > 10 * IMAGE_TOL[backend]  # the image matters


def test_from_the_cli(engines: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    low = tmp_path / "low.png"
    low_res(2, (32, 64)).save(low)
    out = tmp_path / "up.png"
    assert main(["generate", str(engines), "--image", str(low), "-o", str(out), *FAST]) == 0
    assert f"wrote {out} (256x128, seed 3)" in capsys.readouterr().out  # WxH: 4x the 32x64 (HxW) image
    pipe = load_pipeline(engines)
    try:
        api = pipe.generate(GenerationRequest(image=str(low), steps=2, seed=3)).images[0]
    finally:
        pipe.close()
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api))


def test_the_image_is_required_and_is_not_an_init_image(engines: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    pipe = load_pipeline(engines)
    try:
        with pytest.raises(InvalidRequest, match="takes an image as its 'low_res_image'"):
            pipe.generate(GenerationRequest(steps=1, seed=0))
        with pytest.raises(InvalidRequest, match="strength applies to img2img"):
            pipe.generate(GenerationRequest(image=low_res(), strength=0.5, steps=1, seed=0))
        odd = pipe.generate(GenerationRequest(image=low_res(0, (40, 40)), steps=1, seed=0))
        assert odd.array is not None and odd.array.shape == (1, 128, 128, 3)  # 160 px is no multiple of 64
        assert any("resized the 40x40 image to 32x32" in n for n in odd.notes)
    finally:
        pipe.close()
    assert main(["generate", str(engines), "-o", str(tmp_path / "x.png"), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentrt generate: error: ") and "give --image" in err
