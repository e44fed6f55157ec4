"""Stable unCLIP's image side (issue 12): the CLIP image tower and the noise augmentation of its embedding.

diffusers' `StableUnCLIPImg2ImgPipeline` encodes the image with `CLIPVisionModelWithProjection`
(`image_embeds`) and then, in `noise_image_embeddings`, normalizes the embedding with the
`StableUnCLIPImageNormalizer`'s mean and std, noises it to `noise_level` with the image noising
DDPM schedule (sqrt(alpha_bar) x + sqrt(1 - alpha_bar) noise), unnormalizes it and appends the
sinusoidal embedding of the noise level (flip_sin_to_cos, no frequency shift). Both halves are exported:
`ImageEncoderWrapper` and `ImageNoisingWrapper` (the noise itself is an input, drawn by the runtime from
the seeded generator in diffusers' order). The configs are read here: the processor's crop, the
projection width and the noise levels (`image_dims`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentrt.configs import config_int
from latentrt.errors import CheckpointError
from latentrt.families import FamilySpec, ImageEncoderSpec

IMAGE_ENCODER = ImageEncoderSpec()  # the folder names every image-encoder family uses (diffusers' pipeline keys)


def image_parts(spec: FamilySpec) -> tuple[str, ...]:
    """The checkpoint folders the family's image side reads (none without an image encoder)."""
    i = spec.image_encoder
    return () if i is None else (i.component, i.processor, i.normalizer, i.noising_scheduler)


def _json(folder: Path, part: str, name: str) -> dict[str, Any]:
    from .models import read_json

    return read_json(folder / part / name, part)


def crop_size(processor: dict[str, Any], where: str) -> int:
    """The square crop side of a CLIP image processor config ({"height", "width"} or a number)."""
    crop = processor.get("crop_size")
    side = crop if isinstance(crop, int) and not isinstance(crop, bool) else None
    if isinstance(crop, dict) and crop.get("height") == crop.get("width"):
        side = crop.get("height")
    if isinstance(side, bool) or not isinstance(side, int) or side < 1:
        raise CheckpointError(f"{where}: 'crop_size' must be a square size (a number or equal height and width), "
                              f"got {crop!r}")
    return side


def image_dims(spec: FamilySpec, folder: Path) -> dict[str, int]:
    """ModelDims' image fields (crop side, embedding width, noise levels); {} without an image encoder."""
    i = spec.image_encoder
    if i is None:
        return {}
    encoder = _json(folder, i.component, "config.json")
    processor = _json(folder, i.processor, "preprocessor_config.json")
    noising = _json(folder, i.noising_scheduler, "scheduler_config.json")
    where = str(folder / i.component / "config.json")
    nested = encoder.get("vision_config")
    vision: dict[str, Any] = nested if isinstance(nested, dict) else encoder
    side = crop_size(processor, str(folder / i.processor / "preprocessor_config.json"))
    tower = config_int(vision, "image_size", where, 224)
    if side != tower:
        raise CheckpointError(f"{folder}: the image processor crops {side} px but the image encoder takes {tower} px")
    return {"image_size": side, "image_embed_dim": config_int(encoder, "projection_dim", where, 512),
            "image_noise_levels": config_int(noising, "num_train_timesteps",
                                             str(folder / i.noising_scheduler / "scheduler_config.json"), 1000)}


def image_problems(spec: FamilySpec, unet: dict[str, Any], dims: dict[str, int]) -> list[str]:
    """How the UNet's class projection disagrees with the image side (it takes 2 x the embedding width)."""
    if spec.image_encoder is None:
        return []
    want, have = 2 * dims["image_embed_dim"], unet.get("projection_class_embeddings_input_dim")
    return [] if have == want else [f"unet projection_class_embeddings_input_dim {have!r} != 2 x image embedding "
                                    f"width {dims['image_embed_dim']} = {want}"]


def load_image_parts(spec: FamilySpec, folder: Path, index: dict[str, Any]) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """(modules: image encoder and normalizer, other parts: the noising scheduler) as model_index.json names them."""
    import diffusers
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )

    from .models import load_part

    i = spec.image_encoder
    if i is None:
        return {}, {}
    scheduler_class = getattr(diffusers, str(index[i.noising_scheduler][1]), None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
        raise CheckpointError(f"{folder}: '{i.noising_scheduler}' is {index[i.noising_scheduler]!r}, not a diffusers "
                              "scheduler")
    normalizer = StableUnCLIPImageNormalizer.from_pretrained(str(folder / i.normalizer), torch_dtype=torch.float32)
    modules = {i.component: load_part(folder, index, i.component), i.normalizer: normalizer.float().eval()}
    return modules, {i.noising_scheduler: scheduler_class.from_pretrained(str(folder / i.noising_scheduler))}


class ImageEncoderWrapper(nn.Module):
    """pixel_values (the processor's normalized crop) -> image_embeds (CLIPVisionModelWithProjection)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder: Any = encoder

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.encoder(pixel_values).image_embeds,)


class ImageNoisingWrapper(nn.Module):
    """image_embeds, noise, noise_level -> the noised embedding ++ the level's timestep embedding (Stable unCLIP).

    x = (e - mean) / std; x_t = sqrt(alpha_bar_t) x + sqrt(1 - alpha_bar_t) noise (DDPM, Ho et al. 2020, eq. 4);
    e_t = x_t std + mean; then [e_t, timestep_embedding(t)] with diffusers' `get_timestep_embedding`.
    """

    mean: torch.Tensor
    std: torch.Tensor
    sqrt_alpha_bar: torch.Tensor
    sqrt_one_minus_alpha_bar: torch.Tensor

    def __init__(self, normalizer: nn.Module, scheduler: Any):
        super().__init__()
        mean, std = (getattr(normalizer, k).detach().float().clone() for k in ("mean", "std"))
        alpha_bar = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("sqrt_alpha_bar", alpha_bar**0.5)
        self.register_buffer("sqrt_one_minus_alpha_bar", (1 - alpha_bar) ** 0.5)

    def forward(self, image_embeds: torch.Tensor, noise: torch.Tensor,
                noise_level: torch.Tensor) -> tuple[torch.Tensor]:
        from diffusers.models.embeddings import get_timestep_embedding

        x = (image_embeds - self.mean) * 1.0 / self.std
        x = self.sqrt_alpha_bar[noise_level][:, None] * x + self.sqrt_one_minus_alpha_bar[noise_level][:, None] * noise
        x = x * self.std + self.mean
        level = get_timestep_embedding(noise_level, x.shape[-1], flip_sin_to_cos=True, downscale_freq_shift=0)
        return (torch.cat([x, level.to(x.dtype)], dim=1),)


def wrap_image(component: str, spec: FamilySpec, modules: dict[str, nn.Module],
               parts: dict[str, Any]) -> nn.Module | None:
    """The flat-IO module of an image-side component; None when `component` is not one."""
    i = spec.image_encoder
    if i is None:
        return None
    if component == i.component:
        return ImageEncoderWrapper(modules[i.component]).eval()
    if component == i.noising:
        return ImageNoisingWrapper(modules[i.normalizer], parts[i.noising_scheduler]).eval()
    return None


# ---------------------------------------------------------------------------- tiny checkpoints

TINY_IMAGE_SIZE = 32  # the tiny processor's crop and vision tower's image_size (224 in the real model)
TINY_IMAGE_EMBED = 24  # the tiny projection width (1024 for ViT-H unCLIP)


def tiny_image_parts(spec: FamilySpec, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the image side's parts, the UNet config they need) of a tiny checkpoint; ({}, {}) without an image encoder.

    A small CLIPVisionModelWithProjection and its CLIPImageProcessor, a normalizer with random mean and std, and the
    real release's image noising schedule (DDPM, squaredcos_cap_v2, 1000 levels).
    """
    i = spec.image_encoder
    if i is None:
        return {}, {}
    from diffusers import DDPMScheduler
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=TINY_IMAGE_SIZE, patch_size=8, projection_dim=TINY_IMAGE_EMBED,
                              hidden_act="gelu")
    encoder = CLIPVisionModelWithProjection(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                   crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=TINY_IMAGE_EMBED)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        normalizer.mean.copy_(0.1 * torch.randn(normalizer.mean.shape, generator=g))
        normalizer.std.copy_(0.5 + torch.rand(normalizer.std.shape, generator=g))
    noising = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    parts = {i.component: encoder, i.processor: processor, i.normalizer: normalizer.eval(),
             i.noising_scheduler: noising}
    return parts, {"projection_class_embeddings_input_dim": 2 * TINY_IMAGE_EMBED}
