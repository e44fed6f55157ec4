"""A map concatenated to the latents (issue 12 item 5a, the LDM paper's semantic maps), generic in the runtime.

A family nothing in the package knows is defined here alone: a `ConcatInput` named `semantic_map` with
3 channels fed by the built-in `concat_map` provider (the request's (C, h, w) map, from an NPY / PNG file,
an array or an image, resized to latent resolution by nearest neighbour, values as given), no text
encoder, a KL f = 8 autoencoder, eps prediction, DDIM. It is registered with `register_family` and
nothing under latentrt/, reference/, export/, engines/ or runtime/ is edited for it: `make_tiny` gives the
UNet 4 + 3 input channels, detection matches them, the export (parity checked) and the ONNX Runtime build
follow from the IO, and the CLI takes `--condition semantic_map=FILE`.

Tolerances: sampled images against a plain diffusers loop over the same checkpoint (DDIMScheduler from its
scheduler config, `scale_model_input`, the map resized with `torch.nn.functional.interpolate(mode="nearest")`
and concatenated after the scaled latents, the diffusers UNet, `scheduler.step`, the diffusers VAE decode and
`VaeImageProcessor` postprocessing; latents from `randn_tensor` with a seeded CPU generator): max |diff| per
pixel of the [0, 1] images, ONNX Runtime 1e-3, torch backend 2e-5 (the bounds of tests/test_pipeline.py;
measured ~1e-6). The CLI image equals the API's exactly.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from latentrt.cli import main
from latentrt.errors import InvalidRequest
from latentrt.families import (
    FAMILIES,
    AutoencoderKind,
    AutoencoderSpec,
    ConcatInput,
    DenoiserSpec,
    FamilySpec,
    Prediction,
    SamplerId,
    SamplingDefaults,
    Spacing,
    register_family,
)
from latentrt.runtime.images import read_png_metadata
from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

IMAGE_TOL = {"onnxruntime": 1e-3, "torch": 2e-5}
CHANNELS = 3
SEMANTIC_MAP = ConcatInput("semantic_map", CHANNELS, "concat_map")  # the built-in generic map provider
SEMANTIC = FamilySpec(
    id="tiny-semantic-map", title="Semantic-map-conditioned latent diffusion (test family)", text_encoders=(),
    denoiser=DenoiserSpec(Prediction.EPS, (), (SEMANTIC_MAP,)), native_size=(64, 64), buckets=((64, 64),),
    sampling=SamplingDefaults(SamplerId.DDIM, 10, 1.0, Spacing.LEADING),
    autoencoder=AutoencoderSpec(AutoencoderKind.KL, factor=8, latent_channels=4), pipeline_class="DiffusionPipeline",
)


@pytest.fixture(scope="module")
def family() -> Iterator[FamilySpec]:
    spec = register_family(SEMANTIC)
    yield spec
    FAMILIES.pop(spec.id, None)


@pytest.fixture(scope="module")
def checkpoint(family: FamilySpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from latentrt.reference.tiny import make_tiny

    return make_tiny(family.name, tmp_path_factory.mktemp("semantic") / "ckpt")


@pytest.fixture(scope="module")
def engines(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from latentrt.engines.build import build_engines
    from latentrt.export.onnx import export_model
    from latentrt.manifest import ONNX_KIND, read_manifest

    out = tmp_path_factory.mktemp("semantic-engines")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_dir = export_model(checkpoint, out / "onnx")
    m = read_manifest(onnx_dir, ONNX_KIND)
    assert m["family"] == SEMANTIC.name and list(m["components"]) == ["unet", "vae_encoder", "vae_decoder"]
    assert all(len(c["parity"]["checks"]) >= 2 for c in m["components"].values())
    return build_engines(onnx_dir, out / "engines", backend="onnxruntime")


@pytest.fixture(scope="module")
def maps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A one-hot 3-class (3, 32, 32) map (NPY) and an RGB PNG map of the same size."""
    root = tmp_path_factory.mktemp("maps")
    yy, xx = np.mgrid[0:32, 0:32]
    labels = ((xx // 11) + (yy > 20)).clip(0, 2)
    one_hot = np.stack([(labels == k) for k in range(CHANNELS)]).astype(np.float32)
    np.save(root / "map.npy", one_hot)
    Image.fromarray((one_hot.transpose(1, 2, 0) * 255).astype(np.uint8)).save(root / "map.png")
    return {"root": root, "one_hot": one_hot}


def diffusers_images(checkpoint: Path, values: np.ndarray, steps: int, seed: int, size: int = 64) -> np.ndarray:
    """[0, 1] images (1, H, W, 3) from a plain diffusers DDIM loop with the map concatenated to the latents."""
    import diffusers
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils.torch_utils import randn_tensor

    config = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())
    scheduler: Any = diffusers.DDIMScheduler.from_config(config)
    unet: Any = diffusers.UNet2DConditionModel.from_pretrained(str(checkpoint / "unet")).eval()
    vae: Any = diffusers.AutoencoderKL.from_pretrained(str(checkpoint / "vae")).eval()
    scheduler.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(seed)
    latents = randn_tensor((1, 4, size // 8, size // 8), generator=g, dtype=torch.float32) * scheduler.init_noise_sigma
    piece = torch.nn.functional.interpolate(torch.from_numpy(values)[None], size=(size // 8, size // 8), mode="nearest")
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = torch.cat([scheduler.scale_model_input(latents, t), piece], dim=1)
            eps = unet(x, t, encoder_hidden_states=None).sample
            latents = scheduler.step(eps, t, latents, generator=g).prev_sample
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    return np.asarray(VaeImageProcessor(vae_scale_factor=8).postprocess(decoded, output_type="np"))


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_detected_with_the_map_channels(checkpoint: Path, family: FamilySpec) -> None:
    from latentrt.reference.models import detect_family, load_checkpoint

    assert detect_family(checkpoint) is family
    unet: Any = load_checkpoint(checkpoint).modules["unet"]
    assert unet.config.in_channels == 4 + CHANNELS


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_sampled_like_a_plain_diffusers_loop(checkpoint: Path, engines: Path, maps: dict[str, Any],
                                             backend: str) -> None:
    pipe = load_pipeline(engines if backend == "onnxruntime" else checkpoint, backend=backend)
    try:
        ours = pipe.generate(GenerationRequest(conditioning={"semantic_map": str(maps["root"] / "map.npy")},
                                               sampler="ddim", steps=3, seed=7, width=64, height=64))
    finally:
        pipe.close()
    ref = diffusers_images(checkpoint, maps["one_hot"], 3, 7)
    assert ours.array is not None and ours.array.shape == ref.shape == (1, 64, 64, 3)
    diff = max_diff(ours.array, ref)
    print(f"semantic map {backend}: max |diff| {diff:.2e}")
    assert diff <= IMAGE_TOL[backend]
    other = diffusers_images(checkpoint, maps["one_hot"][::-1].copy(), 3, 7)
    assert max_diff(other, ref) > 10 * IMAGE_TOL[backend]  # the map reaches the UNet


def test_cli_generates_from_a_png_map(engines: Path, maps: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    png = maps["root"] / "map.png"
    assert main(["generate", str(engines), "--condition", f"semantic_map={png}", "--steps", "3", "--seed", "7",
                 "--sampler", "ddim", "--no-progress", "-o", str(out)]) == 0
    assert json.loads(read_png_metadata(out)["latentrt"])["conditioning"] == {"semantic_map": str(png)}
    pipe = load_pipeline(engines)
    try:  # the PNG's 0/255 pixels read as 0/1: the NPY's one-hot map
        api = pipe.generate(GenerationRequest(conditioning={"semantic_map": maps["one_hot"]}, sampler="ddim",
                                              steps=3, seed=7))
        with pytest.raises(InvalidRequest, match=r"the map \(semantic_map\) has shape \(1, 8, 8\); give \(3, H, W\)"):
            pipe.check(GenerationRequest(conditioning={"semantic_map": np.ones((8, 8), np.float32)}, steps=1))
        with pytest.raises(InvalidRequest, match=r"give conditioning\['semantic_map'\]"):
            pipe.check(GenerationRequest(steps=1))
    finally:
        pipe.close()
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api.images[0]))
