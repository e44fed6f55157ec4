"""Flat-IO modules per component: positional tensors in `ComponentIO.inputs` order, a tuple in `outputs` order.

Each wrapper computes exactly what the diffusers pipelines take from the part:
text encoders give `last_hidden_state` (SD 1.x / 2.x) or `hidden_states[-2]` without the final
layer norm (SDXL), plus `text_embeds` for the pooled encoder; the UNet gives the noise / v
prediction; the VAE decoder decodes unscaled latents (the runtime divides by the scaling factor);
the VAE encoder returns the Gaussian's raw parameters (mean and logvar on channels, diffusers'
`latent_dist.parameters`, logvar not yet clamped), so sampling stays outside the graph. A VQ
autoencoder's decoder quantizes inside the graph, its encoder returns the latents before quantization.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from latentrt.errors import StaleArtifact
from latentrt.families import UNET_2D, AutoencoderKind, DenoiserSpec, HiddenState, TextEncoderSpec
from latentrt.names import ENCODER_HIDDEN_STATES_KEYWORD, SAMPLE, TIMESTEP

from .unclip import wrap_image

if TYPE_CHECKING:
    from .models import LoadedModel


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


def unet_keywords(denoiser: DenoiserSpec, input_names: Sequence[str]) -> tuple[str, ...]:
    """The diffusers keyword of each UNet input after sample and timestep, from the denoiser's declarations."""
    if tuple(input_names[:2]) != (SAMPLE, TIMESTEP):
        raise StaleArtifact(f"UNet inputs start with {', '.join(input_names[:2]) or 'nothing'}, not {SAMPLE}, "
                            f"{TIMESTEP}; re-run the export")
    keywords = []
    for name in input_names[2:]:
        c = denoiser.conditioning_input(name)
        if c is None:
            declared = ", ".join(x.name for x in denoiser.conditioning) or "none"
            raise StaleArtifact(f"UNet input {name!r} is not a conditioning input the family declares ({declared}); "
                                "re-run the export")
        keywords.append(c.keyword)
    return tuple(keywords)


def unet_kwargs(keywords: Sequence[str], tensors: Sequence[torch.Tensor]) -> dict[str, Any]:
    """diffusers `UNet2DConditionModel.forward` keyword arguments: "a.b" keywords nest into dict `a` (added_cond_kwargs)."""
    kwargs: dict[str, Any] = {ENCODER_HIDDEN_STATES_KEYWORD: None}  # no cross-attention context unless declared
    for keyword, x in zip(keywords, tensors, strict=True):
        head, _, key = keyword.partition(".")
        if key:
            kwargs.setdefault(head, {})[key] = x
        else:
            kwargs[keyword] = x
    return kwargs


class UNetWrapper(nn.Module):
    """sample, timestep, *conditioning -> out_sample.

    Every input after sample and timestep goes to diffusers' `UNet2DConditionModel.forward` by the
    keyword its `ConditioningInput` declares (never by position): `encoder_hidden_states`,
    `text_embeds` / `time_ids` inside `added_cond_kwargs` (SDXL), `timestep_cond` (LCM), `class_labels`.
    """

    def __init__(self, unet: nn.Module, denoiser: DenoiserSpec, input_names: Sequence[str]):
        super().__init__()
        self.unet: Any = unet  # diffusers UNet2DConditionModel
        self.keywords = unet_keywords(denoiser, input_names)
        self.no_context = denoiser.model == UNET_2D  # issue 12, H1: UNet2DModel takes no encoder_hidden_states

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *conditioning: torch.Tensor) -> tuple[torch.Tensor]:
        kwargs = unet_kwargs(self.keywords, conditioning)
        if self.no_context:
            kwargs.pop(ENCODER_HIDDEN_STATES_KEYWORD, None)
        return (self.unet(sample, timestep, return_dict=False, **kwargs)[0],)


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


class VqDecoderWrapper(nn.Module):
    """latent (already divided by the scaling factor) -> images in [-1, 1]; quantizes to the codebook in the graph.

    diffusers' `VQModel.decode` (as LDMPipeline calls it): nearest codebook entry, post-quant conv, decoder.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae: Any = vae  # diffusers VQModel

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.decode(latent, force_not_quantize=False, return_dict=False)[0],)


class VqEncoderWrapper(nn.Module):
    """images in [-1, 1] -> latent (diffusers' `VQModel.encode`: before quantization, which the decoder does)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae: Any = vae  # diffusers VQModel

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.encode(images, return_dict=False)[0],)


VAE_WRAPPERS: dict[AutoencoderKind, dict[str, type[nn.Module]]] = {
    AutoencoderKind.KL: {"vae_encoder": VaeEncoderWrapper, "vae_decoder": VaeDecoderWrapper},
    AutoencoderKind.VQ: {"vae_encoder": VqEncoderWrapper, "vae_decoder": VqDecoderWrapper},
}


def wrap(component: str, loaded: LoadedModel) -> nn.Module:
    """The flat-IO module of a component ('text_encoder', 'text_encoder_2', 'unet', 'vae_encoder', 'vae_decoder')."""
    spec = loaded.spec
    for te in spec.text_encoders:
        if te.component == component:
            return TextEncoderWrapper(loaded.modules[component], te).eval()
    if component == "unet":
        return UNetWrapper(loaded.modules["unet"], spec.denoiser, loaded.ios()["unet"].input_names).eval()
    vae = VAE_WRAPPERS[spec.autoencoder.kind].get(component)
    if vae is not None:
        return vae(loaded.modules["vae"]).eval()
    image = wrap_image(component, spec, loaded.modules, loaded.parts)  # issue 12 (H4): Stable unCLIP's image side
    if image is not None:
        return image
    raise KeyError(f"{spec.name} has no component {component!r}; it has {', '.join(spec.components)}")
