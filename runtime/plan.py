"""Sampling plans: a Recipe (runtime/scheduler_config.py) sliced for one request, run in diffusers' latent conventions.

A `SamplingPlan` holds everything one denoising run needs as plain values: the sampler function
and its options, the sigmas, the UNet timestep of each step, and how diffusers' scheduler holds
its latents. Euler-family schedulers keep latents in sigma space (x = x0 + sigma * eps); DDIM,
PNDM, DPM-Solver, ... keep x_t = x / sqrt(sigma^2 + 1). The plan converts at its edges, so callers
only ever see diffusers' latents: the tensor a diffusers pipeline starts its loop with, and the
tensor it hands to the VAE (or to the refiner).

img2img `strength` (StableDiffusionImg2ImgPipeline.get_timesteps) and the SDXL base -> refiner
split (`denoising_end` in StableDiffusionXLPipeline, `denoising_start` in
StableDiffusionXLImg2ImgPipeline) are pure slicing of the recipe's discretization.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from latentrt.errors import InvalidRequest
from latentrt.families import NoiseSchedule, Prediction, SamplerId, Spacing

from .denoisers import Model, X0Transform, make_denoiser
from .samplers import NoiseSource
from .scheduler_config import (
    SAMPLER_CLASSES,
    LatentSpace,
    Recipe,
    SamplerFn,
    parse_sampler,
    pipeline_fixes,
    recipe_for,
)
from .schedules import sigma_to_timestep

PlanCallback = Callable[[int, float, torch.Tensor], None]  # (step index, UNet timestep, latents after the step)
# (step index, UNet timestep, latents after the step) -> the latents the next step starts from (inpainting's blend)
StepHook = Callable[[int, float, torch.Tensor], torch.Tensor]
# diffusers' order-2 schedulers: scheduler.step runs twice per step (a first stage, then the correction) and a
# pipeline loop edits its latents after each call, between a step's two stages, where no hook here reaches
MIDSTEP_EDIT_SAMPLERS = frozenset({SamplerId.HEUN, SamplerId.DPM_2, SamplerId.DPM_2_ANCESTRAL, SamplerId.DPMPP_SDE})


@dataclass(frozen=True)
class SamplingPlan:
    """One denoising run in diffusers' conventions: sampler, sigmas, UNet timesteps and the latent space at the edges."""

    sampler: SamplerId
    prediction: Prediction
    sigmas: tuple[float, ...]  # noise level at each step, then the level the last step lands on
    timesteps: tuple[float, ...]  # UNet timestep fed at each step; len(sigmas) - 1 of them
    init_noise_sigma: float  # diffusers' scheduler.init_noise_sigma: txt2img latents = noise * this
    fn: SamplerFn
    schedule: NoiseSchedule  # log-sigma interpolation of timesteps between grid points
    timestep_of: Mapping[float, float] = field(default_factory=dict)  # grid sigma -> the timestep diffusers feeds
    options: Mapping[str, Any] = field(default_factory=dict)  # keyword options for fn (per-step ones sliced)
    space: LatentSpace = LatentSpace.SIGMA
    x0_transform: X0Transform | None = None

    def __post_init__(self) -> None:
        assert len(self.timesteps) == len(self.sigmas) - 1 >= 1, "a plan has at least one step"

    @property
    def steps(self) -> int:
        """Number of steps this plan runs (second-order samplers call the UNet about twice per step)."""
        return len(self.timesteps)

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """txt2img starting latents from standard normal `noise`, as diffusers' prepare_latents makes them."""
        return noise * self.init_noise_sigma

    def noised(self, latents: torch.Tensor, noise: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        """Clean `latents` noised to `sigma` (default: the first step's; img2img / inpaint start), as
        diffusers' scheduler.add_noise at that step's timestep: x0 + sigma * eps, or its x_t form."""
        sigma = self.sigmas[0] if sigma is None else sigma
        return self._from_sigma_space(latents + noise * sigma, sigma)

    def check_step_edits(self, why: str) -> None:
        """InvalidRequest if this plan's sampler has two stages per step (`run` with `after_step` cannot match diffusers)."""
        if self.sampler in MIDSTEP_EDIT_SAMPLERS:
            raise InvalidRequest(f"{why} does not work with the second-order sampler {self.sampler.value} (diffusers "
                                 "edits the latents between the two stages of its steps): choose another --sampler, "
                                 "e.g. euler or dpmpp_2m")

    def sigma_to_t(self, sigma: float) -> float:
        """The UNet timestep at `sigma`: diffusers' own on the grid, log-sigma interpolation between grid points."""
        t = self.timestep_of.get(sigma)
        return t if t is not None else sigma_to_timestep(sigma, self.schedule)

    def run(
        self, model: Model, x: torch.Tensor, noise: NoiseSource, callback: PlanCallback | None = None,
        after_step: StepHook | None = None,
    ) -> torch.Tensor:
        """Denoise diffusers-space latents `x` with `model`; return the latents diffusers hands to the VAE.

        `callback(i, t, latents)` is called after step i with that step's UNet timestep and the latents
        as diffusers' loop holds them after the step. `after_step(i, t, latents)`, if given, returns the
        latents step i + 1 starts from (and, after the last step, the result), as a diffusers pipeline
        loop rewrites its latents between scheduler.step calls: the sampler's own history (earlier
        model outputs) is kept as it was. Not for second-order samplers (`check_step_edits`).
        """
        if after_step is not None:
            self.check_step_edits("editing the latents between steps")
        denoise = make_denoiser(model, self.prediction, self.sigma_to_t, self.x0_transform)

        def on_step(i: int, sigma: float, x_sigma: torch.Tensor) -> torch.Tensor | None:
            latents = self._from_sigma_space(x_sigma, sigma)
            if after_step is not None:
                latents = after_step(i, self.timesteps[i], latents)
            if callback is not None:
                callback(i, self.timesteps[i], latents)
            return None if after_step is None else self._to_sigma_space(latents, sigma)

        x_sigma = self._to_sigma_space(x, self.sigmas[0])
        hooked = callback is not None or after_step is not None
        out = self.fn(denoise, x_sigma, list(self.sigmas), noise, on_step if hooked else None, **self.options)
        return self._from_sigma_space(out, self.sigmas[-1])

    def _to_sigma_space(self, latents: torch.Tensor, sigma: float) -> torch.Tensor:
        """Diffusers' latents at noise level sigma -> x in sigma space."""
        return latents * math.sqrt(sigma**2 + 1) if self.space == LatentSpace.VP else latents

    def _from_sigma_space(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x in sigma space at noise level sigma -> diffusers' latents."""
        return x / math.sqrt(sigma**2 + 1) if self.space == LatentSpace.VP else x


# ---------------------------------------------------------------------------- slicing


def _cutoff(fraction: float, n_train: int) -> int:
    """diffusers' discrete_timestep_cutoff for denoising_start / denoising_end."""
    return int(round(n_train - fraction * n_train))


def _first_step(ts: tuple[float, ...], steps: int, n_train: int, strength: float | None,
                denoising_start: float | None) -> int:
    """Index of the first step run: img2img strength, or the refiner's denoising_start."""
    if denoising_start is not None:
        return len(ts) - sum(t < _cutoff(denoising_start, n_train) for t in ts)
    if strength is not None:
        return max(steps - min(int(steps * strength), steps), 0)
    return 0


def _stop_step(ts: tuple[float, ...], start: int, n_train: int, denoising_end: float | None) -> int:
    """Index after the last step run: the SDXL base's denoising_end keeps timesteps t >= cutoff."""
    if denoising_end is None:
        return len(ts)
    return start + sum(t >= _cutoff(denoising_end, n_train) for t in ts[start:])


def _second_order_split(calls: tuple[float, ...], n_train: int, start: int, stop: int,
                        denoising_start: float | None, denoising_end: float | None) -> tuple[int, int, bool]:
    """(start, stop, half last step) of a base / refiner split as diffusers' SDXL pipelines cut an order-2 schedule.

    They count UNet calls, not steps (two per step but the last): StableDiffusionXLPipeline keeps the
    calls with t >= cutoff, which can end after a step's first (Euler) stage; StableDiffusionXLImg2Img-
    Pipeline.get_timesteps rounds an even count of calls t < cutoff up by one, so the refiner can
    start one step early and repeat it from where the base stopped. Reproduced, not corrected.
    """
    if denoising_start is not None:
        count = sum(t < _cutoff(denoising_start, n_train) for t in calls)
        start = (len(calls) - (count + 1 if count % 2 == 0 else count)) // 2
    half = False
    if denoising_end is not None:
        kept = sum(t >= _cutoff(denoising_end, n_train) for t in calls)
        stop, half = (kept + 1) // 2, kept % 2 == 1 and kept < len(calls)
    return start, stop, half


def check_fraction(name: str, value: float | None, upper_inclusive: bool = False) -> None:
    """A strength / denoising fraction must lie in (0, 1) (or (0, 1] for strength)."""
    if value is None or (0 < value < 1) or (upper_inclusive and value == 1):
        return
    raise InvalidRequest(f"{name} must be a fraction in (0, 1{']' if upper_inclusive else ')'}, got {value}")


def _validate(steps: int, strength: float | None, denoising_start: float | None, denoising_end: float | None,
              eta: float) -> None:
    """Reject settings a user can get wrong, with what to change."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 10_000:
        raise InvalidRequest(f"steps must be an integer from 1 to 10000, got {steps!r}")
    check_fraction("strength", strength, upper_inclusive=True)
    check_fraction("denoising_start", denoising_start)
    check_fraction("denoising_end", denoising_end)
    if strength is not None and denoising_start is not None:
        raise InvalidRequest("give either strength or denoising_start (the refiner's start), not both")
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise InvalidRequest(f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end})")
    if not 0 <= eta <= 1:
        raise InvalidRequest(f"eta must be in [0, 1], got {eta}")


def _accepts(fn: SamplerFn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def plan_recipe(recipe: Recipe, steps: int, *, strength: float | None = None, denoising_start: float | None = None,
                denoising_end: float | None = None, eta: float = 0.0) -> SamplingPlan:
    """Slice a recipe's full schedule for img2img strength / the refiner handoff and bind the request's eta."""
    grid, n_train = recipe.grid, recipe.schedule.num_train_timesteps
    if steps > n_train:
        raise InvalidRequest(f"steps must be an integer from 1 to {n_train} (num_train_timesteps), got {steps}")
    start = _first_step(grid.timesteps, steps, n_train, strength, denoising_start)
    stop = _stop_step(grid.timesteps, start, n_train, denoising_end)
    if recipe.unsliceable is not None and (start, stop) != (0, grid.steps):
        raise InvalidRequest(f"scheduler_config.json: {recipe.sampler.value} with {recipe.unsliceable} cannot run part "
                             "of its schedule (img2img strength < 1, refiner handoff); change that setting or choose "
                             "another --sampler")
    half_last = False
    if recipe.call_timesteps is not None and (denoising_start is not None or denoising_end is not None):
        start, stop, half_last = _second_order_split(recipe.call_timesteps, n_train, start, stop, denoising_start,
                                                     denoising_end)
    if stop <= start:
        raise InvalidRequest(
            f"no denoising step would run with steps={steps}, strength={strength}, denoising_start="
            f"{denoising_start}, denoising_end={denoising_end}: raise steps (steps * strength must reach 1)"
        )
    part = grid.slice(start, stop)
    options = {**recipe.options, **part.step_options}
    if _accepts(recipe.fn, "eta"):
        options["eta"] = eta  # diffusers' prepare_extra_step_kwargs passes eta to any step() that takes it
    elif eta > 0:
        raise InvalidRequest(f"eta applies to samplers with a stochastic DDIM-style step (ddim), "
                             f"not {recipe.sampler.value}")
    if _accepts(recipe.fn, "history"):
        options["history"] = grid.sigmas[:start]
    if half_last:
        options["half_last_step"] = True
    return SamplingPlan(
        sampler=recipe.sampler, prediction=recipe.prediction, sigmas=part.sigmas, timesteps=part.timesteps,
        init_noise_sigma=recipe.init_noise_sigma, fn=recipe.fn, schedule=recipe.schedule,
        timestep_of=grid.timestep_map(), options=options, space=recipe.space, x0_transform=recipe.x0_transform,
    )


def plan_from_scheduler_config(
    config: Mapping[str, Any],
    sampler: SamplerId | str | None,
    steps: int,
    *,
    strength: float | None = None,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
    eta: float = 0.0,
    pipeline_fixes_scheduler: bool = False,
) -> SamplingPlan:
    """Plan from a diffusers scheduler_config.json dict, as `<sampler's scheduler class>.from_config(config)` would.

    Args:
        config: the checkpoint's scheduler_config.json (untrusted: every key is checked where read).
        sampler: a SamplerId / name, or None for the config's own scheduler class.
        steps: num_inference_steps; img2img runs fewer (see strength).
        strength: img2img / inpaint strength in (0, 1]: runs the last min(int(steps * strength), steps)
            steps; start from `SamplingPlan.noised`. Raises InvalidRequest when no step would run.
        denoising_start: SDXL refiner handoff in (0, 1): runs the steps with t < round(T - start * T),
            starting from the base's latents as they are (do not call `noised`). Excludes strength.
        denoising_end: SDXL base handoff in (0, 1): stops after the steps with t >= round(T - end * T).
        eta: DDIM's stochasticity in [0, 1] (passed to samplers that take it, as diffusers does).
        pipeline_fixes_scheduler: apply StableDiffusionPipeline's load-time rewrite of the config
            (steps_offset -> 1, clip_sample -> False) first, as an SD 1.x / 2.x pipeline does.
    """
    _validate(steps, strength, denoising_start, denoising_end, eta)
    if pipeline_fixes_scheduler:
        config = pipeline_fixes(config)[0]
    recipe = recipe_for(config, None if sampler is None else parse_sampler(sampler), steps)
    return plan_recipe(recipe, steps, strength=strength, denoising_start=denoising_start,
                       denoising_end=denoising_end, eta=eta)


def plan_sampling(
    sampler: SamplerId | str,
    steps: int,
    *,
    schedule: NoiseSchedule,
    prediction: Prediction | str,
    spacing: Spacing | str,
    steps_offset: int = 1,
    strength: float | None = None,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
    eta: float = 0.0,
    karras: bool = False,
    set_alpha_to_one: bool = False,
) -> SamplingPlan:
    """Plan with explicit settings: the scheduler config those settings make, then `plan_from_scheduler_config`.

    `karras` sets use_karras_sigmas (classes that have it); `set_alpha_to_one` lands DDIM / PNDM on abar = 1.
    """
    sampler_id = parse_sampler(sampler)
    cls = SAMPLER_CLASSES[sampler_id][0]
    if karras and "use_karras_sigmas" not in cls.defaults:
        raise InvalidRequest(f"karras=True needs a sampler with Karras sigmas, not {sampler_id.value}")
    for name, value, enum in (("prediction", prediction, Prediction), ("timestep spacing", spacing, Spacing)):
        if value not in {e.value for e in enum}:
            raise InvalidRequest(f"unknown {name} {value!r}; choose one of: {', '.join(e.value for e in enum)}")
    config = {
        "beta_start": schedule.beta_start, "beta_end": schedule.beta_end, "beta_schedule": schedule.beta_schedule,
        "num_train_timesteps": schedule.num_train_timesteps, "trained_betas": schedule.trained_betas,
        "rescale_betas_zero_snr": schedule.rescale_zero_snr, "prediction_type": Prediction(prediction).value,
        "timestep_spacing": Spacing(spacing).value, "steps_offset": steps_offset, "clip_sample": False,
        "set_alpha_to_one": set_alpha_to_one, "use_karras_sigmas": karras,
    }
    return plan_from_scheduler_config(config, sampler_id, steps, strength=strength, denoising_start=denoising_start,
                                      denoising_end=denoising_end, eta=eta)
