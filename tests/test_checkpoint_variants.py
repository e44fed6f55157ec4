"""Checkpoints LatentRT's team did not write: SDXL folders built from diffusers' own test configs.

The components follow `StableDiffusionXLPipelineFastTests.get_dummy_components` in diffusers'
tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py: a UNet with block_out_channels (2, 4),
one-group norms (norm_num_groups=1), attention_head_dim (2, 4), transformer_layers_per_block (1, 2),
linear projections, cross_attention_dim 64 (= 32 + 32), addition_time_embed_dim 8 and
projection_class_embeddings_input_dim 80 (= pooled 32 + 6 time ids x 8); a VAE with block_out_channels
(32, 64) (a VAE factor of 2); two 5-layer CLIP text towers of width 32 (intermediate 37, projection 32).
The real modules get random weights and are saved with diffusers' `save_pretrained`. Deviations, so
LatentRT's CLIP tokenizer (49408 ids) fits: vocab_size 49408 with CLIP's BOS/EOS ids, and the first
encoder uses CLIP-L's quick_gelu as the released SDXL does (the all-gelu test config is covered below:
detected as sdxl by its structure).

Tolerances (as tests/test_pipeline.py; the issue asks 2/255): our pipeline against diffusers'
StableDiffusionXLPipeline on the same folder, same seed and sampler, float32 CPU, max |diff|:
onnxruntime (the export) images 1e-3 per pixel, latents 1e-3 x max(1, max|ref|) (measured 8e-7 / 1.3e-5);
torch (the folder's own modules) images 2e-5, latents 1e-5 x max(1, max|ref|).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from latentrt.cli import main
from latentrt.errors import CheckpointError, UnknownFamily
from latentrt.families import SamplerId
from latentrt.reference.models import detect_family, locate_checkpoint, model_dims
from latentrt.reference.tokenizers import EOS, save_clip_tokenizer

BACKENDS = ("onnxruntime", "torch")
IMAGE_TOL = {"onnxruntime": 1e-3, "torch": 2e-5}  # as tests/test_pipeline.py
LATENT_TOL = {"onnxruntime": 1e-3, "torch": 1e-5}
CLIP_BOS_ID, CLIP_EOS_ID = 49406, 49407

UNET: dict[str, Any] = dict(  # diffusers' SDXL fast-test UNet
    block_out_channels=(2, 4), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
    cross_attention_dim=64, norm_num_groups=1)
VAE: dict[str, Any] = dict(
    block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, sample_size=128,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"])
TEXT: dict[str, Any] = dict(
    bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
    num_attention_heads=4, num_hidden_layers=5, pad_token_id=CLIP_EOS_ID, vocab_size=49408, hidden_act="gelu",
    projection_dim=32)


def save_sdxl(folder: Path, *, unet: Mapping[str, Any] = {}, text: Mapping[str, Any] = {},
              text_encoder_act: str = "quick_gelu", index: Mapping[str, Any] = {}) -> Path:
    """Save a StableDiffusionXLPipeline of diffusers' test components (with overrides) into `folder`."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet_model = UNet2DConditionModel(**{**UNET, **unet})
    scheduler: Any = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**TEXT, **text, "hidden_act": text_encoder_act}))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**TEXT, **text}))
    tokenizer = CLIPTokenizer.from_pretrained(str(save_clip_tokenizer(folder.parent / f".{folder.name}-tok", EOS)))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(save_clip_tokenizer(folder.parent / f".{folder.name}-tok2", "!")))
    pipe: Any = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet_model,
                                     scheduler=scheduler)
    pipe.save_pretrained(str(folder))
    if index:
        path = folder / "model_index.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **index}, indent=2))
    return folder


@pytest.fixture(scope="module")
def aesthetic_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SDXL base (both encoders, 6 time ids) whose model_index.json says requires_aesthetics_score=True."""
    return save_sdxl(tmp_path_factory.mktemp("variants") / "aesthetic-base",
                     index={"requires_aesthetics_score": True})


def with_unet(base: Path, folder: Path, **overrides: Any) -> Path:
    """A copy of `base` whose UNet is re-made (real module, random weights) with config overrides."""
    from diffusers import UNet2DConditionModel

    shutil.copytree(base, folder)
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel(**{**UNET, **overrides}).save_pretrained(str(folder / "unet"))
    return folder


# ---------------------------------------------------------------------------- (a) SDXL base with requires_aesthetics_score


def test_aesthetic_flag_base_is_detected_as_sdxl(aesthetic_base: Path) -> None:
    """The flag matters only to the img2img pipeline's time ids: the UNet's 80 = 32 + 6 x 8 makes it a base."""
    assert detect_family(aesthetic_base).name == "sdxl"
    dims = model_dims(detect_family(aesthetic_base), aesthetic_base)
    assert (dims.time_ids, dims.pooled_dim, dims.context_dim, dims.vae_scale_factor) == (6, 32, 64, 2)


@pytest.fixture(scope="module")
def aesthetic_export(aesthetic_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from latentrt.export.onnx import export_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_model(aesthetic_base, tmp_path_factory.mktemp("variants") / "aesthetic-onnx")


def diffusers_sdxl(folder: Path, output_type: str) -> Any:
    """diffusers' StableDiffusionXLPipeline on the folder, with the scheduler our 'euler' sampler reproduces."""
    import diffusers

    from latentrt.runtime.scheduler_config import SAMPLER_CLASSES

    pipe: Any = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    cls, overrides = SAMPLER_CLASSES[SamplerId.EULER]
    pipe.scheduler = getattr(diffusers, cls.name).from_config(pipe.scheduler.config, **overrides)
    return pipe(prompt=PROMPT, negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.0, height=64,
                width=64, generator=torch.Generator("cpu").manual_seed(0), output_type=output_type).images


PROMPT = "a painting of a squirrel eating a burger"


@pytest.mark.parametrize("backend", BACKENDS)
def test_aesthetic_flag_base_generates_as_diffusers_does(aesthetic_base: Path, aesthetic_export: Path,
                                                         backend: str) -> None:
    from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

    manifest = json.loads((aesthetic_export / "manifest.json").read_text())
    assert manifest["family"] == "sdxl" and manifest["model"]["requires_aesthetics_score"] is True
    folder = aesthetic_export if backend == "onnxruntime" else aesthetic_base
    ours = load_pipeline(str(folder), backend=backend).generate(GenerationRequest(
        PROMPT, negative_prompt="blurry", steps=3, guidance=5.0, sampler="euler", width=64, height=64, seed=0))
    ref, ref_latents = diffusers_sdxl(aesthetic_base, "np"), diffusers_sdxl(aesthetic_base, "latent")
    assert ours.array is not None and ours.array.shape == ref.shape == (1, 64, 64, 3)
    image_diff = float(np.abs(ours.array.astype(np.float64) - ref).max())
    latent_diff = float((ours.latents.double() - ref_latents.double()).abs().max())
    print(f"aesthetic-flag sdxl base, {backend}: images {image_diff:.2e}, latents {latent_diff:.2e}")
    assert image_diff <= IMAGE_TOL[backend]
    assert latent_diff <= LATENT_TOL[backend] * max(1.0, float(ref_latents.abs().max()))


# ---------------------------------------------------------------------------- (b) forced family, mismatched time ids


@pytest.fixture(scope="module")
def five_id_unet(aesthetic_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both encoders, but a UNet sized for the refiner's 5 time ids (32 + 5 x 8 = 72)."""
    return with_unet(aesthetic_base, tmp_path_factory.mktemp("variants") / "five-ids",
                     projection_class_embeddings_input_dim=72)


def test_forced_sdxl_names_the_time_id_width(five_id_unet: Path, tmp_path: Path) -> None:
    from latentrt.export.onnx import export_model

    want = "projection_class_embeddings_input_dim 72 != pooled 32 + 6 time ids x addition_time_embed_dim 8 = 80"
    with pytest.raises(CheckpointError, match=want.replace("+", r"\+")):
        export_model(five_id_unet, tmp_path / "out", family="sdxl")
    assert not (tmp_path / "out").exists()
    with pytest.raises(UnknownFamily, match="projection_class_embeddings_input_dim 72"):
        detect_family(five_id_unet)


def test_forced_sdxl_cli_prints_one_line(five_id_unet: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["export", str(five_id_unet), "-o", str(tmp_path / "out"), "--family", "sdxl"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "projection_class_embeddings_input_dim 72" in err and "= 80" in err


# ---------------------------------------------------------------------------- (c) other mismatches, named


@pytest.mark.parametrize(("overrides", "message"), [
    ({"cross_attention_dim": 48}, "unet cross_attention_dim 48 != text width 64"),
    ({"in_channels": 5}, "unet in_channels 5 != 4 (4 latent)"),
    ({"out_channels": 3}, "unet out_channels 3 != 4 latent channels"),
    ({"addition_time_embed_dim": 4}, "projection_class_embeddings_input_dim 80 != pooled 32 + 6 time ids x "
                                     "addition_time_embed_dim 4 = 56"),
], ids=["context-width", "in-channels", "out-channels", "time-embed-dim"])
def test_unet_mismatch_is_named(aesthetic_base: Path, tmp_path: Path, overrides: dict[str, Any],
                                message: str) -> None:
    folder = with_unet(aesthetic_base, tmp_path / "ckpt", **overrides)
    with pytest.raises(CheckpointError, match=message.replace("+", r"\+").replace("(", r"\(").replace(")", r"\)")):
        locate_checkpoint(folder, family="sdxl")
    with pytest.raises(UnknownFamily, match="nearest: sdxl"):
        detect_family(folder)


def test_pooled_width_mismatch_is_named(tmp_path: Path) -> None:
    """A second encoder projecting to 16 leaves the UNet's 80 = pooled + time ids unexplained."""
    folder = save_sdxl(tmp_path / "ckpt", text={"projection_dim": 16})
    with pytest.raises(CheckpointError, match="projection_class_embeddings_input_dim 80 != pooled 16"):
        locate_checkpoint(folder, family="sdxl")


def test_all_gelu_test_config_is_detected_by_structure(tmp_path: Path) -> None:
    """diffusers' test config gives both towers gelu: the structure (two encoders, pooled, 6 time ids) says sdxl."""
    folder = save_sdxl(tmp_path / "ckpt", text_encoder_act="gelu")
    assert detect_family(folder).name == "sdxl"
    assert locate_checkpoint(folder, family="sdxl").spec.name == "sdxl"


def test_missing_projection_dim_is_transformers_default(aesthetic_base: Path, tmp_path: Path) -> None:
    """A text config without `projection_dim` projects to transformers' default 512, not 0: the UNet's 80 is named."""
    folder = tmp_path / "ckpt"
    shutil.copytree(aesthetic_base, folder)
    path = folder / "text_encoder_2" / "config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "projection_dim"}))
    with pytest.raises(CheckpointError, match="projection_class_embeddings_input_dim 80 != pooled 512"):
        locate_checkpoint(folder, family="sdxl")
