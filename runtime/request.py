"""Generation requests: what a caller asks for, checked and resolved against a model's engines.

`check_request` checks types (no model needed); `resolve` fills in the family's defaults and the
sizes the engines cover, decides the mode from what the request gives, and lets each conditioning
provider validate the request's `conditioning` values, all before any work runs.

Prompts: a family with text encoders needs a prompt (one with an image encoder, Stable unCLIP, takes
none as "", as diffusers does). A family without (class-conditional or
unconditional) ignores a given prompt (noted); its requests have one slot per entry of a list
`conditioning` value (e.g. {"class_labels": [3, 7]}: two), else one; `num_images_per_prompt`
images each.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from latentrt.buckets import (
    SideRanges,
    buckets_for,
    check_multiple,
    format_size,
    native_size,
    nearest_bucket,
    nearest_valid,
)
from latentrt.choices import Mode, OutputType, values
from latentrt.errors import InvalidRequest, UnsupportedShape
from latentrt.families import FamilySpec
from latentrt.names import DIM_UNET_BATCH, TIME_IDS

from .conditioning import SizeConditioning, as_list
from .images import ImageInput, load_image
from .plan import check_fraction
from .providers import check_conditioning, runs_cfg
from .scheduler_config import parse_sampler
from .step_cache import check_interval

if TYPE_CHECKING:
    from .engine_set import EngineSet
    from .pipeline import Pipeline

DEFAULT_IMG2IMG_STRENGTH = 0.8
PIXEL_MULTIPLE = 64  # SD UNets need latent sides that are multiples of 8 (3 downsamplings of the f=8 latents)
INT_FIELDS = ("steps", "width", "height", "seed", "num_images_per_prompt")
NUMBER_FIELDS = ("guidance", "strength", "denoising_start", "denoising_end", "guidance_rescale")


@dataclass
class GenerationRequest:
    """What to generate. `None` fields take the family's defaults."""

    prompt: str | list[str] | None = None  # needed by families with text encoders, ignored by the others
    negative_prompt: str | list[str] | None = None  # None: no negative (SDXL: zero embeddings)
    steps: int | None = None  # denoising steps of the full schedule (img2img runs int(steps * strength))
    guidance: float | None = None  # classifier-free guidance scale; <= 1 runs no CFG batch (Turbo: 0)
    guidance_rescale: float = 0.0  # in [0, 1]: rescale the guided prediction's std (diffusers' rescale_noise_cfg)
    sampler: str | None = None  # a SamplerId value: euler, euler_a, heun, ddim, pndm, ... (None: the checkpoint's own)
    width: int | None = None  # pixels; both or neither of width/height
    height: int | None = None
    aspect: str | float | None = None  # "16:9" or width/height: snaps to the nearest bucket (of the checkpoint's native size)
    seed: int | None = None  # None: a random seed (reported in the result)
    num_images_per_prompt: int = 1
    image: ImageInput | None = None  # img2img / inpainting init image
    strength: float | None = None  # img2img 0.8, inpainting 1.0 by default
    mask: ImageInput | None = None  # inpainting: white = repaint
    latents: torch.Tensor | None = None  # continue from these latents (with denoising_start)
    denoising_start: float | None = None  # fraction of the schedule already done (refiner)
    denoising_end: float | None = None  # stop after this fraction (base before a refiner; default 0.8 then)
    sizes: SizeConditioning = field(default_factory=SizeConditioning)  # SDXL micro-conditioning
    output_type: OutputType | str = OutputType.PIL  # "pil" (images + array) or "latent" (no VAE decode)
    refiner: Pipeline | None = None  # SDXL refiner continuing this request's latents
    prompt_weighting: bool = False  # read the "(word:1.3)" emphasis syntax in prompts (A1111 style)
    # values of conditioning inputs other than text, keyed by UNet input name: {"class_labels": 3} or one
    # per prompt ({"class_labels": [3, 7]}); "negative_<name>" gives the value of the unconditional CFG half
    conditioning: dict[str, Any] = field(default_factory=dict)
    step_cache: int = 1  # DeepCache interval N: a full UNet pass every N steps, shallow ones between (1: off)
    tiny_vae: bool = False  # decode with the export's tiny VAE decoder (TAESD, `latentrt export --tiny-vae`)


@dataclass
class ResolvedRequest:
    """A validated request with every default filled in."""

    prompts: list[str]  # families without text encoders: one "" per slot
    negative: list[str] | str | None
    steps: int
    guidance: float
    sampler: str | None  # the user's choice; None: each stage's scheduler config's own sampler
    height: int
    width: int
    seed: int
    num_images_per_prompt: int
    mode: Mode
    strength: float | None
    denoising_start: float | None
    denoising_end: float | None
    sizes: SizeConditioning
    image: Image.Image | None = None
    mask: Image.Image | None = None
    latents: torch.Tensor | None = None
    guidance_rescale: float = 0.0
    prompt_weighting: bool = False
    conditioning: dict[str, Any] = field(default_factory=dict)
    output_type: OutputType = OutputType.PIL
    step_cache: int = 1  # a full UNet pass every N steps (runtime/step_cache.py; 1: off)
    tiny_vae: bool = False  # decode with the tiny VAE decoder (runtime/tiny_vae.py)

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    def settings(self, engines: EngineSet) -> dict[str, Any]:
        """The settings recorded with the result (PNG metadata, server replies)."""
        es = engines
        out = {
            "family": es.spec.name, "model": es.source.get("model"), "backend": es.backend, "mode": self.mode.value,
            "prompts": self.prompts, "negative_prompt": self.negative, "steps": self.steps,
            "guidance": self.guidance, "sampler": self.sampler, "height": self.height, "width": self.width,
            "seed": self.seed, "num_images_per_prompt": self.num_images_per_prompt, "strength": self.strength,
            "denoising_start": self.denoising_start, "denoising_end": self.denoising_end,
            "sizes": asdict(self.sizes) if es.spec.denoiser.takes(TIME_IDS) else None,
            "guidance_rescale": self.guidance_rescale, "prompt_weighting": self.prompt_weighting,
        }
        if self.conditioning:  # arrays (token sequences given through the API) as nested lists: JSON-able
            out["conditioning"] = {k: v.tolist() if isinstance(v, (np.ndarray, torch.Tensor)) else v
                                   for k, v in self.conditioning.items()}
        if self.step_cache != 1:
            out["step_cache"] = self.step_cache
        if self.tiny_vae:
            out["tiny_vae"] = True
        return out


# ---------------------------------------------------------------------------- checks without a model


def request_from_kwargs(kwargs: dict[str, Any]) -> GenerationRequest:
    """A GenerationRequest from keyword settings; InvalidRequest naming unknown ones."""
    unknown = set(kwargs) - set(GenerationRequest.__dataclass_fields__)
    if unknown:
        raise InvalidRequest(f"unknown generation setting(s) {', '.join(sorted(unknown))}")
    return GenerationRequest(**kwargs)


def check_request(request: Any) -> None:
    """InvalidRequest unless `request` is a GenerationRequest whose settings have the right types."""
    if not isinstance(request, GenerationRequest):
        raise InvalidRequest(f"expected a GenerationRequest (or prompt=... keywords), got {type(request).__name__}")
    if request.prompt is not None and not isinstance(request.prompt, (str, list, tuple)):
        raise InvalidRequest("prompt must be a string or a non-empty list of strings, got "
                             f"{type(request.prompt).__name__}")
    for name in INT_FIELDS:
        value = getattr(request, name)
        whole = isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer())
        if value is not None and (isinstance(value, bool) or not whole):
            raise InvalidRequest(f"{name} must be a whole number, got {value!r}")
    for name in NUMBER_FIELDS:  # ranges (and NaN) are checked where each setting is resolved
        value = getattr(request, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))):
            raise InvalidRequest(f"{name} must be a number, got {value!r}")
    if request.aspect is not None and not isinstance(request.aspect, (str, int, float)):
        raise InvalidRequest(f"aspect must be a ratio like '16:9' or a number, got {request.aspect!r}")
    if request.num_images_per_prompt is None:
        raise InvalidRequest("num_images_per_prompt must be a whole number >= 1, got None")
    if request.prompt_weighting is not None and not isinstance(request.prompt_weighting, (bool, np.bool_)):
        raise InvalidRequest(f"prompt_weighting must be True or False, got {request.prompt_weighting!r}")
    output_type(request.output_type)
    if not isinstance(request.tiny_vae, (bool, np.bool_)):
        raise InvalidRequest(f"tiny_vae must be True or False, got {request.tiny_vae!r}")
    if not isinstance(request.conditioning, dict) or not all(isinstance(k, str) for k in request.conditioning):
        raise InvalidRequest("conditioning must be a dict of input name -> value, e.g. {'class_labels': 3}, got "
                             f"{request.conditioning!r}")


def output_type(value: Any) -> OutputType:
    """The OutputType of a request's `output_type`; InvalidRequest naming the choices."""
    try:
        return OutputType(value)
    except ValueError:
        raise InvalidRequest(f"output_type must be one of {', '.join(values(OutputType))}, got {value!r}") from None


def parse_aspect(aspect: str | float) -> float:
    """Width / height from '16:9', '16/9', '1.78' or a number."""
    if isinstance(aspect, (int, float)):
        value = float(aspect)
    else:
        text = aspect.strip().replace("/", ":")
        try:
            w, _, h = text.partition(":")
            value = float(w) / float(h) if h else float(w)
        except (ValueError, ZeroDivisionError):
            raise InvalidRequest(f"cannot read aspect ratio {aspect!r}; write it like 16:9") from None
    if not math.isfinite(value) or value <= 0:
        raise InvalidRequest(f"aspect ratio must be positive, got {aspect!r}")
    return value


def guidance_rescale(value: float | None) -> float:
    """A guidance_rescale in [0, 1], None: 0 (off) (Lin et al. 2023 recommend 0.7 with zero-SNR schedules)."""
    rescale = float(value or 0.0)
    if not 0.0 <= rescale <= 1.0:  # also false for NaN
        raise InvalidRequest(f"guidance_rescale must be in [0, 1] (0: off; 0.7 is the paper's choice), got {value}")
    return rescale


# ---------------------------------------------------------------------------- resolution against a model


def resolve(request: GenerationRequest, engines: EngineSet) -> tuple[ResolvedRequest, list[str]]:
    """Validate a request against a model's engines and fill in defaults; returns the settings and notes."""
    spec, notes = engines.spec, []
    check_request(request)
    prompts = resolve_prompts(spec, request, notes)
    guidance = spec.sampling.guidance if request.guidance is None else float(request.guidance)
    if not math.isfinite(guidance) or guidance < 0:
        raise InvalidRequest(f"guidance must be >= 0 (0 or 1 disables classifier-free guidance), got {guidance}")
    sampler = None if request.sampler is None else parse_sampler(request.sampler).value
    if request.num_images_per_prompt < 1:
        raise InvalidRequest(f"num_images_per_prompt must be >= 1, got {request.num_images_per_prompt}")
    image = load_image(request.image, "init image") if request.image is not None else None
    mask = load_image(request.mask, "mask") if request.mask is not None else None
    mode = resolve_mode(spec, image, mask, request.latents)
    if mode is Mode.CONTINUE and request.denoising_start is None:
        raise InvalidRequest("latents continue a partly denoised run: give denoising_start (the fraction "
                             "already denoised, e.g. the base's denoising_end)")
    strength = resolve_strength(request.strength, mode)
    steps = resolve_steps(spec, request.steps, strength)
    check_fraction("denoising_start", request.denoising_start)
    check_fraction("denoising_end", request.denoising_end)
    init = image if spec.image_encoder is None else None  # issue 12 (H4): an image to vary is no init image
    height, width = resolve_size(engines, request, init, notes)
    if mask is not None and image is not None and mask.size != image.size:
        raise InvalidRequest(f"the mask is {mask.size[1]}x{mask.size[0]} (HxW) but the image is "
                             f"{image.size[1]}x{image.size[0]}; give a mask of the image's size")
    if init is not None and (init.size[1], init.size[0]) != (height, width) and not notes \
            and spec.denoiser.image_piece is None:
        notes.append(f"resized the {init.size[1]}x{init.size[0]} init image to {height}x{width} (HxW)")
    seed = random.SystemRandom().randrange(2**32) if request.seed is None else int(request.seed)
    if not 0 <= seed < 2**64:
        raise InvalidRequest(f"seed must be in [0, 2^64), got {seed}")
    settings = ResolvedRequest(prompts, request.negative_prompt, steps, guidance, sampler, height, width, seed,
                               int(request.num_images_per_prompt), mode, strength, request.denoising_start,
                               request.denoising_end, request.sizes, image, mask, request.latents,
                               guidance_rescale(request.guidance_rescale), bool(request.prompt_weighting),
                               dict(request.conditioning), output_type(request.output_type),
                               check_interval(request.step_cache), bool(request.tiny_vae))
    check_batch(engines, settings)
    check_conditioning(spec, engines["unet"].io, settings, engines.dims.extra if engines.dims else {})
    return settings, notes


def resolve_prompts(spec: FamilySpec, request: GenerationRequest, notes: list[str]) -> list[str]:
    """The request's prompts; for a family without text encoders one "" per conditioning slot (module doc)."""
    if spec.text_encoders:
        if request.prompt is None and spec.image_encoder is not None:  # issue 12: unCLIP varies the image with ""
            return [""]
        if request.prompt is None:
            raise InvalidRequest(f"{spec.name} is conditioned on text: give a prompt (a string or a list of strings)")
        return as_list(request.prompt)
    if request.prompt is not None or request.negative_prompt is not None:
        notes.append(f"{spec.name} has no text encoder: the prompt is not used")
    lists = [len(v) for v in request.conditioning.values() if isinstance(v, (list, tuple))]
    return [""] * max(lists, default=1)


def resolve_mode(spec: FamilySpec, image: Image.Image | None, mask: Image.Image | None,
                 latents: torch.Tensor | None) -> Mode:
    """What the request does, from what it gives and whether the denoiser takes a mask (inpainting).

    A mask for a denoiser that takes none is inpainting too (diffusers' 4-channel "legacy" inpainting).
    """
    if latents is not None:
        if image is not None or mask is not None:
            raise InvalidRequest("give either latents or an init image, not both")
        return Mode.CONTINUE
    piece = spec.denoiser.image_piece
    if piece is not None:  # issue 12, H1: the image conditions the model (LDM super-resolution); no img2img
        if image is None or mask is not None:
            raise InvalidRequest(f"{spec.name} takes an image as its '{piece.name}' (e.g. the low-res image to "
                                 "upscale): give --image (and no mask)")
        return Mode.TXT2IMG
    if spec.image_encoder is not None:  # issue 12 (H4): the image is encoded to a CLIP embedding, not to latents
        if mask is not None:
            raise InvalidRequest(f"{spec.name} makes variations of an image; it does not inpaint: drop the mask")
        return Mode.TXT2IMG
    if spec.takes_mask:
        if image is None or mask is None:
            raise InvalidRequest(f"{spec.name} is an inpainting model: give an init image and a mask")
        return Mode.INPAINT
    if mask is not None:  # legacy inpainting: the pipeline blends the image back after every step
        if image is None:
            raise InvalidRequest("a mask needs an init image to inpaint: give the image too (--image)")
        return Mode.INPAINT
    return Mode.IMG2IMG if image is not None else Mode.TXT2IMG


def resolve_strength(strength: float | None, mode: Mode) -> float | None:
    """img2img 0.8 / inpainting 1.0 by default, in (0, 1]; None for txt2img and continued latents."""
    if mode in (Mode.TXT2IMG, Mode.CONTINUE):
        if strength is not None:
            raise InvalidRequest("strength applies to img2img and inpainting; give an init image")
        return None
    value = (1.0 if mode is Mode.INPAINT else DEFAULT_IMG2IMG_STRENGTH) if strength is None else float(strength)
    if not 0 < value <= 1:
        raise InvalidRequest(f"strength must be in (0, 1], got {value}")
    return value


def resolve_steps(spec: FamilySpec, steps: int | None, strength: float | None) -> int:
    """The family's default steps (Turbo img2img: enough for one step to run), checked to run at least one."""
    minimum = spec.min_turbo_steps_x_strength or 1.0
    if steps is None:
        steps = spec.sampling.steps
        if strength is not None and int(steps * strength) < 1:
            steps = math.ceil(minimum / strength)
    if int(steps) != steps or steps < 1:
        raise InvalidRequest(f"steps must be a whole number >= 1, got {steps}")
    steps = int(steps)
    if strength is not None and int(steps * strength) < 1:
        raise InvalidRequest(f"steps x strength must be at least 1 so that one denoising step runs "
                             f"(got {steps} x {strength} = {steps * strength:g}); with Turbo use e.g. "
                             f"--steps {math.ceil(1 / strength)} --strength {strength}")
    return steps


def resolve_size(engines: EngineSet, request: GenerationRequest, image: Image.Image | None,
                 notes: list[str]) -> tuple[int, int]:
    """(height, width) in pixels: explicit if the engines cover it, else the nearest bucket (noted)."""
    f = engines.vae_scale_factor
    if request.latents is not None:
        return int(request.latents.shape[-2]) * f, int(request.latents.shape[-1]) * f
    if (request.width is None) != (request.height is None):
        raise InvalidRequest("give both width and height, or an aspect ratio")
    if request.width is not None and request.height is not None:
        if request.aspect is not None:
            raise InvalidRequest("give either width and height or an aspect ratio, not both")
        size = (int(request.height), int(request.width))
        check_multiple(size, PIXEL_MULTIPLE, pixel_ranges(engines))
        return covered(engines, size, notes)
    if request.aspect is not None:
        bucket = nearest_bucket((1000, round(1000 * parse_aspect(request.aspect))), buckets(engines))
        notes.append(f"aspect {request.aspect} -> bucket {format_size(bucket)} (HxW)")
        return bucket
    if image is not None and engines.spec.denoiser.image_piece is not None:
        return low_res_size(engines, image, notes)
    if image is not None:
        size = (image.size[1], image.size[0])
        if (valid := multiple_size(engines, size)) != size:
            notes.append(f"resized the {format_size(size)} init image to {format_size(valid)} (HxW; sides must "
                         f"be multiples of {PIXEL_MULTIPLE})")
        return covered(engines, valid, notes)
    return covered(engines, native_size(engines.spec, engines.dims), notes)


def low_res_size(engines: EngineSet, image: Image.Image, notes: list[str]) -> tuple[int, int]:
    """Issue 12, H1: an image at latent resolution (LDM super-resolution) gives the output size: factor x its size."""
    f = engines.vae_scale_factor
    size = (image.size[1] * f, image.size[0] * f)
    if (valid := multiple_size(engines, size)) != size:
        notes.append(f"resized the {image.size[1]}x{image.size[0]} image to {valid[0] // f}x{valid[1] // f} (HxW): "
                     f"the output ({f}x its size) needs sides that are multiples of {PIXEL_MULTIPLE}")
    return covered(engines, valid, notes)


def multiple_size(engines: EngineSet, size: tuple[int, int]) -> tuple[int, int]:
    """`size` (H, W) if both sides are multiples of PIXEL_MULTIPLE, else the nearest valid size the engines take."""
    if size[0] % PIXEL_MULTIPLE or size[1] % PIXEL_MULTIPLE:
        return nearest_valid(size, PIXEL_MULTIPLE, pixel_ranges(engines))[0]
    return size


def pixel_ranges(engines: EngineSet) -> SideRanges:
    """((min, max) height, (min, max) width) in pixels that every engine takes."""
    (lo_h, hi_h), (lo_w, hi_w) = engines.latent_range()
    f = engines.vae_scale_factor
    return (lo_h * f, hi_h * f), (lo_w * f, hi_w * f)


def covers(engines: EngineSet, size: tuple[int, int]) -> bool:
    """Whether every engine takes images of `size` (height, width) pixels."""
    f = engines.vae_scale_factor
    return engines.covers(size[0] // f, size[1] // f)


def buckets(engines: EngineSet) -> list[tuple[int, int]]:
    """The buckets of the checkpoint's native size (the family's at its native size) the engines cover;
    UnsupportedShape when they cover none."""
    found = [b for b in buckets_for(engines.spec, native_size(engines.spec, engines.dims)) if covers(engines, b)]
    if not found:
        (lo_h, hi_h), (lo_w, hi_w) = pixel_ranges(engines)
        raise UnsupportedShape(f"the engines in {engines.folder} cover {lo_h}-{hi_h} x {lo_w}-{hi_w} px (HxW), "
                               f"none of the {engines.spec.name} buckets")
    return found


def covered(engines: EngineSet, size: tuple[int, int], notes: list[str]) -> tuple[int, int]:
    """`size` when the engines cover it, else the nearest covered bucket (noted)."""
    if covers(engines, size):
        return size
    bucket = nearest_bucket(size, buckets(engines))
    notes.append(f"snapped {format_size(size)} to bucket {format_size(bucket)} (HxW): the engines do not "
                 "cover the requested size")
    return bucket


def check_batch(engines: EngineSet, s: ResolvedRequest) -> None:
    """InvalidRequest when the UNet batch (doubled with guidance) exceeds the engines' range."""
    io = engines["unet"].io
    unet = io.dims.get(DIM_UNET_BATCH)
    rows = s.batch * (2 if runs_cfg(engines.spec, io, s.guidance) else 1)
    if unet is not None and rows > unet.max:
        raise InvalidRequest(f"{s.batch} images{' with guidance' if rows > s.batch else ''} need a UNet batch of "
                             f"{rows}; the engines take at most {unet.max}: generate fewer images per call")
