"""Engines -> images: encode prompts, sample latents, decode; txt2img, img2img, inpainting, SDXL refiner, Turbo.

The pipeline reproduces the diffusers pipelines (StableDiffusion[Img2Img|Inpaint]Pipeline,
StableDiffusionXL[Img2Img]Pipeline) step for step, including the order in which they draw from
the seeded CPU generator, so the same seed gives the same image on every backend:

- txt2img: initial latents (N, C, h, w), then the sampler's per-step noise.
- img2img: the VAE posterior sample of the init image first, then the noise added to it.
- inpainting (9-channel UNet): [strength < 1: the init image's posterior sample], the initial
  noise, then the masked image's posterior sample (its latents are a UNet input).
- SDXL base + refiner: the base stops at `denoising_end`; its latents (not decoded) continue in
  the refiner from the same fraction, with the same generator.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from latentrt.buckets import SideRanges, check_multiple, format_size, nearest_bucket, nearest_valid
from latentrt.configs import check_scheduler_config
from latentrt.errors import InvalidRequest, UnsupportedShape
from latentrt.memory import architecture, available_bytes, check_fits, estimate_bytes
from latentrt.tensors import (
    ENCODER_HIDDEN_STATES,
    IMAGES,
    LATENT,
    LATENT_PARAMETERS,
    OUT_SAMPLE,
    SAMPLE,
    TEXT_EMBEDS,
    TIME_IDS,
    TIMESTEP,
    TIMESTEP_COND,
    context_windows,
    shape_of,
)

from .conditioning import (
    SizeConditioning,
    TextConditioning,
    as_list,
    encode_prompts,
    guidance_embedding,
    time_ids,
)
from .denoisers import Model, guided, needs_cfg
from .engine_set import EngineSet, check_refiner, load_engines
from .images import ImageInput, float_to_pil, image_to_tensor, load_image, mask_to_tensor, tensor_to_float
from .plan import check_fraction, plan_from_scheduler_config
from .samplers import SeededNoise
from .scheduler_config import parse_sampler, pipeline_fixes
from .timing import StageTimer, TimingRecord

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (steps done, steps in this stage)
DEFAULT_IMG2IMG_STRENGTH = 0.8
DEFAULT_REFINER_SWITCH = 0.8  # fraction of the noise schedule the base denoises before the refiner takes over
PIXEL_MULTIPLE = 64  # SD UNets need latent sides that are multiples of 8 (FIELD-NOTES)


@dataclass
class GenerationRequest:
    """What to generate. `None` fields take the family's defaults."""

    prompt: str | list[str]
    negative_prompt: str | list[str] | None = None  # None: no negative (SDXL: zero embeddings)
    steps: int | None = None  # denoising steps of the full schedule (img2img runs int(steps * strength))
    guidance: float | None = None  # classifier-free guidance scale; <= 1 runs no CFG batch (Turbo: 0)
    guidance_rescale: float = 0.0  # in [0, 1]: rescale the guided prediction's std (diffusers' rescale_noise_cfg)
    sampler: str | None = None  # a SamplerId value: euler, euler_a, heun, ddim, pndm, ... (None: the checkpoint's own)
    width: int | None = None  # pixels; both or neither of width/height
    height: int | None = None
    aspect: str | float | None = None  # "16:9" or width/height: snaps to the family's nearest bucket
    seed: int | None = None  # None: a random seed (reported in the result)
    num_images_per_prompt: int = 1
    image: ImageInput | None = None  # img2img / inpainting init image
    strength: float | None = None  # img2img 0.8, inpainting 1.0 by default
    mask: ImageInput | None = None  # inpainting: white = repaint
    latents: torch.Tensor | None = None  # continue from these latents (with denoising_start)
    denoising_start: float | None = None  # fraction of the schedule already done (refiner)
    denoising_end: float | None = None  # stop after this fraction (base before a refiner; default 0.8 then)
    sizes: SizeConditioning = field(default_factory=SizeConditioning)  # SDXL micro-conditioning
    output_type: str = "pil"  # "pil" (images + array) or "latent" (no VAE decode)
    refiner: Pipeline | None = None  # SDXL refiner continuing this request's latents
    prompt_weighting: bool = False  # read the "(word:1.3)" emphasis syntax in prompts (A1111 style)


@dataclass
class GenerationResult:
    images: list[Image.Image]  # N = len(prompts) * num_images_per_prompt images
    latents: torch.Tensor  # (N, C, h, w) final latents (before the VAE), CPU float32
    array: np.ndarray | None  # (N, H, W, 3) float32 in [0, 1] (diffusers output_type="np")
    timing: TimingRecord
    settings: dict[str, Any]
    seed: int
    notes: list[str] = field(default_factory=list)

    def metadata(self, index: int = 0) -> dict[str, str]:
        """PNG text chunks for image `index`: prompt, seed and the settings that made it."""
        prompts = self.settings["prompts"]
        prompt = prompts[index // self.settings["num_images_per_prompt"]]
        return {"prompt": prompt, "seed": str(self.seed), "latentrt": _json(self.settings | {"index": index})}


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True, default=str)


@dataclass
class ResolvedRequest:
    """A validated request with every default filled in."""

    prompts: list[str]
    negative: list[str] | str | None
    steps: int
    guidance: float
    sampler: str | None  # the user's choice; None: each stage's scheduler config's own sampler
    height: int
    width: int
    seed: int
    num_images_per_prompt: int
    mode: str  # txt2img | img2img | inpaint | continue
    strength: float | None
    denoising_start: float | None
    denoising_end: float | None
    sizes: SizeConditioning
    image: Image.Image | None = None
    mask: Image.Image | None = None
    latents: torch.Tensor | None = None
    guidance_rescale: float = 0.0
    prompt_weighting: bool = False

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    def settings(self, pipe: Pipeline) -> dict[str, Any]:
        es = pipe.engines
        return {
            "family": es.spec.name, "model": es.source.get("model"), "backend": es.backend, "mode": self.mode,
            "prompts": self.prompts, "negative_prompt": self.negative, "steps": self.steps,
            "guidance": self.guidance, "sampler": self.sampler, "height": self.height, "width": self.width,
            "seed": self.seed, "num_images_per_prompt": self.num_images_per_prompt, "strength": self.strength,
            "denoising_start": self.denoising_start, "denoising_end": self.denoising_end,
            "sizes": asdict(self.sizes) if es.spec.time_ids.width else None,
            "guidance_rescale": self.guidance_rescale, "prompt_weighting": self.prompt_weighting,
        }


class Pipeline:
    """Runs generation requests on one model's engines (any backend), optionally with an SDXL refiner."""

    def __init__(self, engines: EngineSet, refiner: Pipeline | None = None):
        self.engines = engines
        self.spec = engines.spec
        self.device = engines.device
        self.refiner = refiner
        check_scheduler_config(engines.scheduler_config, f"{engines.folder}/scheduler/scheduler_config.json")
        if refiner is not None:
            check_refiner(engines, refiner.engines)

    def __call__(self, request: GenerationRequest | None = None, **kwargs: Any) -> GenerationResult:
        if request is None:
            request = request_from_kwargs(kwargs)
        elif kwargs:
            raise InvalidRequest("give either a GenerationRequest or keyword settings, not both")
        return self.generate(request)

    def close(self) -> None:
        self.engines.close()
        if self.refiner is not None:
            self.refiner.close()

    # ------------------------------------------------------------------ request -> settings

    def resolve(self, request: GenerationRequest) -> tuple[ResolvedRequest, list[str]]:
        """Validate a request and fill in defaults; returns the settings and notes for the user."""
        spec, notes = self.spec, []
        check_request(request)
        prompts = as_list(request.prompt)
        guidance = spec.sampling.guidance if request.guidance is None else float(request.guidance)
        if not math.isfinite(guidance) or guidance < 0:
            raise InvalidRequest(f"guidance must be >= 0 (0 or 1 disables classifier-free guidance), got {guidance}")
        sampler = None if request.sampler is None else parse_sampler(request.sampler).value
        if request.num_images_per_prompt < 1:
            raise InvalidRequest(f"num_images_per_prompt must be >= 1, got {request.num_images_per_prompt}")
        image = load_image(request.image, "init image") if request.image is not None else None
        mask = load_image(request.mask, "mask") if request.mask is not None else None
        mode = self._mode(image, mask, request.latents)
        if mode == "continue" and request.denoising_start is None:
            raise InvalidRequest("latents continue a partly denoised run: give denoising_start (the fraction "
                                 "already denoised, e.g. the base's denoising_end)")
        strength = self._strength(request.strength, mode)
        steps = self._steps(request.steps, strength)
        check_fraction("denoising_start", request.denoising_start)
        check_fraction("denoising_end", request.denoising_end)
        height, width = self._size(request, image, request.latents, notes)
        if mask is not None and image is not None and mask.size != image.size:
            raise InvalidRequest(f"the mask is {mask.size[1]}x{mask.size[0]} (HxW) but the image is "
                                 f"{image.size[1]}x{image.size[0]}; give a mask of the image's size")
        if image is not None and (image.size[1], image.size[0]) != (height, width) and not notes:
            notes.append(f"resized the {image.size[1]}x{image.size[0]} init image to {height}x{width} (HxW)")
        seed = random.SystemRandom().randrange(2**32) if request.seed is None else int(request.seed)
        if not 0 <= seed < 2**64:
            raise InvalidRequest(f"seed must be in [0, 2^64), got {seed}")
        negative = request.negative_prompt
        settings = ResolvedRequest(prompts, negative, steps, guidance, sampler, height, width, seed,
                                   int(request.num_images_per_prompt), mode, strength, request.denoising_start,
                                   request.denoising_end, request.sizes, image, mask, request.latents,
                                   _guidance_rescale(request.guidance_rescale), bool(request.prompt_weighting))
        self._check_batch(settings)
        return settings, notes

    def _mode(self, image: Image.Image | None, mask: Image.Image | None, latents: torch.Tensor | None) -> str:
        if latents is not None:
            if image is not None or mask is not None:
                raise InvalidRequest("give either latents or an init image, not both")
            return "continue"
        if self.spec.is_inpaint:
            if image is None or mask is None:
                raise InvalidRequest(f"{self.spec.name} is an inpainting model: give an init image and a mask")
            return "inpaint"
        if mask is not None:
            raise InvalidRequest(f"a mask needs an inpainting model (9-channel UNet, e.g. sd1-inpaint); "
                                 f"{self.spec.name} is not one")
        return "img2img" if image is not None else "txt2img"

    @staticmethod
    def _strength(strength: float | None, mode: str) -> float | None:
        if mode in ("txt2img", "continue"):
            if strength is not None:
                raise InvalidRequest("strength applies to img2img and inpainting; give an init image")
            return None
        value = (1.0 if mode == "inpaint" else DEFAULT_IMG2IMG_STRENGTH) if strength is None else float(strength)
        if not 0 < value <= 1:
            raise InvalidRequest(f"strength must be in (0, 1], got {value}")
        return value

    def _steps(self, steps: int | None, strength: float | None) -> int:
        minimum = self.spec.min_turbo_steps_x_strength or 1.0
        if steps is None:
            steps = self.spec.sampling.steps
            if strength is not None and int(steps * strength) < 1:  # Turbo img2img: enough steps for one to run
                steps = math.ceil(minimum / strength)
        if int(steps) != steps or steps < 1:
            raise InvalidRequest(f"steps must be a whole number >= 1, got {steps}")
        steps = int(steps)
        if strength is not None and int(steps * strength) < 1:
            raise InvalidRequest(f"steps x strength must be at least 1 so that one denoising step runs "
                                 f"(got {steps} x {strength} = {steps * strength:g}); with Turbo use e.g. "
                                 f"--steps {math.ceil(1 / strength)} --strength {strength}")
        return steps

    def _size(self, request: GenerationRequest, image: Image.Image | None, latents: torch.Tensor | None,
              notes: list[str]) -> tuple[int, int]:
        """(height, width) in pixels: explicit if the engines cover it, else the nearest bucket (noted)."""
        f = self.engines.vae_scale_factor
        if latents is not None:
            return int(latents.shape[-2]) * f, int(latents.shape[-1]) * f
        if (request.width is None) != (request.height is None):
            raise InvalidRequest("give both width and height, or an aspect ratio")
        if request.width is not None and request.height is not None:
            if request.aspect is not None:
                raise InvalidRequest("give either width and height or an aspect ratio, not both")
            size = (int(request.height), int(request.width))
            check_multiple(size, PIXEL_MULTIPLE, self.pixel_ranges())
            return self._covered(size, notes)
        if request.aspect is not None:
            bucket = nearest_bucket((1000, round(1000 * parse_aspect(request.aspect))), self._buckets())
            notes.append(f"aspect {request.aspect} -> bucket {format_size(bucket)} (HxW)")
            return bucket
        if image is not None:
            size = (image.size[1], image.size[0])
            if size[0] % PIXEL_MULTIPLE or size[1] % PIXEL_MULTIPLE:
                valid = nearest_valid(size, PIXEL_MULTIPLE, self.pixel_ranges())[0]
                notes.append(f"resized the {format_size(size)} init image to {format_size(valid)} (HxW; sides must "
                             f"be multiples of {PIXEL_MULTIPLE})")
                size = valid
            return self._covered(size, notes)
        return self._covered(self.spec.native_size, notes)

    def pixel_ranges(self) -> SideRanges:
        """((min, max) height, (min, max) width) in pixels that every engine takes."""
        (lo_h, hi_h), (lo_w, hi_w) = self.engines.latent_range()
        f = self.engines.vae_scale_factor
        return (lo_h * f, hi_h * f), (lo_w * f, hi_w * f)

    def _buckets(self) -> list[tuple[int, int]]:
        """The family's buckets the engines cover."""
        covered = [b for b in self.spec.buckets if self._covers(b)]
        if not covered:
            (lo_h, hi_h), (lo_w, hi_w) = self.engines.latent_range()
            f = self.engines.vae_scale_factor
            raise UnsupportedShape(f"the engines in {self.engines.folder} cover {lo_h * f}-{hi_h * f} x "
                                   f"{lo_w * f}-{hi_w * f} px (HxW), none of the {self.spec.name} buckets")
        return covered

    def _covers(self, size: tuple[int, int]) -> bool:
        f = self.engines.vae_scale_factor
        return self.engines.covers(size[0] // f, size[1] // f)

    def _covered(self, size: tuple[int, int], notes: list[str]) -> tuple[int, int]:
        if self._covers(size):
            return size
        bucket = nearest_bucket(size, self._buckets())
        notes.append(f"snapped {format_size(size)} to bucket {format_size(bucket)} (HxW): the engines do not "
                     "cover the requested size")
        return bucket

    def _check_batch(self, s: ResolvedRequest) -> None:
        unet = self.engines["unet"].io.dims.get("unet_batch")
        rows = s.batch * (2 if needs_cfg(s.guidance) and not self._guidance_embedded() else 1)
        if unet is not None and rows > unet.max:
            raise InvalidRequest(f"{s.batch} images{' with guidance' if rows > s.batch else ''} need a UNet batch of "
                                 f"{rows}; the engines take at most {unet.max}: generate fewer images per call")

    # ------------------------------------------------------------------ memory

    def memory_needed(self, batch: int, height: int, width: int, cfg: bool, decode: bool = True) -> dict[str, int]:
        """Estimated peak activation bytes per stage of a request (`latentrt.memory`); {} when not estimated.

        TensorRT allocates its activations when the engines load, so there is nothing left to check.
        """
        es = self.engines
        if es.backend == "tensorrt":
            return {}
        f = es.vae_scale_factor
        decoder = es.engines.get("vae_decoder")
        chunk = min(batch, decoder.io.dims["batch"].max) if decoder and "batch" in decoder.io.dims else batch
        need = estimate_bytes(architecture(self.spec.name, es.dims.extra if es.dims else None),
                              unet_rows=batch * (2 if cfg else 1), decode_batch=chunk if decode else 0,
                              latent_height=height // f, latent_width=width // f,
                              fused_attention=es.backend == "torch")
        return need if decode else {"unet": need["unet"]}

    def check(self, request: GenerationRequest) -> None:
        """Raise what `generate` would raise for a bad request or one beyond memory, without doing any work."""
        settings, _ = self.resolve(request)
        self.check_memory(settings, request.refiner or self.refiner, decode=request.output_type != "latent")

    def check_memory(self, s: ResolvedRequest, refiner: Pipeline | None = None, decode: bool = True) -> None:
        """TooLarge before any work when the request needs more memory than is available, with the estimate
        and the largest size of the same aspect that fits."""
        cfg = needs_cfg(s.guidance)
        pipes = [self] if refiner is None else [self, refiner]

        def need(h: int, w: int) -> dict[str, int]:
            out: dict[str, int] = {}
            for i, p in enumerate(pipes):
                last = i == len(pipes) - 1
                for k, v in p.memory_needed(s.batch, h, w, cfg, decode and last).items():
                    out[("refiner_" if i else "") + k] = v
            return out

        available = available_bytes(str(self.device))
        check_fits(need(s.height, s.width), available,
                   f"{s.batch} image(s) of {s.height}x{s.width} (HxW){' with guidance' if cfg else ''}",
                   lambda: self._largest_fitting(s.height, s.width, need, available))

    def _largest_fitting(self, height: int, width: int, need: Callable[[int, int], dict[str, int]],
                         available: int | None) -> str | None:
        """The largest engine-covered size of about this aspect (sides multiples of 64) within `available`."""
        (lo_h, _), (lo_w, _) = self.pixel_ranges()
        longer = max(height, width)
        for side in range(longer - longer % PIXEL_MULTIPLE, PIXEL_MULTIPLE - 1, -PIXEL_MULTIPLE):
            other = max(PIXEL_MULTIPLE, round(min(height, width) * side / longer / PIXEL_MULTIPLE) * PIXEL_MULTIPLE)
            h, w = (side, other) if height >= width else (other, side)
            if h >= lo_h and w >= lo_w and self._covers((h, w)) and \
                    available is not None and max(need(h, w).values(), default=0) <= available:
                return f"{h}x{w} (HxW) or fewer images per call"
        return None

    # ------------------------------------------------------------------ generation

    def generate(self, request: GenerationRequest, refiner: Pipeline | None = None,
                 callback: ProgressCallback | None = None) -> GenerationResult:
        """Generate images for a request (with `refiner`, or the request's / pipeline's refiner, for SDXL)."""
        check_request(request)
        refiner = refiner or request.refiner or self.refiner
        if refiner is not None and refiner is not self.refiner:
            check_refiner(self.engines, refiner.engines)
        settings, notes = self.resolve(request)
        if refiner is not None and settings.denoising_end is None:
            settings.denoising_end = DEFAULT_REFINER_SWITCH
        self.check_memory(settings, refiner, decode=request.output_type != "latent")
        noise = SeededNoise(settings.seed, self.device)
        timer = StageTimer(self.device)
        with timer.stage("total"):
            latents, sampler = self.denoise(settings, noise, timer, callback)
            pipe, refiner_sampler = self, None
            if refiner is not None:
                pipe = refiner
                latents, refiner_sampler = refiner.refine(settings, latents, noise, timer, callback)
            array = None
            if request.output_type != "latent":
                with timer.prefixed("refiner_" if pipe is refiner else ""):
                    array = tensor_to_float(pipe.decode(latents, timer))
        images = float_to_pil(array) if array is not None else []
        result_settings = settings.settings(self) | {"sampler": sampler}
        if refiner is not None:
            result_settings["refiner"] = refiner.engines.source.get("model")
            result_settings["refiner_sampler"] = refiner_sampler
        for note in notes:
            log.info("%s", note)
        return GenerationResult(images, latents.float().cpu(), array, timer.record(), result_settings,
                                settings.seed, notes)

    def refine(self, base: ResolvedRequest, latents: torch.Tensor, noise: SeededNoise, timer: StageTimer,
               callback: ProgressCallback | None = None) -> tuple[torch.Tensor, str]:
        """Continue a base's latents from its `denoising_end` (this pipeline is the refiner).

        Returns (latents, the sampler that ran): the user's sampler, else the refiner's own scheduler's.
        """
        settings = replace(base, mode="continue", strength=None, denoising_start=base.denoising_end,
                           denoising_end=None, image=None, mask=None, latents=latents)
        with timer.prefixed("refiner_"):
            return self.denoise(settings, noise, timer, callback)

    def denoise(self, s: ResolvedRequest, noise: SeededNoise, timer: StageTimer,
                callback: ProgressCallback | None = None) -> tuple[torch.Tensor, str]:
        """Encode the prompts, prepare latents (drawing noise in diffusers' order) and run the sampler.

        Returns (latents, the sampler that ran: `s.sampler`, else this model's scheduler config's own).
        """
        es = self.engines
        cfg = needs_cfg(s.guidance)
        windows = context_windows(es["unet"].io)
        cond = encode_prompts(self.spec, es, es.tokenizers, s.prompts, s.negative,
                              cfg=cfg and not self._guidance_embedded(),
                              num_images_per_prompt=s.num_images_per_prompt,
                              zero_empty_negative=es.force_zeros_for_empty_prompt, timer=timer,
                              weighting=s.prompt_weighting, max_windows=windows[1] if windows else None)
        fixes = self.spec.pipeline_fixes_scheduler
        if fixes:
            for note in pipeline_fixes(es.scheduler_config)[1]:
                log.info("%s", note)
        plan = plan_from_scheduler_config(es.scheduler_config, s.sampler, s.steps, strength=s.strength,
                                          denoising_start=s.denoising_start, denoising_end=s.denoising_end,
                                          pipeline_fixes_scheduler=fixes)
        x, extra = self._initial(s, plan, noise, timer, cfg)
        model = self._unet_model(cond, s, cfg, extra, timer)
        return plan.run(model, x, noise, callback=_step_callback(callback, plan)), plan.sampler.value

    def _initial(self, s: ResolvedRequest, plan: Any, noise: SeededNoise, timer: StageTimer,
                 cfg: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(initial latents, extra UNet input channels or None), drawing noise in diffusers' order."""
        shape = self.latent_shape(s.batch, s.height, s.width)
        if s.mode == "continue":
            assert s.latents is not None
            return s.latents.to(self.device, torch.float32), None
        if s.mode == "txt2img":
            return plan.initial_latents(noise(shape)), None
        assert s.image is not None
        pixels = image_to_tensor(s.image, s.height, s.width).to(self.device)
        if s.mode == "img2img":
            image_latents = self.encode(pixels, noise, timer).expand(shape)
            return plan.noised(image_latents, noise(shape)), None
        return self._inpaint_initial(s, plan, noise, timer, cfg, pixels, shape)

    def _inpaint_initial(self, s: ResolvedRequest, plan: Any, noise: SeededNoise, timer: StageTimer, cfg: bool,
                         pixels: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """StableDiffusionInpaintPipeline's order: [image latents], noise, masked-image latents."""
        assert s.mask is not None and s.strength is not None
        full = s.strength >= 1.0
        image_latents = None if full else self.encode(pixels, noise, timer).expand(shape)
        start = noise(shape)
        x = plan.initial_latents(start) if image_latents is None else plan.noised(image_latents, start)
        mask = mask_to_tensor(s.mask, s.height, s.width).to(self.device)  # (1, 1, H, W), 1 = repaint
        masked = self.encode(pixels * (mask < 0.5), noise, timer)
        small = torch.nn.functional.interpolate(mask, size=shape[-2:])  # nearest, as diffusers
        extra = torch.cat([small.expand(shape[0], -1, -1, -1), masked.expand(shape)], dim=1)
        return x, torch.cat([extra, extra]) if cfg else extra

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """The shape of `batch` latents for height x width pixels, read from the decoder's IO spec."""
        f = self.engines.vae_scale_factor
        sizes = {"batch": batch, "latent_height": height // f, "latent_width": width // f}
        return shape_of(self.engines["vae_decoder"].io.input(LATENT), sizes)

    def _unet_model(self, cond: TextConditioning, s: ResolvedRequest, cfg: bool, extra: torch.Tensor | None,
                    timer: StageTimer) -> Model:
        """The model the sampler calls: (x * c_in, t) -> eps / v, one UNet call per step (CFG doubled).

        An LCM-distilled UNet (`timestep_cond` input) takes the guidance scale as an embedding and runs
        no CFG batch, as diffusers' LatentConsistencyModelPipeline does.
        """
        engine = self.engines["unet"]
        cfg = cfg and not self._guidance_embedded()
        context, pooled = cond.unet_batch(cfg)
        static: dict[str, torch.Tensor] = {ENCODER_HIDDEN_STATES: context}
        if pooled is not None:
            static[TEXT_EMBEDS] = pooled
        if self._guidance_embedded():
            width = engine.io.input(TIMESTEP_COND).shape[-1]
            assert isinstance(width, int)
            static[TIMESTEP_COND] = guidance_embedding(s.guidance, width, context.shape[0])
        kind = self.spec.time_ids
        if kind.width:
            pos, neg = time_ids(kind, (s.height, s.width), s.sizes, img2img=s.mode != "txt2img")
            n = cond.context.shape[0]
            static[TIME_IDS] = torch.cat([neg.expand(n, -1), pos.expand(n, -1)]) if cfg else pos.expand(n, -1)
        static = {k: v.to(engine.device) for k, v in static.items()}

        def unet(x: torch.Tensor, t: float) -> torch.Tensor:
            sample = x if extra is None else torch.cat([x, extra], dim=1)
            feed = {SAMPLE: sample.to(engine.device),
                    TIMESTEP: torch.full((x.shape[0],), t, dtype=torch.float32, device=engine.device), **static}
            with timer.stage("unet"):
                out = engine.run(feed)[OUT_SAMPLE]
            return out.to(x.device)

        return guided(unet, s.guidance, s.guidance_rescale) if cfg else unet

    def _guidance_embedded(self) -> bool:
        """Whether the UNet takes the guidance scale as an input (LCM) instead of running a CFG batch."""
        return TIMESTEP_COND in self.engines["unet"].io.input_names

    # ------------------------------------------------------------------ VAE

    def encode(self, pixels: torch.Tensor, noise: SeededNoise, timer: StageTimer) -> torch.Tensor:
        """Scaled latents of images in [-1, 1]: a posterior sample (mean + std * noise) as diffusers draws it."""
        engine = self.engines["vae_encoder"]
        with timer.stage("vae_encoder"):
            params = engine.run({IMAGES: pixels.to(engine.device)})[LATENT_PARAMETERS].to(self.device)
        mean, logvar = params.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        sample = mean + std * noise(tuple(mean.shape)).to(mean)
        return (sample - self.engines.vae_shift_factor) * self.engines.vae_scaling_factor

    def decode(self, latents: torch.Tensor, timer: StageTimer) -> torch.Tensor:
        """Images in [-1, 1] (N, 3, H, W) from scaled latents, in chunks the decoder's batch range allows."""
        engine = self.engines["vae_decoder"]
        z = latents / self.engines.vae_scaling_factor + self.engines.vae_shift_factor
        limit = engine.io.dims["batch"].max if "batch" in engine.io.dims else z.shape[0]
        out = []
        for start in range(0, z.shape[0], limit):
            with timer.stage("vae_decoder"):
                out.append(engine.run({LATENT: z[start:start + limit].to(engine.device)})[IMAGES].to(self.device))
        return torch.cat(out)


def _step_callback(callback: ProgressCallback | None, plan: Any) -> Callable[[int, float, torch.Tensor], None] | None:
    if callback is None:
        return None
    total = len(plan.sigmas) - 1

    def on_step(i: int, _sigma: float, _x: torch.Tensor) -> None:
        callback(i + 1, total)

    return on_step


INT_FIELDS = ("steps", "width", "height", "seed", "num_images_per_prompt")
NUMBER_FIELDS = ("guidance", "strength", "denoising_start", "denoising_end", "guidance_rescale")


def request_from_kwargs(kwargs: dict[str, Any]) -> GenerationRequest:
    """A GenerationRequest from keyword settings; InvalidRequest naming unknown or missing ones."""
    unknown = set(kwargs) - set(GenerationRequest.__dataclass_fields__)
    if unknown:
        raise InvalidRequest(f"unknown generation setting(s) {', '.join(sorted(unknown))}")
    if kwargs.get("prompt") is None:
        raise InvalidRequest("a generation request needs a prompt: a string or a list of strings")
    return GenerationRequest(**kwargs)


def check_request(request: Any) -> None:
    """InvalidRequest unless `request` is a GenerationRequest whose settings have the right types."""
    if not isinstance(request, GenerationRequest):
        raise InvalidRequest(f"expected a GenerationRequest (or prompt=... keywords), got {type(request).__name__}")
    if request.prompt is None or not isinstance(request.prompt, (str, list, tuple)):
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


def _guidance_rescale(value: float | None) -> float:
    """A guidance_rescale in [0, 1], None: 0 (off) (Lin et al. 2023 recommend 0.7 with zero-SNR schedules)."""
    rescale = float(value or 0.0)
    if not 0.0 <= rescale <= 1.0:  # also false for NaN
        raise InvalidRequest(f"guidance_rescale must be in [0, 1] (0: off; 0.7 is the paper's choice), got {value}")
    return rescale


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


# ---------------------------------------------------------------------------- API


def load_pipeline(folder: str | os.PathLike[str], backend: str | None = None, device: torch.device | str = "cpu",
                  refiner: str | os.PathLike[str] | Pipeline | None = None,
                  providers: Sequence[Any] | None = None) -> Pipeline:
    """A pipeline over the engines in `folder` (engine folder, ONNX export, or checkpoint with backend "torch")."""
    if not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder):
        raise InvalidRequest(f"give the folder of an engine set or ONNX export (a path), got {folder!r}")
    if refiner is not None and not isinstance(refiner, (str, os.PathLike, Pipeline)):
        raise InvalidRequest(f"refiner must be a folder path or a Pipeline, got {type(refiner).__name__}")
    engines = load_engines(folder, backend=backend, device=device, providers=providers)
    ref = refiner if isinstance(refiner, Pipeline) or refiner is None else \
        Pipeline(load_engines(refiner, backend=backend, device=device, providers=providers))
    return Pipeline(engines, refiner=ref)


LOAD_KEYS = ("backend", "device", "refiner", "providers")


def generate(folder: str | os.PathLike[str], prompt: str | list[str], **kwargs: Any) -> GenerationResult:
    """One-call generation: `generate("engines/", "a red fox", steps=20, seed=1, backend="onnxruntime")`."""
    load = {k: kwargs.pop(k) for k in LOAD_KEYS if k in kwargs}
    request = request_from_kwargs({"prompt": prompt, **kwargs})
    check_request(request)
    pipe = load_pipeline(folder, **load)
    try:
        return pipe.generate(request)
    finally:
        pipe.close()
