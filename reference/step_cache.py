"""DeepCache (Ma, Fang & Wang 2023, arXiv:2312.00858) over diffusers' `UNet2DConditionModel`: a full and a shallow pass.

`CachedFullWrapper` runs the whole UNet and also returns the feature entering its last `depth` up blocks
(the output of `up_blocks[:-depth]`); `ShallowWrapper` recomputes only the time embedding, `conv_in`,
`down_blocks[:depth]` (for the skip connections of the last up blocks) and `up_blocks[-depth:]` on that
cached feature, then `conv_out`. Both follow `UNet2DConditionModel.forward` step for step for the
inputs LatentRT feeds (no attention masks, adapters, ControlNet residuals or GLIGEN); the full pass's
noise prediction is the plain UNet's. Flat IO as `latentrt.reference.wrappers`: positional tensors in
the IO spec's order, a tuple in its output order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from latentrt.errors import InvalidRequest
from latentrt.step_cache import StepCacheSpec

from .wrappers import unet_keywords, unet_kwargs

Residuals = tuple[torch.Tensor, ...]
UNSUPPORTED_ADDITIONS = ("image_hint",)  # addition embeddings that change the UNet input (ControlNet-XS style)


def step_cache_spec(unet: Any, depth: int = 1) -> StepCacheSpec:
    """The split of this UNet at `depth` (feature channels = block_out_channels[depth]); InvalidRequest if it has none.

    Any depth below the number of up blocks runs here; exports take the depths `latentrt.step_cache.check_depth` allows.
    """
    config = unet.config
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth < len(unet.up_blocks):
        raise InvalidRequest(f"step-cache depth must be a whole number in [1, {len(unet.up_blocks) - 1}] for this UNet "
                             f"({len(unet.up_blocks)} up blocks), got {depth!r}")
    if config.addition_embed_type in UNSUPPORTED_ADDITIONS:
        raise InvalidRequest(f"step caching does not support UNets with addition_embed_type "
                             f"{config.addition_embed_type!r}")
    return StepCacheSpec(depth, int(config.block_out_channels[depth]))


def _embed(unet: Any, sample: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any]
           ) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(sample after center_input_sample, time embedding emb, processed encoder_hidden_states), as forward does."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), kwargs.get("timestep_cond"))
    class_emb = unet.get_class_embed(sample=sample, class_labels=kwargs.get("class_labels"))
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    context = kwargs.get("encoder_hidden_states")
    added = kwargs.get("added_cond_kwargs")
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added)
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    return sample, emb, unet.process_encoder_hidden_states(encoder_hidden_states=context, added_cond_kwargs=added)


def _cross(block: nn.Module) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


def _down(blocks: Sequence[nn.Module], h: torch.Tensor, emb: torch.Tensor, context: Any) -> tuple[torch.Tensor, Residuals]:
    """Run down blocks from conv_in's output; returns (h, every skip tensor from conv_in's output on)."""
    residuals: Residuals = (h,)
    for block in blocks:
        if _cross(block):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
        else:
            h, res = block(hidden_states=h, temb=emb)
        residuals += res
    return h, residuals


def _up(blocks: Sequence[Any], h: torch.Tensor, emb: torch.Tensor, context: Any, residuals: Residuals,
        is_last: bool, forward_upsample_size: bool) -> tuple[torch.Tensor, Residuals]:
    """Run up blocks, each taking its skips from the end of `residuals`; returns (h, the residuals left).

    `is_last`: the final block of `blocks` is the UNet's final up block (it has no upsampler).
    """
    for i, block in enumerate(blocks):
        n = len(block.resnets)
        res, residuals = residuals[-n:], residuals[:-n]
        final = is_last and i == len(blocks) - 1
        size = residuals[-1].shape[2:] if forward_upsample_size and not final else None
        if _cross(block):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=context,
                      upsample_size=size)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
    return h, residuals


def _out(unet: Any, h: torch.Tensor) -> torch.Tensor:
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


def _needs_upsample_size(unet: Any, sample: torch.Tensor) -> bool:
    factor = 2 ** unet.num_upsamplers
    return any(d % factor for d in sample.shape[-2:])


def full_pass(unet: Any, sample: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any],
              depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise prediction, feature entering up_blocks[-depth]) from one whole UNet pass."""
    upsize = _needs_upsample_size(unet, sample)
    x, emb, context = _embed(unet, sample, timestep, kwargs)
    h, residuals = _down(unet.down_blocks, unet.conv_in(x), emb, context)
    if unet.mid_block is not None:
        h = unet.mid_block(h, emb, encoder_hidden_states=context) if _cross(unet.mid_block) else unet.mid_block(h, emb)
    split = len(unet.up_blocks) - depth
    feature, residuals = _up(unet.up_blocks[:split], h, emb, context, residuals, False, upsize)
    h, _ = _up(unet.up_blocks[split:], feature, emb, context, residuals, True, upsize)
    return _out(unet, h), feature


def shallow_pass(unet: Any, sample: torch.Tensor, timestep: torch.Tensor, kwargs: dict[str, Any],
                 feature: torch.Tensor, depth: int) -> torch.Tensor:
    """The noise prediction from the cached `feature`: conv_in, down_blocks[:depth], up_blocks[-depth:], conv_out."""
    upsize = _needs_upsample_size(unet, sample)
    x, emb, context = _embed(unet, sample, timestep, kwargs)
    _, residuals = _down(unet.down_blocks[:depth], unet.conv_in(x), emb, context)
    split = len(unet.up_blocks) - depth
    needed = sum(len(block.resnets) for block in unet.up_blocks[split:])
    h, _ = _up(unet.up_blocks[split:], feature, emb, context, residuals[:needed], True, upsize)
    return _out(unet, h)


class CachedFullWrapper(nn.Module):
    """sample, timestep, *conditioning -> out_sample, deep_feature (the whole UNet; `full` in DeepCache)."""

    def __init__(self, unet: nn.Module, keywords: Sequence[str], depth: int = 1):
        super().__init__()
        self.unet: Any = unet  # diffusers UNet2DConditionModel
        self.keywords = tuple(keywords)
        self.depth = step_cache_spec(unet, depth).depth

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *conditioning: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return full_pass(self.unet, sample, timestep, unet_kwargs(self.keywords, conditioning), self.depth)


class ShallowWrapper(nn.Module):
    """sample, timestep, *conditioning, deep_feature -> out_sample (DeepCache's cheap pass on a cached feature)."""

    def __init__(self, unet: nn.Module, keywords: Sequence[str], depth: int = 1):
        super().__init__()
        self.unet: Any = unet  # diffusers UNet2DConditionModel
        self.keywords = tuple(keywords)
        self.depth = step_cache_spec(unet, depth).depth

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor]:
        *conditioning, feature = rest
        kwargs = unet_kwargs(self.keywords, conditioning)
        return (shallow_pass(self.unet, sample, timestep, kwargs, feature, self.depth),)


def step_cache_modules(unet: nn.Module, keywords: Sequence[str], depth: int = 1
                       ) -> tuple[CachedFullWrapper, ShallowWrapper]:
    """(full, shallow) flat-IO modules sharing one UNet's weights."""
    return CachedFullWrapper(unet, keywords, depth).eval(), ShallowWrapper(unet, keywords, depth).eval()


def unet_step_cache_keywords(loaded: Any) -> tuple[str, ...]:
    """The conditioning keywords of a `LoadedModel`'s UNet inputs (as `wrap("unet", loaded)` uses them)."""
    return unet_keywords(loaded.spec.denoiser, loaded.ios()["unet"].input_names)
