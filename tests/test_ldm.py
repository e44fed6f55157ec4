"""Original latent diffusion (CompVis LDM): unconditional and class-conditional UNet2DModel denoisers on VQ-f4.

Issue 12, item 1. Each family is a spec entry (`ldm`, `ldm-class-cond`); its tiny checkpoint (a diffusers
`UNet2DModel`, a `VQModel` with a factor of 4, a DDIMScheduler) is detected from its folder, exported with
the parity check on, built for ONNX Runtime, and sampled from the Python API and `latentrt generate`.

References we did not write:
- unconditional: diffusers `LDMPipeline` loaded from the same tiny folder (its `vqvae`, `unet`, DDIM
  scheduler; latents from `randn_tensor` with a CPU generator, times `init_noise_sigma`; eta 0; decode
  of latents / `scaling_factor`; (image / 2 + 0.5).clamp(0, 1)).
- class-conditional: no diffusers pipeline, so a plain diffusers loop over the same folder: the DDIMScheduler
  built from its scheduler_config.json, the `UNet2DModel` with `class_labels` (with guidance > 1 the batch is
  [null class, class], guided as uncond + w * (cond - uncond), Ho & Salimans 2022), `scheduler.step`, the
  VQModel decode (quantizing to the codebook).
- img2img (`ldm`, torch backend): diffusers has no LDM img2img pipeline, so StableDiffusionImg2ImgPipeline's
  recipe over the same parts: the VQ encoder's latents (no posterior: nothing is drawn for them), noised by
  `scheduler.add_noise` to the first DDIM timestep that strength keeps, then the plain loop.

Tolerances: [0, 1] images max |diff| per pixel: ONNX Runtime engines 1e-3, torch backend 2e-5, the bounds
tests/test_pipeline.py uses for every built-in family (measured: unconditional ORT 3.9e-6, torch 3.6e-6;
class-conditional 1.5e-6; img2img 1.3e-6).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from latentrt.cli import main
from latentrt.errors import CheckpointError
from latentrt.families import UNET_2D, AutoencoderKind, get_family
from latentrt.manifest import ONNX_KIND, read_manifest
from latentrt.reference.models import check_folder, detect_family, folder_facts, model_index
from latentrt.reference.structure import mismatches
from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

IMAGE_TOL = {"onnxruntime": 1e-3, "torch": 2e-5}
NULL_CLASS = 9  # the tiny class-conditional UNet has 10 classes; cin256 keeps its last (1000) for "no class"
FAST = ["--steps", "2", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def engines(tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both families exported (parity checked in ONNX Runtime) and built for ONNX Runtime."""
    from latentrt.engines.build import build_engines
    from latentrt.export.onnx import export_model

    out: dict[str, Path] = {}
    for family in ("ldm", "ldm-class-cond"):
        root = tmp_path_factory.mktemp(family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_dir = export_model(tiny_checkpoint(family), root / "onnx")
        m = read_manifest(onnx_dir, ONNX_KIND)
        assert m["family"] == family and list(m["components"]) == ["unet", "vae_encoder", "vae_decoder"]
        assert all(c["parity"]["checks"] for c in m["components"].values())
        out[family] = build_engines(onnx_dir, root / "engines", backend="onnxruntime")
    return out


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ---------------------------------------------------------------------------- structure


@pytest.mark.parametrize("family", ["ldm", "ldm-class-cond", "ldm-super-res"])
def test_tiny_checkpoint_is_detected(tiny_checkpoint: Any, family: str) -> None:
    folder = tiny_checkpoint(family)
    spec = get_family(family)
    assert spec.denoiser.model == UNET_2D and spec.autoencoder.kind is AutoencoderKind.VQ and not spec.text_encoders
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["_class_name"] == spec.pipeline_class
    assert detect_family(folder).name == family


def test_a_unet2dmodel_is_not_an_sd_unet(tiny_checkpoint: Any) -> None:
    folder = tiny_checkpoint("ldm")
    assert "unet is a UNet2DModel, not a UNet2DConditionModel" in \
        mismatches(get_family("sd1"), folder_facts(folder, model_index(folder)))
    with pytest.raises(CheckpointError, match="unet is a UNet2DConditionModel, not a UNet2DModel"):
        check_folder(tiny_checkpoint("sd1"), "ldm")


# ---------------------------------------------------------------------------- unconditional: LDMPipeline


def ldm_pipeline_images(folder: Path, batch: int, steps: int, seed: int) -> np.ndarray:
    import diffusers

    ref: Any = diffusers.LDMPipeline.from_pretrained(str(folder))
    ref.set_progress_bar_config(disable=True)
    return ref(batch_size=batch, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=steps,
               eta=0.0, output_type="np").images


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_unconditional_matches_ldm_pipeline(tiny_checkpoint: Any, engines: dict[str, Path], backend: str) -> None:
    folder = tiny_checkpoint("ldm")
    pipe = load_pipeline(engines["ldm"] if backend == "onnxruntime" else folder, backend=backend)
    try:
        ours = pipe.generate(GenerationRequest(num_images_per_prompt=2, steps=3, seed=11))
    finally:
        pipe.close()
    ref = ldm_pipeline_images(folder, 2, 3, 11)
    assert ours.array is not None and ours.array.shape == ref.shape == (2, 64, 64, 3)
    assert ours.settings["sampler"] == "ddim" and ours.settings["mode"] == "txt2img"
    diff = max_diff(ours.array, ref)
    print(f"ldm {backend}: images max |diff| {diff:.2e}")
    assert diff <= IMAGE_TOL[backend]
    assert max_diff(ldm_pipeline_images(folder, 2, 3, 12), ref) > 10 * IMAGE_TOL[backend]  # the seed matters


def test_unconditional_from_the_cli(engines: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ldm.png"
    assert main(["generate", str(engines["ldm"]), "-o", str(out), *FAST]) == 0
    assert f"wrote {out} (64x64, seed 3)" in capsys.readouterr().out
    pipe = load_pipeline(engines["ldm"])
    try:
        api = pipe.generate(GenerationRequest(steps=2, seed=3)).images[0]
    finally:
        pipe.close()
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api))


# ---------------------------------------------------------------------------- class-conditional: a plain DDIM loop


def ddim_loop_images(folder: Path, labels: list[int], steps: int, seed: int, guidance: float = 1.0) -> np.ndarray:
    """[0, 1] images from a plain diffusers DDIM loop over the folder's UNet2DModel and VQModel (module doc)."""
    import diffusers
    from diffusers.utils.torch_utils import randn_tensor

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler: Any = diffusers.DDIMScheduler.from_config(config)
    unet: Any = diffusers.UNet2DModel.from_pretrained(str(folder / "unet")).eval()
    vq: Any = diffusers.VQModel.from_pretrained(str(folder / "vae")).eval()
    scheduler.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(seed)
    size = unet.config.sample_size
    latents = randn_tensor((len(labels), unet.config.in_channels, size, size), generator=g) * scheduler.init_noise_sigma
    cond = torch.tensor(labels)
    cfg = guidance > 1
    class_labels = torch.cat([torch.full_like(cond, NULL_CLASS), cond]) if cfg else cond
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
            eps = unet(x, t, class_labels=class_labels).sample
            if cfg:
                uncond, c = eps.chunk(2)
                eps = uncond + guidance * (c - uncond)
            latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
        image = vq.decode(latents / vq.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


CASES = [("ddim", [3, 7], 1.0), ("ddim-cfg", [5], 3.0)]  # (id, labels, guidance over the null class)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize(("case", "labels", "guidance"), CASES, ids=[c[0] for c in CASES])
def test_class_conditional_matches_a_plain_ddim_loop(tiny_checkpoint: Any, engines: dict[str, Path], backend: str,
                                                     case: str, labels: list[int], guidance: float) -> None:
    folder = tiny_checkpoint("ldm-class-cond")
    conditioning: dict[str, Any] = {"class_labels": labels, "negative_class_labels": NULL_CLASS}
    pipe = load_pipeline(engines["ldm-class-cond"] if backend == "onnxruntime" else folder, backend=backend)
    try:
        ours = pipe.generate(GenerationRequest(conditioning=conditioning, steps=3, guidance=guidance, seed=11))
    finally:
        pipe.close()
    ref = ddim_loop_images(folder, labels, 3, 11, guidance)
    assert ours.array is not None and ours.array.shape == ref.shape == (len(labels), 64, 64, 3)
    assert ours.settings["sampler"] == "ddim"
    diff = max_diff(ours.array, ref)
    print(f"ldm-class-cond {case} {backend}: images max |diff| {diff:.2e}")
    assert diff <= IMAGE_TOL[backend]
    other = ddim_loop_images(folder, [(x + 1) % NULL_CLASS for x in labels], 3, 11, guidance)
    assert max_diff(other, ref) > 10 * IMAGE_TOL[backend]  # the class decides the image


def test_class_conditional_from_the_cli(engines: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "class.png"
    argv = ["generate", str(engines["ldm-class-cond"]), "--condition", "class_labels=3", "--condition",
            f"negative_class_labels={NULL_CLASS}", "--guidance", "3", "-o", str(out), *FAST]
    assert main(argv) == 0
    assert f"wrote {out} (64x64, seed 3)" in capsys.readouterr().out
    pipe = load_pipeline(engines["ldm-class-cond"])
    try:
        api = pipe.generate(GenerationRequest(conditioning={"class_labels": 3, "negative_class_labels": NULL_CLASS},
                                              guidance=3.0, steps=2, seed=3)).images[0]
    finally:
        pipe.close()
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api))
    # the family's default guidance (3) runs classifier-free guidance: without a null class it is refused
    assert main(["generate", str(engines["ldm-class-cond"]), "--condition", "class_labels=3", "-o",
                 str(tmp_path / "x.png"), *FAST]) == 2
    assert "negative_class_labels" in capsys.readouterr().err


# ---------------------------------------------------------------------------- img2img through the VQ encoder


def vq_img2img_loop(folder: Path, image: Image.Image, strength: float, steps: int, seed: int) -> np.ndarray:
    """StableDiffusionImg2ImgPipeline's recipe over the LDM parts (diffusers has no LDM img2img pipeline): the VQ
    encoder's latents (no posterior, so no draw), noised to the first kept DDIM timestep, then the plain loop."""
    import diffusers
    from diffusers.utils.torch_utils import randn_tensor

    from latentrt.runtime.images import image_to_tensor

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler: Any = diffusers.DDIMScheduler.from_config(config)
    unet: Any = diffusers.UNet2DModel.from_pretrained(str(folder / "unet")).eval()
    vq: Any = diffusers.VQModel.from_pretrained(str(folder / "vqvae")).eval()
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[steps - min(int(steps * strength), steps):]
    g = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        latents = vq.encode(image_to_tensor(image, 64, 64)).latents * vq.config.scaling_factor
        latents = scheduler.add_noise(latents, randn_tensor(latents.shape, generator=g), timesteps[:1])
        for t in timesteps:
            latents = scheduler.step(unet(latents, t).sample, t, latents, eta=0.0).prev_sample
        image_out = vq.decode(latents / vq.config.scaling_factor).sample
    return (image_out / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_img2img_starts_from_the_vq_encoders_latents(tiny_checkpoint: Any) -> None:
    folder = tiny_checkpoint("ldm")
    init = Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pipe = load_pipeline(folder, backend="torch")
    try:
        ours = pipe.generate(GenerationRequest(image=init, strength=0.5, steps=4, seed=11))
    finally:
        pipe.close()
    assert ours.settings["mode"] == "img2img" and ours.array is not None
    diff = max_diff(ours.array, vq_img2img_loop(folder, init, 0.5, 4, 11))
    print(f"ldm img2img torch: images max |diff| {diff:.2e}")
    assert diff <= IMAGE_TOL["torch"]
