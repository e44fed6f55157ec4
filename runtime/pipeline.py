"""Engines -> images: encode prompts, sample latents, decode; txt2img, img2img, inpainting, SDXL refiner, Turbo.

The pipeline reproduces the diffusers pipelines (StableDiffusion[Img2Img|Inpaint]Pipeline,
StableDiffusionXL[Img2Img]Pipeline) step for step, including the order in which they draw from
the seeded CPU generator, so the same seed gives the same image on every backend:

- txt2img: initial latents (N, C, h, w), then the sampler's per-step noise.
- img2img: the VAE posterior sample of the init image first, then the noise added to it.
- inpainting (9-channel UNet): [strength < 1: the init image's posterior sample], the initial
  noise, then the masked image's posterior sample (its latents are a UNet input).
- legacy inpainting (a mask on a model whose UNet takes none, StableDiffusionInpaintPipeline with a
  4-channel UNet): the init image's posterior sample, the initial noise, then the masked image's
  posterior draw (unused). After every step the latents outside the mask are replaced by the image
  latents noised, with that initial noise, to the next step's level (clean after the last step).
- SDXL base + refiner: the base stops at `denoising_end`; its latents (not decoded) continue in
  the refiner from the same fraction, with the same generator.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from latentrt.buckets import SideRanges
from latentrt.choices import Mode, OutputType
from latentrt.configs import check_scheduler_config
from latentrt.errors import InvalidRequest
from latentrt.families import MASK, MASKED_IMAGE_LATENTS
from latentrt.memory import architecture, available_bytes, check_fits, estimate_bytes
from latentrt.names import DIM_BATCH, DIM_LATENT_HEIGHT, DIM_LATENT_WIDTH
from latentrt.tensors import (
    IMAGES,
    LATENT,
    LATENT_PARAMETERS,
    OUT_SAMPLE,
    SAMPLE,
    TIMESTEP,
    context_windows,
    shape_of,
)

from .conditioning import TextConditioning, encode_prompts
from .denoisers import Model, guided
from .engine_set import EngineSet, check_refiner, load_engines
from .images import float_to_pil, image_to_tensor, mask_to_tensor, tensor_to_float
from .plan import SamplingPlan, StepHook, plan_from_scheduler_config
from .providers import FeedContext, concat_channels, conditioning_feed, prepare_concat, runs_cfg
from .request import (  # noqa: F401 (re-exported: the request API has always been importable from here)
    DEFAULT_IMG2IMG_STRENGTH,
    PIXEL_MULTIPLE,
    GenerationRequest,
    ResolvedRequest,
    check_request,
    covers,
    parse_aspect,
    pixel_ranges,
    request_from_kwargs,
    resolve,
)
from .samplers import SeededNoise
from .scheduler_config import pipeline_fixes
from .step_cache import OFF, CachedUNet, check_step_cache, step_cache_engines
from .timing import StageTimer, TimingRecord
from .tiny_vae import tiny_decoder, tiny_vae_spec
from .unclip import image_condition

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (steps done, steps in this stage)
DEFAULT_REFINER_SWITCH = 0.8  # fraction of the noise schedule the base denoises before the refiner takes over


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
        return resolve(request, self.engines)

    def pixel_ranges(self) -> SideRanges:
        """((min, max) height, (min, max) width) in pixels that every engine takes."""
        return pixel_ranges(self.engines)

    def _covers(self, size: tuple[int, int]) -> bool:
        """Whether every engine takes images of `size` (height, width) pixels."""
        return covers(self.engines, size)

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
        chunk = min(batch, decoder.io.dims[DIM_BATCH].max) if decoder and DIM_BATCH in decoder.io.dims else batch
        need = estimate_bytes(architecture(self.spec, es.dims.extra if es.dims else None),
                              unet_rows=batch * (2 if cfg else 1), decode_batch=chunk if decode else 0,
                              latent_height=height // f, latent_width=width // f,
                              fused_attention=es.backend == "torch")
        return need if decode else {"unet": need["unet"]}

    def check(self, request: GenerationRequest) -> None:
        """Raise what `generate` would raise for a bad request or one beyond memory, without doing any work."""
        settings, _ = self.resolve(request)
        self._plan(settings)
        if settings.tiny_vae and settings.output_type is OutputType.PIL:
            tiny_vae_spec((request.refiner or self.refiner or self).engines)  # the pipeline that decodes
        self.check_memory(settings, request.refiner or self.refiner, decode=settings.output_type is OutputType.PIL)

    def check_memory(self, s: ResolvedRequest, refiner: Pipeline | None = None, decode: bool = True) -> None:
        """TooLarge before any work when the request needs more memory than is available, with the estimate
        and the largest size of the same aspect that fits."""
        cfg = runs_cfg(self.spec, self.engines["unet"].io, s.guidance)
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
        if refiner is not None and self._blends(settings):
            raise InvalidRequest(f"inpainting with {self.spec.name} (no mask input) blends the image back after "
                                 "every step; the refiner does not: inpaint without --refiner")
        if refiner is not None and settings.denoising_end is None:
            settings.denoising_end = DEFAULT_REFINER_SWITCH
        if refiner is not None and settings.step_cache != OFF:
            step_cache_engines(refiner.engines)  # the refiner caches too: refused before the base runs
        decode = settings.output_type is OutputType.PIL
        if decode and settings.tiny_vae:
            tiny_vae_spec((refiner or self).engines)  # MissingComponent before any work (the refiner decodes if any)
        self.check_memory(settings, refiner, decode=decode)
        noise = SeededNoise(settings.seed, self.device)
        timer = StageTimer(self.device)
        with timer.stage("total"):
            latents, sampler = self.denoise(settings, noise, timer, callback)
            pipe, refiner_sampler = self, None
            if refiner is not None:
                pipe = refiner
                latents, refiner_sampler = refiner.refine(settings, latents, noise, timer, callback)
            array = None
            if decode:
                with timer.prefixed("refiner_" if pipe is refiner else ""):
                    array = tensor_to_float(pipe.decode(latents, timer, tiny_vae=settings.tiny_vae))
        images = float_to_pil(array) if array is not None else []
        result_settings = settings.settings(self.engines) | {"sampler": sampler}
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
        settings = replace(base, mode=Mode.CONTINUE, strength=None, denoising_start=base.denoising_end,
                           denoising_end=None, image=None, mask=None, latents=latents)
        with timer.prefixed("refiner_"):
            return self.denoise(settings, noise, timer, callback)

    def denoise(self, s: ResolvedRequest, noise: SeededNoise, timer: StageTimer,
                callback: ProgressCallback | None = None) -> tuple[torch.Tensor, str]:
        """Encode the prompts, prepare latents (drawing noise in diffusers' order) and run the sampler.

        Returns (latents, the sampler that ran: `s.sampler`, else this model's scheduler config's own).
        """
        es = self.engines
        plan = self._plan(s, log_fixes=True)
        cfg = runs_cfg(self.spec, es["unet"].io, s.guidance)
        text = self._encode_prompts(s, cfg, timer) if self.spec.text_encoders else None
        shape = self.latent_shape(s.batch, s.height, s.width)
        info = es.dims.extra if es.dims else {}
        # issue 12 (H3): pieces drawn before the initial latents (the x4 upscaler's noised low-res image)
        prepared = prepare_concat(self.spec, FeedContext(s, cfg, info, text, shape, self.device), noise)
        embeds = image_condition(es, s, noise, timer)  # issue 12 (H4): drawn before the latents, as diffusers
        x, images, blend = self._initial(s, plan, noise, timer, shape)
        images = {**prepared, **images, **embeds}
        model = self._unet_model(FeedContext(s, cfg, info, text, shape, self.device, images=images), timer)
        out = plan.run(model, x, noise, callback=_step_callback(callback, plan), after_step=blend)
        return out, plan.sampler.value

    def _blends(self, s: ResolvedRequest) -> bool:
        """Whether `s` is legacy inpainting: a mask for a UNet that takes none (blended after every step)."""
        return s.mode is Mode.INPAINT and not self.spec.takes_mask

    def _plan(self, s: ResolvedRequest, log_fixes: bool = False) -> SamplingPlan:
        """The sampling plan of a request, from this model's scheduler config (InvalidRequest if it cannot run)."""
        fixes = self.spec.pipeline_fixes_scheduler
        if fixes and log_fixes:
            for note in pipeline_fixes(self.engines.scheduler_config)[1]:
                log.info("%s", note)
        plan = plan_from_scheduler_config(self.engines.scheduler_config, s.sampler, s.steps, strength=s.strength,
                                          denoising_start=s.denoising_start, denoising_end=s.denoising_end,
                                          pipeline_fixes_scheduler=fixes)
        check_step_cache(s.step_cache, plan, self.engines)
        if self._blends(s):
            plan.check_step_edits(f"inpainting with {self.spec.name} (no mask input: the image is blended back "
                                "after every step, as diffusers does)")
        return plan

    def _encode_prompts(self, s: ResolvedRequest, cfg: bool, timer: StageTimer) -> TextConditioning:
        """The prompts' text conditioning (negatives too when `cfg`), in at most the windows the UNet takes."""
        es = self.engines
        windows = context_windows(es["unet"].io)
        return encode_prompts(self.spec, es, es.tokenizers, s.prompts, s.negative, cfg=cfg,
                              num_images_per_prompt=s.num_images_per_prompt,
                              zero_empty_negative=es.force_zeros_for_empty_prompt, timer=timer,
                              weighting=s.prompt_weighting, max_windows=windows[1] if windows else None)

    def _initial(self, s: ResolvedRequest, plan: SamplingPlan, noise: SeededNoise, timer: StageTimer,
                 shape: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor], StepHook | None]:
        """(initial latents, encoded images for the UNet's concatenated pieces, the legacy inpainting blend),
        drawing noise in diffusers' order."""
        if s.mode is Mode.CONTINUE:
            assert s.latents is not None
            return s.latents.to(self.device, torch.float32), {}, None
        if s.mode is Mode.TXT2IMG:
            return plan.initial_latents(noise(shape)), {}, None
        assert s.image is not None
        pixels = image_to_tensor(s.image, s.height, s.width).to(self.device)
        if s.mode is Mode.IMG2IMG:
            image_latents = self.encode(pixels, noise, timer).expand(shape)
            return plan.noised(image_latents, noise(shape)), {}, None
        if self._blends(s):
            return self._legacy_inpaint_initial(s, plan, noise, timer, pixels, shape)
        return (*self._inpaint_initial(s, plan, noise, timer, pixels, shape), None)

    def _legacy_inpaint_initial(self, s: ResolvedRequest, plan: SamplingPlan, noise: SeededNoise, timer: StageTimer,
                                pixels: torch.Tensor, shape: tuple[int, ...]
                                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], StepHook]:
        """StableDiffusionInpaintPipeline with a 4-channel UNet: image latents, noise, [masked image draw]; the blend."""
        assert s.mask is not None and s.strength is not None
        image_latents = self.encode(pixels, noise, timer).expand(shape)  # drawn whatever the strength
        start = noise(shape)
        x = plan.initial_latents(start) if s.strength >= 1.0 else plan.noised(image_latents, start)
        # diffusers also encodes the masked image (unused by a 4-channel UNet): draw its posterior noise only
        noise((pixels.shape[0], *shape[1:]))
        mask = mask_to_tensor(s.mask, s.height, s.width).to(self.device)  # (1, 1, H, W), 1 = repaint
        repaint = torch.nn.functional.interpolate(mask, size=shape[-2:])  # nearest, as prepare_mask_latents
        last = plan.steps - 1

        def blend(i: int, _t: float, latents: torch.Tensor) -> torch.Tensor:
            known = image_latents if i == last else plan.noised(image_latents, start, plan.sigmas[i + 1])
            return (1 - repaint) * known + repaint * latents

        return x, {}, blend

    def _inpaint_initial(self, s: ResolvedRequest, plan: SamplingPlan, noise: SeededNoise, timer: StageTimer,
                         pixels: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """StableDiffusionInpaintPipeline's order: [image latents], noise, masked-image latents."""
        assert s.mask is not None and s.strength is not None
        full = s.strength >= 1.0
        image_latents = None if full else self.encode(pixels, noise, timer).expand(shape)
        start = noise(shape)
        x = plan.initial_latents(start) if image_latents is None else plan.noised(image_latents, start)
        mask = mask_to_tensor(s.mask, s.height, s.width).to(self.device)  # (1, 1, H, W), 1 = repaint
        masked = self.encode(pixels * (mask < 0.5), noise, timer)  # (1, C, h, w)
        return x, {MASK.name: mask, MASKED_IMAGE_LATENTS.name: masked}

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """The shape of `batch` latents for height x width pixels, read from the decoder's IO spec."""
        f = self.engines.vae_scale_factor
        sizes = {DIM_BATCH: batch, DIM_LATENT_HEIGHT: height // f, DIM_LATENT_WIDTH: width // f}
        return shape_of(self.engines["vae_decoder"].io.input(LATENT), sizes)

    def _unet_model(self, ctx: FeedContext, timer: StageTimer) -> Model:
        """The model the sampler calls: (x * c_in, t) -> eps / v, one UNet call per step (CFG doubled).

        The feed comes from the family's declared conditioning inputs and concatenated pieces
        (`latentrt.runtime.providers`); an LCM-distilled UNet embeds the guidance scale and runs no CFG batch.
        """
        engine = self.engines["unet"]
        static = {k: v.to(engine.device) for k, v in conditioning_feed(self.spec, engine.io, ctx).items()}
        extra = concat_channels(self.spec, ctx)  # (rows, channels, h, w) or None
        interval = ctx.request.step_cache
        cached = CachedUNet(*step_cache_engines(self.engines), interval, timer) if interval != OFF else None

        def unet(x: torch.Tensor, t: float) -> torch.Tensor:
            sample = x if extra is None else torch.cat([x, extra], dim=1)
            feed = {SAMPLE: sample.to(engine.device),
                    TIMESTEP: torch.full((x.shape[0],), t, dtype=torch.float32, device=engine.device), **static}
            out = engine.run(feed, timer)[OUT_SAMPLE] if cached is None else cached(feed)
            return out.to(x.device)

        return guided(unet, ctx.request.guidance, ctx.request.guidance_rescale) if ctx.cfg else unet

    # ------------------------------------------------------------------ VAE

    def encode(self, pixels: torch.Tensor, noise: SeededNoise, timer: StageTimer) -> torch.Tensor:
        """Scaled latents of images in [-1, 1]: a posterior sample (mean + std * noise) as diffusers draws it."""
        engine = self.engines["vae_encoder"]
        out = engine.run({IMAGES: pixels.to(engine.device)}, timer)
        if LATENT_PARAMETERS not in out:  # issue 12, H1: a VQ encoder gives its latents (the decoder quantizes)
            return (out[LATENT].to(self.device) - self.engines.vae_shift_factor) * self.engines.vae_scaling_factor
        params = out[LATENT_PARAMETERS].to(self.device)
        mean, logvar = params.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        sample = mean + std * noise(tuple(mean.shape)).to(mean)
        return (sample - self.engines.vae_shift_factor) * self.engines.vae_scaling_factor

    def decode(self, latents: torch.Tensor, timer: StageTimer, tiny_vae: bool = False) -> torch.Tensor:
        """Images in [-1, 1] (N, 3, H, W) from scaled latents, in chunks the decoder's batch range allows;
        `tiny_vae`: with the tiny VAE decoder (TAESD), latents divided by its own scaling factor (runtime/tiny_vae.py)."""
        if tiny_vae:
            engine, scaling = tiny_decoder(self.engines)
            z = latents / scaling
        else:
            engine = self.engines["vae_decoder"]
            z = latents / self.engines.vae_scaling_factor + self.engines.vae_shift_factor
        limit = engine.io.dims[DIM_BATCH].max if DIM_BATCH in engine.io.dims else z.shape[0]
        out = []
        for start in range(0, z.shape[0], limit):
            out.append(engine.run({LATENT: z[start:start + limit].to(engine.device)}, timer)[IMAGES].to(self.device))
        return torch.cat(out)


def _step_callback(callback: ProgressCallback | None, plan: Any) -> Callable[[int, float, torch.Tensor], None] | None:
    if callback is None:
        return None
    total = len(plan.sigmas) - 1

    def on_step(i: int, _sigma: float, _x: torch.Tensor) -> None:
        callback(i + 1, total)

    return on_step


# ---------------------------------------------------------------------------- API


def load_pipeline(folder: str | os.PathLike[str], backend: str | None = None, device: torch.device | str = "cpu",
                  refiner: str | os.PathLike[str] | Pipeline | None = None,
                  providers: Sequence[Any] | None = None, config: str | os.PathLike[str] | None = None) -> Pipeline:
    """A pipeline over the engines in `folder` (engine folder, ONNX export, or checkpoint with backend "torch").

    `config`: for a single-file checkpoint, the diffusers folder (or hub id) describing it (`load_engines`).
    """
    if not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder):
        raise InvalidRequest(f"give the folder of an engine set or ONNX export (a path), got {folder!r}")
    if refiner is not None and not isinstance(refiner, (str, os.PathLike, Pipeline)):
        raise InvalidRequest(f"refiner must be a folder path or a Pipeline, got {type(refiner).__name__}")
    engines = load_engines(folder, backend=backend, device=device, providers=providers, config=config)
    ref = refiner if isinstance(refiner, Pipeline) or refiner is None else \
        Pipeline(load_engines(refiner, backend=backend, device=device, providers=providers))
    return Pipeline(engines, refiner=ref)


LOAD_KEYS = ("backend", "device", "refiner", "providers", "config")


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
