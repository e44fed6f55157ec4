"""Stable unCLIP (issue 12): the image embedding a request's image gives the UNet, as StableUnCLIPImg2ImgPipeline.

diffusers' `_encode_image` runs the CLIP image processor on the PIL image, the image encoder, then
`noise_image_embeddings`: it draws noise of the embedding's shape from the seeded generator (before
the initial latents), noises the normalized embedding to `noise_level` and appends the level's
timestep embedding; the result is repeated for every image of the batch and, with classifier-free
guidance, zeros are the unconditional rows. The two exported components `image_encoder` and
`image_noising` (`latentrt.reference.unclip`) do the tensor work; this module draws the noise, feeds
them and registers the provider of the UNet input (`image_embedding`), which reads the request's
`conditioning["noise_level"]` (default 0, as diffusers).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from latentrt.errors import InvalidRequest, MissingComponent, StaleArtifact
from latentrt.families import FamilySpec
from latentrt.names import IMAGE_EMBEDS, NOISE, NOISE_LEVEL, NOISED_IMAGE_EMBEDS, PIXEL_VALUES

from .providers import FeedContext, register_provider
from .samplers import SeededNoise
from .timing import StageTimer

if TYPE_CHECKING:
    from .engine_set import EngineSet
    from .request import ResolvedRequest

log = logging.getLogger(__name__)

DEFAULT_NOISE_LEVEL = 0  # StableUnCLIPImg2ImgPipeline's default
DEFAULT_NOISE_LEVELS = 1000  # the image noising schedule's num_train_timesteps, where the export records none


def load_image_processor(path: Path, spec: FamilySpec) -> Any | None:
    """The family's CLIP image processor, read from `path/<processor>` (None for a family without an image encoder)."""
    if spec.image_encoder is None:
        return None
    import transformers

    folder = path / spec.image_encoder.processor
    if not folder.is_dir():
        raise MissingComponent(f"{folder} is missing (the image processor); re-run the export/build")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the PIL fallback's notice (no torchvision) is not the user's concern
    try:
        return transformers.CLIPImageProcessor.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # malformed preprocessor_config.json
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
        raise StaleArtifact(f"{folder} is not a readable CLIP image processor ({type(e).__name__}: {detail}); re-run "
                            "the export/build") from None
    finally:
        transformers.logging.set_verbosity(verbosity)


def noise_level(request: ResolvedRequest, levels: int) -> int:
    """The request's noise level (conditioning['noise_level'], default 0): one whole number in [0, levels)."""
    value = request.conditioning.get(NOISE_LEVEL, DEFAULT_NOISE_LEVEL)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if any(v != values[0] for v in values):
        raise InvalidRequest(f"conditioning['{NOISE_LEVEL}'] holds different values {values}; the image is noised "
                             "once for every image: give one value")
    level = values[0]
    whole = isinstance(level, (int, np.integer)) or (isinstance(level, float) and level.is_integer())
    if isinstance(level, bool) or not whole or not 0 <= level < levels:
        raise InvalidRequest(f"conditioning['{NOISE_LEVEL}'] must be a whole number in [0, {levels - 1}] (0: the "
                             f"image embedding as it is), got {level!r}")
    return int(level)


def _levels(info: Any) -> int:
    levels = info.get("image_noise_levels") if hasattr(info, "get") else None
    return levels if isinstance(levels, int) and levels > 0 else DEFAULT_NOISE_LEVELS


def image_condition(engines: EngineSet, s: ResolvedRequest, noise: SeededNoise,
                    timer: StageTimer | None = None) -> dict[str, torch.Tensor]:
    """{UNet input name: (1, 2D) noised image embedding ++ level embedding}; {} for a family without an image encoder.

    Draws the embedding's noise from `noise` first, as diffusers does before the initial latents.
    """
    image = engines.spec.image_encoder
    if image is None:
        return {}
    if s.image is None:
        raise InvalidRequest(f"{engines.spec.name} makes variations of an image: give an image (--image)")
    if engines.image_processor is None:
        raise MissingComponent(f"{engines.folder} has no image processor ({image.processor}); re-run the export/build")
    encoder, noising = engines[image.component], engines[image.noising]
    pixels = engines.image_processor(images=s.image, return_tensors="pt").pixel_values
    embeds = encoder.run({PIXEL_VALUES: pixels.to(encoder.device, torch.float32)}, timer)[IMAGE_EMBEDS]
    level = noise_level(s, engines.dims.image_noise_levels if engines.dims else DEFAULT_NOISE_LEVELS)
    drawn = noise(tuple(embeds.shape))
    feed = {IMAGE_EMBEDS: embeds.to(noising.device), NOISE: drawn.to(noising.device),
            NOISE_LEVEL: torch.full((embeds.shape[0],), level, dtype=torch.int64, device=noising.device)}
    return {NOISED_IMAGE_EMBEDS: noising.run(feed, timer)[NOISED_IMAGE_EMBEDS].to(noise.device)}


# ---------------------------------------------------------------------------- provider


def check_image_embedding(inp: Any, ctx: FeedContext) -> None:
    """The request gives an image to vary; its noise level, if given, is one whole number in range."""
    if ctx.request.image is None:
        raise InvalidRequest(f"this model makes variations of an image: give an image (--image); the UNet input "
                             f"'{inp.name}' is its CLIP embedding")
    noise_level(ctx.request, _levels(ctx.info))


def image_embedding(inp: Any, ctx: FeedContext) -> torch.Tensor:
    """(rows, 2D): the image's noised embedding for every image; zeros first for the unconditional CFG half."""
    if inp.name not in ctx.images:
        raise InvalidRequest(f"the UNet input '{inp.name}' needs an image (--image)")
    positive = ctx.images[inp.name].to(ctx.device).expand(ctx.batch, -1)
    return ctx.rows(positive, torch.zeros_like(positive))


register_provider("image_embedding", image_embedding, check=check_image_embedding, request_keys=(NOISE_LEVEL,))
