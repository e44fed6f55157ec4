"""Sampling plans: the bridge from our pure samplers to diffusers' scheduler and pipeline conventions.

A `SamplingPlan` holds everything one denoising run needs as plain floats: the sigmas, the UNet
timestep of each step, and how diffusers' pipeline holds its latents. Euler-family schedulers keep
latents in sigma space (x = x0 + sigma * eps); DDIM and DPM-Solver keep x_t = x / sqrt(sigma^2 + 1).
The plan converts at its edges, so callers only ever see diffusers' latents: the tensor a diffusers
pipeline starts its loop with, and the tensor it hands to the VAE (or to the refiner).

`plan_sampling` implements diffusers' timestep conventions per scheduler class, img2img `strength`
(StableDiffusionImg2ImgPipeline.get_timesteps) and the SDXL base -> refiner split
(`denoising_end` in StableDiffusionXLPipeline, `denoising_start` in StableDiffusionXLImg2ImgPipeline).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

from latentrt.errors import InvalidRequest
from latentrt.families import NoiseSchedule, Prediction, SamplerId, Spacing

from .denoisers import Model, make_denoiser
from .samplers import NoiseSource, sample_ddim, sample_dpmpp_2m, sample_euler, sample_euler_ancestral
from .schedules import (
    ddim_timesteps,
    discrete_timesteps,
    dpm_solver_timesteps,
    interp_sigmas,
    karras_sigmas,
    sigma_to_timestep,
    sigmas_for,
    train_sigmas,
)

PlanCallback = Callable[[int, float, torch.Tensor], None]  # (step index, UNet timestep, latents after the step)

# The diffusers scheduler each sampler reproduces, and the settings the sampler fixes on it.
_DPM = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True,
        "euler_at_final": False, "final_sigmas_type": "zero"}
DIFFUSERS_SCHEDULERS: dict[SamplerId, tuple[str, dict[str, Any]]] = {
    SamplerId.EULER: ("EulerDiscreteScheduler", {}),
    SamplerId.EULER_ANCESTRAL: ("EulerAncestralDiscreteScheduler", {}),
    SamplerId.DDIM: ("DDIMScheduler", {}),
    SamplerId.DPMPP_2M: ("DPMSolverMultistepScheduler", {**_DPM, "use_karras_sigmas": False}),
    SamplerId.DPMPP_2M_KARRAS: ("DPMSolverMultistepScheduler", {**_DPM, "use_karras_sigmas": True}),
}
_VARIANCE_PRESERVING = {SamplerId.DDIM, SamplerId.DPMPP_2M, SamplerId.DPMPP_2M_KARRAS}  # latents are x_t


@dataclass(frozen=True)
class SamplingPlan:
    """One denoising run in diffusers' conventions: sigmas, UNet timesteps and the latent space at the edges."""

    sampler: SamplerId
    prediction: Prediction
    sigmas: tuple[float, ...]  # noise level at each step, then the level the last step lands on (0.0 = clean)
    timesteps: tuple[float, ...]  # UNet timestep fed at each step; len(sigmas) - 1 of them
    init_noise_sigma: float  # diffusers' scheduler.init_noise_sigma: txt2img latents = noise * this
    targets: tuple[float, ...] | None = None  # DDIM only: level each step lands on (diffusers' t - T // n)
    eta: float = 0.0  # DDIM only: 0 deterministic, 1 DDPM-like

    def __post_init__(self) -> None:
        assert len(self.timesteps) == len(self.sigmas) - 1 >= 1, "a plan has at least one step"

    @property
    def steps(self) -> int:
        """Number of UNet evaluations (steps) this plan runs."""
        return len(self.timesteps)

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """txt2img starting latents from standard normal `noise`, as diffusers' prepare_latents makes them."""
        return noise * self.init_noise_sigma

    def noised(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """img2img / inpaint starting latents: clean `latents` noised to the first step (scheduler.add_noise)."""
        sigma = self.sigmas[0]
        return self._from_sigma_space(latents + noise * sigma, sigma)

    def run(
        self, model: Model, x: torch.Tensor, noise: NoiseSource, callback: PlanCallback | None = None
    ) -> torch.Tensor:
        """Denoise diffusers-space latents `x` with `model`; return the latents diffusers hands to the VAE.

        `callback(i, t, latents)` is called after step i with that step's UNet timestep and the latents
        as diffusers' loop holds them after `scheduler.step`.
        """
        table = dict(zip(self.sigmas, self.timesteps))
        denoise = make_denoiser(model, self.prediction, table.__getitem__)

        def on_step(i: int, sigma: float, x_sigma: torch.Tensor) -> None:
            if callback is not None:
                callback(i, self.timesteps[i], self._from_sigma_space(x_sigma, sigma))

        x_sigma = self._to_sigma_space(x, self.sigmas[0])
        sigmas, cb = list(self.sigmas), on_step if callback is not None else None
        if self.sampler == SamplerId.DDIM:
            out = sample_ddim(denoise, x_sigma, sigmas, noise, cb, eta=self.eta, targets=self.targets)
        else:
            out = _SAMPLE_FNS[self.sampler](denoise, x_sigma, sigmas, noise, cb)
        return self._from_sigma_space(out, self.sigmas[-1])

    def _to_sigma_space(self, latents: torch.Tensor, sigma: float) -> torch.Tensor:
        """Diffusers' latents at noise level sigma -> x in sigma space."""
        return latents * math.sqrt(sigma**2 + 1) if self.sampler in _VARIANCE_PRESERVING else latents

    def _from_sigma_space(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x in sigma space at noise level sigma -> diffusers' latents."""
        return x / math.sqrt(sigma**2 + 1) if self.sampler in _VARIANCE_PRESERVING else x


_SAMPLE_FNS = {
    SamplerId.EULER: sample_euler,
    SamplerId.EULER_ANCESTRAL: sample_euler_ancestral,
    SamplerId.DPMPP_2M: sample_dpmpp_2m,
    SamplerId.DPMPP_2M_KARRAS: sample_dpmpp_2m,
}


class _Grid(NamedTuple):
    """A scheduler's full schedule: per step the UNet timestep, its sigma, and the sigma the step lands on."""

    timesteps: list[float]
    sigmas: list[float]
    landing: list[float]


def _f32(values: Sequence[float] | np.ndarray) -> list[float]:
    """Round to float32 values, as diffusers stores its sigmas and timesteps."""
    return np.asarray(values, dtype=np.float32).tolist()


def _euler_grid(steps: int, spacing: Spacing, schedule: NoiseSchedule, offset: int, karras: bool) -> _Grid:
    """EulerDiscreteScheduler / EulerAncestralDiscreteScheduler.set_timesteps."""
    ts = discrete_timesteps(steps, spacing, schedule, offset)
    if not karras:
        sigmas = sigmas_for(ts, schedule)
        return _Grid(ts, sigmas, sigmas[1:] + [0.0])
    base = interp_sigmas(ts, schedule)  # float64, as diffusers feeds _convert_to_karras
    ks = karras_sigmas(base[-1], base[0], steps)[:-1]
    sigmas = _f32(ks)
    return _Grid(_f32([sigma_to_timestep(s, schedule) for s in ks]), sigmas, sigmas[1:] + [0.0])


def _ddim_landing(ts: list[float], steps: int, schedule: NoiseSchedule, set_alpha_to_one: bool) -> list[float]:
    """Where diffusers' DDIMScheduler steps to: t - T // n, whatever the spacing (or the final alpha)."""
    table = train_sigmas(schedule)
    final = 0.0 if set_alpha_to_one else table[0]
    prev = [int(t) - schedule.num_train_timesteps // steps for t in ts]
    return [table[p] if p >= 0 else final for p in prev]


def _ddim_grid(steps: int, spacing: Spacing, schedule: NoiseSchedule, offset: int, set_alpha_to_one: bool) -> _Grid:
    """DDIMScheduler.set_timesteps and its step targets."""
    ts = ddim_timesteps(steps, spacing, schedule, offset)
    table = train_sigmas(schedule)
    if ts[0] >= len(table):  # leading spacing + offset can pass T - 1; diffusers fails with an IndexError there
        raise InvalidRequest(f"ddim with {steps} leading-spaced steps and steps_offset {offset} reaches t={ts[0]:.0f}, "
                             f"beyond the {len(table)} training timesteps; use fewer steps")
    return _Grid(ts, [table[int(t)] for t in ts], _ddim_landing(ts, steps, schedule, set_alpha_to_one))


def _dpm_grid(steps: int, spacing: Spacing, schedule: NoiseSchedule, offset: int, karras: bool) -> _Grid:
    """DPMSolverMultistepScheduler.set_timesteps (Karras sigmas span the whole training range, t rounded)."""
    if not karras:
        ts = dpm_solver_timesteps(steps, spacing, schedule, offset)
        sigmas = sigmas_for(ts, schedule)
        return _Grid(ts, sigmas, sigmas[1:] + [0.0])
    table = train_sigmas(schedule)
    ks = karras_sigmas(table[0], table[-1], steps)[:-1]
    sigmas = _f32(ks)
    ts = [float(round(sigma_to_timestep(s, schedule))) for s in ks]
    return _Grid(ts, sigmas, sigmas[1:] + [0.0])


def _grid(sampler: SamplerId, steps: int, spacing: Spacing, schedule: NoiseSchedule, offset: int,
          karras: bool, set_alpha_to_one: bool) -> _Grid:
    """The full schedule of the diffusers scheduler `sampler` reproduces."""
    if sampler in (SamplerId.EULER, SamplerId.EULER_ANCESTRAL):
        return _euler_grid(steps, spacing, schedule, offset, karras)
    if sampler == SamplerId.DDIM:
        return _ddim_grid(steps, spacing, schedule, offset, set_alpha_to_one)
    return _dpm_grid(steps, spacing, schedule, offset, sampler == SamplerId.DPMPP_2M_KARRAS)


def _cutoff(fraction: float, schedule: NoiseSchedule) -> int:
    """diffusers' discrete_timestep_cutoff for denoising_start / denoising_end."""
    n_train = schedule.num_train_timesteps
    return int(round(n_train - fraction * n_train))


def _first_step(ts: list[float], steps: int, schedule: NoiseSchedule, strength: float | None,
                denoising_start: float | None) -> int:
    """Index of the first step run: img2img strength, or the refiner's denoising_start."""
    if denoising_start is not None:
        return len(ts) - sum(t < _cutoff(denoising_start, schedule) for t in ts)
    if strength is not None:
        return max(steps - min(int(steps * strength), steps), 0)
    return 0


def _stop_step(ts: list[float], start: int, schedule: NoiseSchedule, denoising_end: float | None) -> int:
    """Index after the last step run: the SDXL base's denoising_end keeps timesteps t >= cutoff."""
    if denoising_end is None:
        return len(ts)
    return start + sum(t >= _cutoff(denoising_end, schedule) for t in ts[start:])


_E = TypeVar("_E", SamplerId, Prediction, Spacing)


def _enum(cls: type[_E], value: _E | str, what: str) -> _E:
    """Parse an enum value, or raise InvalidRequest listing the valid ones."""
    try:
        return cls(value)
    except ValueError:
        known = ", ".join(v.value for v in cls)
        raise InvalidRequest(f"unknown {what} {value!r}; choose one of: {known}") from None


def check_fraction(name: str, value: float | None, upper_inclusive: bool = False) -> None:
    """A strength / denoising fraction must lie in (0, 1) (or (0, 1] for strength)."""
    if value is None or (0 < value < 1) or (upper_inclusive and value == 1):
        return
    raise InvalidRequest(f"{name} must be a fraction in (0, 1{']' if upper_inclusive else ')'}, got {value}")


def _validate(sampler: SamplerId, steps: int, schedule: NoiseSchedule, strength: float | None,
              denoising_start: float | None, denoising_end: float | None, eta: float, karras: bool) -> None:
    """Reject settings a user can get wrong, with what to change."""
    if not isinstance(steps, int) or not 1 <= steps <= schedule.num_train_timesteps:
        raise InvalidRequest(f"steps must be an integer from 1 to {schedule.num_train_timesteps}, got {steps!r}")
    check_fraction("strength", strength, upper_inclusive=True)
    check_fraction("denoising_start", denoising_start)
    check_fraction("denoising_end", denoising_end)
    if strength is not None and denoising_start is not None:
        raise InvalidRequest("give either strength or denoising_start (the refiner's start), not both")
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise InvalidRequest(f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end})")
    if not 0 <= eta <= 1 or (eta > 0 and sampler != SamplerId.DDIM):
        raise InvalidRequest(f"eta must be in [0, 1] and only applies to the ddim sampler, got eta={eta} for {sampler.value}")
    if karras and sampler != SamplerId.EULER:
        raise InvalidRequest(f"karras=True applies to the euler sampler only (use dpmpp_2m_karras), not {sampler.value}")


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
    """Plan a denoising run exactly as the matching diffusers scheduler and pipeline would.

    Args:
        sampler: which sampler; it fixes the diffusers scheduler reproduced (see DIFFUSERS_SCHEDULERS).
        steps: num_inference_steps, 1 .. num_train_timesteps; img2img runs fewer (see strength).
        schedule: the training noise schedule (betas).
        prediction: what the UNet predicts (eps or v).
        spacing: timestep spacing ('leading', 'trailing', 'linspace').
        steps_offset: added to leading-spaced timesteps (1 in SD / SDXL configs).
        strength: img2img / inpaint strength in (0, 1]: runs the last min(int(steps * strength), steps)
            steps; start from `SamplingPlan.noised`. Raises InvalidRequest when no step would run.
        denoising_start: SDXL refiner handoff in (0, 1): runs the steps with t < round(T - start * T),
            starting from the base's latents as they are (do not call `noised`). Excludes strength.
        denoising_end: SDXL base handoff in (0, 1): stops after the steps with t >= round(T - end * T);
            `run` then returns the partly denoised latents the refiner takes.
        eta: DDIM's stochasticity in [0, 1] (ddim only).
        karras: Karras sigmas for euler (EulerDiscreteScheduler use_karras_sigmas).
        set_alpha_to_one: DDIM's final step lands on abar = 1 instead of abar_0 (False in SD configs).
    """
    sampler, prediction = _enum(SamplerId, sampler, "sampler"), _enum(Prediction, prediction, "prediction")
    spacing = _enum(Spacing, spacing, "timestep spacing")
    _validate(sampler, steps, schedule, strength, denoising_start, denoising_end, eta, karras)
    grid = _grid(sampler, steps, spacing, schedule, steps_offset, karras, set_alpha_to_one)
    start = _first_step(grid.timesteps, steps, schedule, strength, denoising_start)
    stop = _stop_step(grid.timesteps, start, schedule, denoising_end)
    if stop <= start:
        raise InvalidRequest(
            f"no denoising step would run with steps={steps}, strength={strength}, denoising_start="
            f"{denoising_start}, denoising_end={denoising_end}: raise steps (steps * strength must reach 1)"
        )
    return SamplingPlan(
        sampler=sampler,
        prediction=prediction,
        sigmas=tuple(grid.sigmas[start:stop] + [grid.landing[stop - 1]]),
        timesteps=tuple(grid.timesteps[start:stop]),
        init_noise_sigma=_init_noise_sigma(sampler, spacing, grid.sigmas),
        targets=tuple(grid.landing[start:stop]) if sampler == SamplerId.DDIM else None,
        eta=eta,
    )


def _init_noise_sigma(sampler: SamplerId, spacing: Spacing, sigmas: list[float]) -> float:
    """diffusers' init_noise_sigma: 1 for x_t schedulers; Euler: sigma_max, or sqrt(sigma_max^2 + 1) if leading."""
    if sampler in _VARIANCE_PRESERVING:
        return 1.0
    sigma_max = torch.tensor(sigmas, dtype=torch.float32).max()
    return float(sigma_max if spacing != Spacing.LEADING else (sigma_max**2 + 1) ** 0.5)


# --- diffusers scheduler_config.json --------------------------------------------------------------

_CLASS_TO_SAMPLER = {name: s for s, (name, _) in DIFFUSERS_SCHEDULERS.items() if s != SamplerId.DPMPP_2M_KARRAS}
_DEFAULT_SPACING = {"DDIMScheduler": "leading"}  # the others default to linspace
# Settings we do not reproduce: key -> (diffusers default when absent, the only value we support).
_COMMON_LIMITS: dict[str, tuple[Any, Any]] = {"trained_betas": (None, None), "rescale_betas_zero_snr": (False, False)}
_CLASS_LIMITS: dict[str, dict[str, tuple[Any, Any]]] = {
    "EulerDiscreteScheduler": {"interpolation_type": ("linear", "linear"), "timestep_type": ("discrete", "discrete"),
                               "use_exponential_sigmas": (False, False), "use_beta_sigmas": (False, False),
                               "final_sigmas_type": ("zero", "zero"), "sigma_min": (None, None),
                               "sigma_max": (None, None)},
    "EulerAncestralDiscreteScheduler": {},
    "DDIMScheduler": {"clip_sample": (True, False), "thresholding": (False, False)},
    "DPMSolverMultistepScheduler": {"thresholding": (False, False), "use_lu_lambdas": (False, False),
                                    "use_exponential_sigmas": (False, False), "use_beta_sigmas": (False, False),
                                    "use_flow_sigmas": (False, False), "variance_type": (None, None),
                                    "lambda_min_clipped": (-math.inf, -math.inf),
                                    "use_dynamic_shifting": (False, False)},
}


def _sampler_from_config(config: Mapping[str, Any]) -> SamplerId:
    """The sampler reproducing the config's own scheduler class (and its settings)."""
    name = config.get("_class_name")
    if name not in _CLASS_TO_SAMPLER:
        known = ", ".join(s.value for s in SamplerId)
        raise InvalidRequest(f"scheduler {name!r} has no LatentRT equivalent; choose a sampler: {known}")
    if name != "DPMSolverMultistepScheduler":
        return _CLASS_TO_SAMPLER[name]
    fixed = {k: v for k, v in _DPM.items() if k != "final_sigmas_type"}
    if any(config.get(k, v) != v for k, v in fixed.items()):
        raise InvalidRequest(f"only DPM-Solver++(2M) is supported (need {fixed}); choose a sampler explicitly")
    return SamplerId.DPMPP_2M_KARRAS if config.get("use_karras_sigmas", False) else SamplerId.DPMPP_2M


def _check_limits(config: Mapping[str, Any], class_name: str) -> None:
    """Refuse configs whose settings would make the diffusers scheduler differ from our sampler."""
    for key, (default, supported) in {**_COMMON_LIMITS, **_CLASS_LIMITS[class_name]}.items():
        if config.get(key, default) != supported:
            raise InvalidRequest(
                f"scheduler setting {key}={config.get(key, default)!r} is not supported by {class_name} "
                f"sampling here (need {supported!r}); change scheduler_config.json or choose another sampler"
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
) -> SamplingPlan:
    """Plan from a diffusers scheduler_config.json dict, as `<sampler's scheduler class>.from_config(config)` would.

    `sampler` None reproduces the config's own class (Euler, Euler ancestral, DDIM, DPM-Solver++ 2M).
    Absent keys take the defaults of the sampler's diffusers class; settings we do not reproduce
    (other beta schedules, thresholding, DDIM clip_sample, ...) raise InvalidRequest.
    """
    sampler = _sampler_from_config(config) if sampler is None else _enum(SamplerId, sampler, "sampler")
    class_name = DIFFUSERS_SCHEDULERS[sampler][0]
    _check_limits(config, class_name)
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in ("linear", "scaled_linear"):
        raise InvalidRequest(f"beta_schedule {beta_schedule!r} is not supported; use 'linear' or 'scaled_linear'")
    schedule = NoiseSchedule(
        beta_start=float(config.get("beta_start", 0.0001)),
        beta_end=float(config.get("beta_end", 0.02)),
        beta_schedule=beta_schedule,
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
    )
    prediction, spacing = config.get("prediction_type", "epsilon"), config.get("timestep_spacing")
    if prediction not in {p.value for p in Prediction}:
        raise InvalidRequest(f"prediction_type {prediction!r} is not supported; use 'epsilon' or 'v_prediction'")
    return plan_sampling(
        sampler, steps, schedule=schedule, prediction=prediction,
        spacing=spacing or _DEFAULT_SPACING.get(class_name, "linspace"),
        steps_offset=int(config.get("steps_offset", 0)), strength=strength, denoising_start=denoising_start,
        denoising_end=denoising_end, eta=eta,
        karras=sampler == SamplerId.EULER and bool(config.get("use_karras_sigmas", False)),
        set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
    )
