"""Flat-IO modules per component: positional tensors in `ComponentIO.inputs` order, a tuple in `outputs` order.

Each wrapper computes exactly what the diffusers pipelines take from the part:
text encoders give `last_hidden_state` (SD 1.x / 2.x) or `hidden_states[-2]` without the final
layer norm (SDXL), plus `text_embeds` for the pooled encoder; the UNet gives the noise / v
prediction; the VAE decoder decodes unscaled latents (the runtime divides by the scaling factor);
the VAE encoder returns the Gaussian's raw parameters (mean and logvar on channels, diffusers'
`latent_dist.parameters`, logvar not yet clamped), so sampling stays outside the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from latentrt.families import HiddenState, TextEncoderSpec
from latentrt.tensors import TEXT_EMBEDS, TIME_IDS, TIMESTEP_COND

if TYPE_CHECKING:
    from .models import LoadedModel

ADDED_COND = (TEXT_EMBEDS, TIME_IDS)  # UNet inputs diffusers takes in `added_cond_kwargs` (SDXL)


class TextEncoderWrapper(nn.Module):
    """input_ids -> hidden_states (+ text_embeds for the pooled encoder)."""

    def __init__(self, encoder: nn.Module, spec: TextEncoderSpec):
        super().__init__()
        self.encoder: Any = encoder  # transformers CLIPTextModel(WithProjection)
        self.penultimate = spec.hidden_state is HiddenState.PENULTIMATE
        self.pooled = spec.pooled

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(input_ids, output_hidden_states=self.penultimate, return_dict=True)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        return (hidden, out.text_embeds) if self.pooled else (hidden,)


class UNetWrapper(nn.Module):
    """sample, timestep, encoder_hidden_states [, text_embeds, time_ids] [, timestep_cond] -> out_sample.

    Inputs after the first three are passed to diffusers' `UNet2DConditionModel.forward` by name:
    `text_embeds` / `time_ids` inside `added_cond_kwargs` (SDXL), `timestep_cond` as itself (LCM).
    """

    def __init__(self, unet: nn.Module, input_names: Sequence[str]):
        super().__init__()
        self.unet: Any = unet  # diffusers UNet2DConditionModel
        self.extra = tuple(input_names[3:])
        unknown = set(self.extra) - set(ADDED_COND) - {TIMESTEP_COND}
        assert not unknown, f"UNet inputs with no diffusers keyword: {unknown}"

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *extra: torch.Tensor) -> tuple[torch.Tensor]:
        named = dict(zip(self.extra, extra))
        kwargs: dict[str, Any] = {"timestep_cond": named[TIMESTEP_COND]} if TIMESTEP_COND in named else {}
        added = {k: v for k, v in named.items() if k in ADDED_COND}
        if added:
            kwargs["added_cond_kwargs"] = added
        return (self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0],)


class VaeDecoderWrapper(nn.Module):
    """latent (already divided by the scaling factor) -> images in [-1, 1] (not clamped)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae: Any = vae  # diffusers AutoencoderKL

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.decode(latent, return_dict=False)[0],)


class VaeEncoderWrapper(nn.Module):
    """images in [-1, 1] -> latent_parameters (mean, logvar concatenated on channels)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae: Any = vae  # diffusers AutoencoderKL

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.encode(images, return_dict=True).latent_dist.parameters,)


def wrap(component: str, loaded: LoadedModel) -> nn.Module:
    """The flat-IO module of a component ('text_encoder', 'text_encoder_2', 'unet', 'vae_encoder', 'vae_decoder')."""
    for te in loaded.spec.text_encoders:
        if te.component == component:
            return TextEncoderWrapper(loaded.modules[component], te).eval()
    if component == "unet":
        return UNetWrapper(loaded.modules["unet"], loaded.ios()["unet"].input_names).eval()
    if component == "vae_decoder":
        return VaeDecoderWrapper(loaded.modules["vae"]).eval()
    if component == "vae_encoder":
        return VaeEncoderWrapper(loaded.modules["vae"]).eval()
    raise KeyError(f"{loaded.spec.name} has no component {component!r}; it has {', '.join(loaded.spec.components)}")
