"""The UNet's feed from the family's structure: one small provider per conditioning input kind.

A family's `DenoiserSpec` declares its conditioning inputs and channel-concatenated pieces, each
naming a provider key; this module maps each key to a `Provider` that builds the tensor for a
request. The pipeline walks the spec (`conditioning_feed`, `concat_channels`) and never asks which
family it runs. Providers return full UNet-batch rows: [uncond, cond] stacked (2B rows) when the
pipeline runs a classifier-free guidance batch, as the diffusers pipelines stack them.
A family defined elsewhere adds its own kind with `register_provider`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from latentrt.choices import Mode
from latentrt.errors import InvalidRequest, StaleArtifact, UnknownFamily
from latentrt.families import ConcatInput, ConditioningInput, FamilySpec
from latentrt.tensors import ComponentIO, TensorSpec

from .backends.base import TORCH_DTYPES
from .conditioning import TextConditioning, guidance_embedding, size_crop_aesthetic_ids, size_crop_target_ids
from .denoisers import needs_cfg
from .images import image_to_tensor

if TYPE_CHECKING:
    from .request import ResolvedRequest

Input = ConditioningInput | ConcatInput


@dataclass(frozen=True)
class FeedContext:
    """What a provider may read to build one UNet input for a request."""

    request: ResolvedRequest
    cfg: bool  # the UNet batch is [uncond, cond]: 2 * batch rows
    info: Mapping[str, Any] = field(default_factory=dict)  # model facts (ModelDims.extra: num_class_embeds, ...)
    text: TextConditioning | None = None  # None for families without text encoders (and in request checks)
    latent_shape: tuple[int, ...] = ()  # (B, C, h, w)
    device: torch.device = torch.device("cpu")
    tensor: TensorSpec | None = None  # the UNet input being built (conditioning inputs)
    images: Mapping[str, torch.Tensor] = field(default_factory=dict)  # encoded images, keyed by the piece they feed

    @property
    def batch(self) -> int:
        return self.request.batch

    def rows(self, positive: torch.Tensor, negative: torch.Tensor | None = None) -> torch.Tensor:
        """UNet-batch rows: [negative, positive] with CFG (negative defaults to positive), else positive."""
        if not self.cfg:
            return positive
        return torch.cat([positive if negative is None else negative, positive])


Build = Callable[[Any, FeedContext], torch.Tensor]  # (ConditioningInput | ConcatInput, context) -> rows
Check = Callable[[Any, FeedContext], None]  # InvalidRequest for a request the provider cannot serve
# issue 12 (H3): (input, context, the seeded noise) -> a tensor made before the initial latents are drawn (the x4
# upscaler's noised low-res image: its noise comes first in diffusers' order); the pipeline passes it on in
# FeedContext.images under the input's name
Prepare = Callable[[Any, FeedContext, Any], torch.Tensor]


@dataclass(frozen=True)
class Provider:
    """How the runtime builds one kind of UNet input."""

    build: Build
    check: Check | None = None  # runs while the request is resolved, before any work
    request_keys: tuple[str, ...] = ()  # GenerationRequest.conditioning keys it reads ("{name}" = the input's)
    embeds_guidance: bool = False  # the input carries the guidance scale itself: no CFG batch (LCM)
    prepare: Prepare | None = None  # issue 12 (H3): runs before the initial latents (see `Prepare`)


PROVIDERS: dict[str, Provider] = {}


def register_provider(key: str, build: Build, *, check: Check | None = None, request_keys: tuple[str, ...] = (),
                      embeds_guidance: bool = False, prepare: Prepare | None = None) -> Provider:
    """Add the provider for inputs whose spec names `key` (ConditioningInput / ConcatInput `provider`)."""
    provider = Provider(build, check, request_keys, embeds_guidance, prepare)
    if key in PROVIDERS and PROVIDERS[key] != provider:
        raise ValueError(f"a different provider {key!r} is already registered")
    PROVIDERS[key] = provider
    return provider


def provider_for(inp: Input, spec: FamilySpec) -> Provider:
    """The registered provider of an input; UnknownFamily when the family names one the runtime lacks."""
    if inp.provider not in PROVIDERS:
        raise UnknownFamily(f"family {spec.name} feeds its UNet input '{inp.name}' from provider {inp.provider!r}, "
                            "which this runtime does not have; register it with "
                            "latentrt.runtime.providers.register_provider")
    return PROVIDERS[inp.provider]


# ---------------------------------------------------------------------------- walking the spec


def present_conditioning(spec: FamilySpec, unet: ComponentIO) -> tuple[ConditioningInput, ...]:
    """The spec's conditioning inputs the exported UNet takes (optional ones only when it has them)."""
    names = set(unet.input_names)
    missing = [c.name for c in spec.denoiser.conditioning if not c.optional and c.name not in names]
    if missing:
        raise StaleArtifact(f"the UNet takes no {', '.join(missing)} input, which family {spec.name} needs; "
                            "re-run the export/build")
    return tuple(c for c in spec.denoiser.conditioning if c.name in names)


def runs_cfg(spec: FamilySpec, unet: ComponentIO, guidance: float) -> bool:
    """Whether a request runs a CFG batch: guidance > 1 and no input embeds the scale instead (LCM)."""
    embedded = any(provider_for(c, spec).embeds_guidance for c in present_conditioning(spec, unet))
    return needs_cfg(guidance) and not embedded


def check_conditioning(spec: FamilySpec, unet: ComponentIO, request: ResolvedRequest,
                       info: Mapping[str, Any]) -> None:
    """InvalidRequest for conditioning values no input takes, or that an input's provider refuses."""
    inputs: tuple[Input, ...] = (*present_conditioning(spec, unet), *spec.denoiser.concat)
    keys = {k.format(name=i.name) for i in inputs for k in provider_for(i, spec).request_keys}
    unknown = sorted(set(request.conditioning) - keys)
    if unknown:
        raise InvalidRequest(f"{spec.name} takes no conditioning value {unknown[0]!r}; it takes "
                             f"{', '.join(sorted(keys)) or 'none'}")
    ctx = FeedContext(request, runs_cfg(spec, unet, request.guidance), info)
    names = set(unet.input_names)
    for inp in inputs:
        check = provider_for(inp, spec).check
        if check is not None:
            check(inp, replace(ctx, tensor=unet.input(inp.name)) if inp.name in names else ctx)


def conditioning_feed(spec: FamilySpec, unet: ComponentIO, ctx: FeedContext) -> dict[str, torch.Tensor]:
    """Every conditioning input the UNet takes (besides sample and timestep), built by its provider."""
    return {c.name: provider_for(c, spec).build(c, replace(ctx, tensor=unet.input(c.name)))
            for c in present_conditioning(spec, unet)}


def concat_channels(spec: FamilySpec, ctx: FeedContext) -> torch.Tensor | None:
    """The pieces concatenated to the latents on the channel axis (rows, sum of channels, h, w); None without."""
    pieces = [provider_for(c, spec).build(c, ctx) for c in spec.denoiser.concat]
    return torch.cat(pieces, dim=1) if pieces else None


def prepare_concat(spec: FamilySpec, ctx: FeedContext, noise: Any) -> dict[str, torch.Tensor]:
    """Issue 12 (H3): the concatenated pieces whose providers prepare them before the initial latents, by name."""
    out: dict[str, torch.Tensor] = {}
    for c in spec.denoiser.concat:
        prepare = provider_for(c, spec).prepare
        if prepare is not None:
            out[c.name] = prepare(c, ctx, noise)
    return out


# ---------------------------------------------------------------------------- text


def _text(inp: Input, ctx: FeedContext) -> TextConditioning:
    if ctx.text is None:
        raise InvalidRequest(f"the UNet input '{inp.name}' is text conditioning, but no prompt was encoded")
    return ctx.text


def text_context(inp: Input, ctx: FeedContext) -> torch.Tensor:
    """encoder_hidden_states (rows, 77 * K, C): the prompts' context, negatives first with CFG."""
    return _text(inp, ctx).unet_batch(ctx.cfg)[0]


def text_pooled(inp: Input, ctx: FeedContext) -> torch.Tensor:
    """text_embeds (rows, P): the pooled projection of the pooled text encoder (SDXL's text_encoder_2)."""
    pooled = _text(inp, ctx).unet_batch(ctx.cfg)[1]
    if pooled is None:
        raise StaleArtifact(f"the UNet takes '{inp.name}' but no text encoder of this family gives a pooled output")
    return pooled


# ---------------------------------------------------------------------------- SDXL micro-conditioning


def time_ids_size_crop_target(inp: Input, ctx: FeedContext) -> torch.Tensor:
    """time_ids (rows, 6) of an SDXL base UNet, as the diffusers SDXL pipeline of the request's mode."""
    s = ctx.request
    pos, neg = size_crop_target_ids((s.height, s.width), s.sizes, img2img=s.mode is not Mode.TXT2IMG)
    return ctx.rows(pos.expand(ctx.batch, -1), neg.expand(ctx.batch, -1))


def time_ids_size_crop_aesthetic(inp: Input, ctx: FeedContext) -> torch.Tensor:
    """time_ids (rows, 5) of the SDXL refiner's UNet (sizes, crop, aesthetic score), as its diffusers pipeline."""
    s = ctx.request
    pos, neg = size_crop_aesthetic_ids((s.height, s.width), s.sizes)
    return ctx.rows(pos.expand(ctx.batch, -1), neg.expand(ctx.batch, -1))


# ---------------------------------------------------------------------------- guidance embedding (LCM)


def guidance_cond(inp: Input, ctx: FeedContext) -> torch.Tensor:
    """timestep_cond (rows, D): the guidance scale embedded (LCM, `guidance_embedding`); its width from the UNet."""
    width = ctx.tensor.shape[-1] if ctx.tensor is not None else None
    if not isinstance(width, int):
        raise StaleArtifact(f"the UNet input '{inp.name}' has no fixed width; re-run the export")
    return guidance_embedding(ctx.request.guidance, width, ctx.batch)


# ---------------------------------------------------------------------------- class labels


def _labels(value: Any, key: str, ctx: FeedContext) -> list[int]:
    """One class index per prompt slot from an int or a list of ints; InvalidRequest naming `key`."""
    slots = len(ctx.request.prompts)
    labels = list(value) if isinstance(value, (list, tuple)) else [value] * slots
    if len(labels) != slots:
        raise InvalidRequest(f"conditioning['{key}'] holds {len(labels)} values for {slots} prompts; give one, or "
                             "one per prompt")
    # the class count the exported UNet records (its input's `high`), else a model fact given with the context
    limit = ctx.tensor.high if ctx.tensor is not None and ctx.tensor.high else ctx.info.get("num_class_embeds")
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
            raise InvalidRequest(f"conditioning['{key}'] must hold class indices (whole numbers >= 0), got {label!r}")
        if isinstance(limit, int) and label >= limit:
            raise InvalidRequest(f"conditioning['{key}'] = {label} is beyond the model's {limit} classes "
                                 f"(0..{limit - 1})")
    return [int(label) for label in labels]


def check_class_label(inp: Input, ctx: FeedContext) -> None:
    """The request gives a class index per prompt and, with guidance > 1, the null class for the uncond half."""
    values = ctx.request.conditioning
    if inp.name not in values:
        raise InvalidRequest(f"this model is class-conditional: give conditioning={{'{inp.name}': N}} (a class index, "
                             "or a list of one per prompt)")
    _labels(values[inp.name], inp.name, ctx)
    negative = f"negative_{inp.name}"
    if ctx.cfg and negative not in values:
        raise InvalidRequest(f"guidance {ctx.request.guidance:g} > 1 runs classifier-free guidance, whose "
                             f"unconditional half needs a null class: give conditioning['{negative}'] (the index "
                             "the model was trained with for 'no class'), or guidance <= 1")
    if negative in values:
        _labels(values[negative], negative, ctx)


def class_label(inp: Input, ctx: FeedContext) -> torch.Tensor:
    """class_labels (rows,): each prompt slot's class, repeated per image; the null class first with CFG.

    Classifier-free guidance needs a null class (Ho & Salimans 2022 train with the label dropped to
    one); no family spec names one, so the request gives it as conditioning['negative_<name>'], and
    guidance > 1 without it is refused (`check_class_label`).
    """
    check_class_label(inp, ctx)
    values, per = ctx.request.conditioning, ctx.request.num_images_per_prompt
    dtype = TORCH_DTYPES[ctx.tensor.dtype if ctx.tensor is not None else str(getattr(inp, "dtype", "int64"))]

    def rows(key: str) -> torch.Tensor:
        labels = torch.tensor(_labels(values[key], key, ctx), dtype=dtype, device=ctx.device)
        return labels.repeat_interleave(per)

    return ctx.rows(rows(inp.name), rows(f"negative_{inp.name}") if ctx.cfg else None)


# ---------------------------------------------------------------------------- inpainting pieces


def _image(inp: Input, ctx: FeedContext) -> torch.Tensor:
    if inp.name not in ctx.images:
        raise InvalidRequest(f"the UNet input '{inp.name}' needs an init image and a mask")
    return ctx.images[inp.name]


def inpaint_mask(inp: Input, ctx: FeedContext) -> torch.Tensor:
    """The mask (rows, 1, h, w), 1 = repaint, from the pixel mask by nearest-neighbour resizing, as diffusers."""
    small = torch.nn.functional.interpolate(_image(inp, ctx), size=ctx.latent_shape[-2:])
    expanded = small.expand(ctx.latent_shape[0], -1, -1, -1)
    return ctx.rows(expanded)


def masked_image_latents(inp: Input, ctx: FeedContext) -> torch.Tensor:
    """The masked image's latents (rows, C, h, w), encoded once and repeated per image."""
    return ctx.rows(_image(inp, ctx).expand(ctx.latent_shape))


# ---------------------------------------------------------------------------- issue 12, H1: LDM super-resolution


def check_low_res_image(inp: Input, ctx: FeedContext) -> None:
    if ctx.request.image is None:
        raise InvalidRequest(f"the UNet input '{inp.name}' is the request's image: give one (--image)")


def low_res_image(inp: Input, ctx: FeedContext) -> torch.Tensor:
    """The request's image (rows, 3, h, w) in [-1, 1] at latent resolution, as LDMSuperResolutionPipeline's
    preprocess (Lanczos resize, /255, 2x - 1); concatenated to the latents unscaled (DDIM's c_in is 1)."""
    check_low_res_image(inp, ctx)
    assert ctx.request.image is not None
    h, w = ctx.latent_shape[-2:]
    pixels = image_to_tensor(ctx.request.image, h, w).to(ctx.device)
    return ctx.rows(pixels.expand(ctx.latent_shape[0], -1, -1, -1))


register_provider("low_res_image", low_res_image, check=check_low_res_image)


register_provider("text_context", text_context)
register_provider("text_pooled", text_pooled)
register_provider("time_ids_size_crop_target", time_ids_size_crop_target)
register_provider("time_ids_size_crop_aesthetic", time_ids_size_crop_aesthetic)
register_provider("guidance_embedding", guidance_cond, embeds_guidance=True)
register_provider("class_label", class_label, check=check_class_label, request_keys=("{name}", "negative_{name}"))
register_provider("inpaint_mask", inpaint_mask)
register_provider("masked_image_latents", masked_image_latents)

# issue 12 (H2): a token sequence through cross-attention (the `token_sequence` provider registers on import)
# issue 12 (H3): depth maps, generic concatenated maps, the x4 upscaler's noise level and low-res image
from . import providers_maps  # noqa: E402, F401  (registers its providers; it imports this module)
from . import token_sequence as _token_sequence  # noqa: E402,F401
