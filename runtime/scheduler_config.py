"""diffusers' scheduler_config.json -> sampler + discretization + options: one adapter for every scheduler class.

Each supported diffusers scheduler class is one `SchedulerClass` entry: its `__init__` defaults for
every key it reads, a builder `(SchedulerConfig, steps) -> Recipe` that reproduces
`<Class>.from_config(config)` + `set_timesteps(steps)`, and the `--sampler` ids it provides with
the config overrides that select them. A key a builder cannot reproduce raises one
InvalidRequest naming the key (`SchedulerConfig.require`); keys a class does not have are
ignored, as diffusers' from_config ignores them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np
import torch

from latentrt.errors import InvalidRequest
from latentrt.families import NoiseSchedule, Prediction, SamplerId, Spacing

from .denoisers import X0Transform, clip_x0, dynamic_threshold
from .samplers import (
    sample_ddim,
    sample_ddpm,
    sample_dpm_2,
    sample_dpm_2_ancestral,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
    sample_plms,
)
from .samplers_consistency import consistency_grid, sample_lcm, sample_tcd
from .samplers_multistep import (
    dpm_singlestep_orders,
    dpm_solver_max_orders,
    sample_deis,
    sample_dpmpp_multistep,
    sample_dpmpp_singlestep,
    sample_unipc,
    unipc_correctors,
    unipc_max_orders,
)
from .samplers_sde import dpmpp_sde_grid, sample_dpmpp_sde
from .schedules import (
    Discretization,
    ddim_timesteps,
    kdiffusion_grid,
    sigma_to_timestep,
    solver_grid,
    train_sigmas,
    vp_abar,
    vp_sigma,
)

log = logging.getLogger(__name__)

SamplerFn = Callable[..., Any]  # sample_x(denoise, x, sigmas, noise=None, callback=None, **options) -> x


class LatentSpace(str, Enum):
    """How the diffusers scheduler holds its latents between steps."""

    SIGMA = "sigma"  # x = x0 + sigma * eps (Euler family; init_noise_sigma = sigma_max)
    VP = "vp"  # x_t = sqrt(abar) * x0 + sqrt(1 - abar) * eps (DDIM, PNDM, DPM-Solver, ...; init_noise_sigma = 1)


@dataclass(frozen=True)
class Recipe:
    """What `<Class>.from_config(config)` + `set_timesteps(steps)` does, as a pure sampler and its inputs."""

    sampler: SamplerId
    fn: SamplerFn  # the sampler function (contract of runtime/samplers.py)
    grid: Discretization  # the full schedule, before strength / denoising slicing
    schedule: NoiseSchedule  # the training schedule (log-sigma interpolation between grid points)
    prediction: Prediction
    options: Mapping[str, Any] = field(default_factory=dict)  # scalar keyword options for fn
    space: LatentSpace = LatentSpace.SIGMA
    init_noise_sigma: float = 1.0
    x0_transform: X0Transform | None = None  # clip_sample / dynamic thresholding of the denoised x0
    # second-order classes (diffusers' order 2): the timestep of each UNet call, step k's first call at 2k
    # and its second at 2k + 1 (the step to 0 has one); the base / refiner split counts these (plan.py)
    call_timesteps: tuple[float, ...] | None = None
    unsliceable: str | None = None  # "key=value" under which diffusers cannot run part of the schedule (img2img)


class SchedulerConfig:
    """A scheduler_config.json dict read as one diffusers class reads it: its defaults for absent keys."""

    def __init__(self, raw: Mapping[str, Any], cls: SchedulerClass):
        self.raw, self.cls, self.name = raw, cls, cls.name

    def get(self, key: str) -> Any:
        """The value of `key` (the class's default when absent); None for keys the class does not have."""
        if key not in self.cls.defaults:
            return None
        return self.raw.get(key, self.cls.defaults[key])

    def require(self, key: str, *supported: Any) -> Any:
        """The value of `key`, or InvalidRequest naming it if it is not one of `supported`."""
        value = self.get(key)
        if value not in supported:
            shown = " or ".join(repr(v) for v in supported)
            raise InvalidRequest(f"scheduler_config.json: {self.name} with {key}={value!r} is not supported "
                                 f"(use {shown}); change the setting or choose another --sampler")
        return value

    def flag(self, key: str) -> bool:
        """A boolean setting (absent keys: the class default; keys the class lacks: False); InvalidRequest if not one."""
        value = self.get(key)
        if value is not None and not isinstance(value, bool):
            raise InvalidRequest(f"scheduler_config.json: {key}={value!r} must be true or false")
        return bool(value)

    def number(self, key: str, kind: type = float, low: float = -math.inf, high: float = math.inf) -> Any:
        """A numeric setting in [low, high] (an int for kind=int), checked: InvalidRequest naming the key otherwise."""
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
            raise InvalidRequest(f"scheduler_config.json: {key}={value!r} is not {'an integer' if kind is int else 'a number'}")
        if not (math.isfinite(value) and low <= value <= high):
            raise InvalidRequest(f"scheduler_config.json: {key}={value!r} must lie in [{low}, {high}]")
        return kind(value)

    @property
    def schedule(self) -> NoiseSchedule:
        """The training noise schedule (betas) this class builds from the config."""
        n = self.number("num_train_timesteps", int, 2, 100_000)
        trained = self.get("trained_betas")
        if trained is not None:
            trained = _trained_betas(trained)
        else:
            self.require("beta_schedule", "linear", "scaled_linear", "squaredcos_cap_v2")
        return NoiseSchedule(beta_start=self.number("beta_start", float, 0, 1),
                             beta_end=self.number("beta_end", float, 0, 1), beta_schedule=str(self.get("beta_schedule")), num_train_timesteps=n,
                             trained_betas=trained, rescale_zero_snr=self.flag("rescale_betas_zero_snr"))

    def prediction(self, *supported: Prediction) -> Prediction:
        """prediction_type, one of `supported` (default: all three)."""
        allowed = supported or tuple(Prediction)
        return Prediction(self.require("prediction_type", *(p.value for p in allowed)))

    @property
    def spacing(self) -> Spacing:
        return Spacing(self.require("timestep_spacing", *(s.value for s in Spacing)))

    @property
    def steps_offset(self) -> int:
        return self.number("steps_offset", int, 0)

    def sigma_schedule(self) -> str | None:
        """Which of use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas is on (at most one)."""
        on = [kind for kind in ("karras", "exponential", "beta") if self.flag(f"use_{kind}_sigmas")]
        if len(on) > 1:
            raise InvalidRequest(f"scheduler_config.json: only one of use_karras_sigmas, use_exponential_sigmas, "
                                 f"use_beta_sigmas can be true (got {', '.join(on)})")
        if on == ["beta"]:
            try:
                import scipy.stats  # noqa: F401
            except ImportError:
                raise InvalidRequest("scheduler_config.json: use_beta_sigmas needs scipy (pip install scipy)") from None
        return on[0] if on else None

    def x0_transform(self) -> X0Transform | None:
        """thresholding (dynamic, wins) or clip_sample, applied to the denoised x0 as diffusers' step() does."""
        if self.flag("thresholding"):
            return dynamic_threshold(self.number("dynamic_thresholding_ratio", float, 0, 1),
                                     self.number("sample_max_value"))
        if self.flag("clip_sample"):
            return clip_x0(self.number("clip_sample_range") if self.get("clip_sample_range") is not None else 1.0)
        return None


def _trained_betas(values: Any) -> tuple[float, ...]:
    """trained_betas from an untrusted config: a list of finite floats in (0, 1]."""
    if not isinstance(values, (list, tuple)) or len(values) < 2:
        raise InvalidRequest("scheduler_config.json: trained_betas must be a list of numbers")
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise InvalidRequest("scheduler_config.json: trained_betas must be a list of numbers") from None
    if not all(0 < v <= 1 for v in out):
        raise InvalidRequest("scheduler_config.json: trained_betas must lie in (0, 1]")
    return out


@dataclass(frozen=True)
class SchedulerClass:
    """One diffusers scheduler class: its defaults, how to build a Recipe, and the --sampler ids it provides."""

    name: str  # diffusers class name, e.g. "EulerDiscreteScheduler"
    defaults: Mapping[str, Any]  # its __init__ defaults for every key the builder reads
    build: Callable[[SchedulerConfig, int], Recipe]
    samplers: Mapping[SamplerId, Mapping[str, Any]]  # sampler id -> config overrides that select it


# ---------------------------------------------------------------------------- shared defaults and helpers

_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
          "trained_betas": None, "prediction_type": "epsilon"}
_SECOND_ORDER = (sample_heun, sample_dpm_2, sample_dpm_2_ancestral)
_NO_SAMPLE = (Prediction.EPS, Prediction.V)  # EulerA, KDPM2, KDPM2A, PNDM raise NotImplementedError for "sample"
_K_BETAS = {**_BETAS, "beta_start": 0.00085, "beta_end": 0.012}  # Heun, KDPM2, KDPM2A, DPMSolverSDE defaults
_SIGMA_OPTIONS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_SPACING = {"timestep_spacing": "linspace", "steps_offset": 0}
_THRESHOLD = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}


def kdiffusion_init_noise_sigma(spacing: Spacing, sigmas: tuple[float, ...]) -> float:
    """diffusers' init_noise_sigma of the Euler family: sigma_max, or sqrt(sigma_max^2 + 1) with leading spacing."""
    sigma_max = torch.tensor(sigmas, dtype=torch.float32).max()
    return float(sigma_max if spacing != Spacing.LEADING else (sigma_max**2 + 1) ** 0.5)


def _kgrid(cfg: SchedulerConfig, steps: int, **kw: Any) -> tuple[Discretization, NoiseSchedule, Spacing]:
    """The k-diffusion-style grid of a class (Euler, Heun, KDPM2, LMS, ...) from its config."""
    schedule, spacing = cfg.schedule, cfg.spacing
    grid = kdiffusion_grid(steps, spacing, schedule, cfg.steps_offset, sigma_schedule=cfg.sigma_schedule(), **kw)
    return grid, schedule, spacing


def _ksampler(sampler: SamplerId, fn: SamplerFn, *predictions: Prediction, round_karras: bool = False,
              clip: bool = False, midpoint: bool = False) -> Callable[[SchedulerConfig, int], Recipe]:
    """A builder for a k-diffusion-style class that adds nothing to the common keys."""

    def build(cfg: SchedulerConfig, steps: int) -> Recipe:
        prediction = cfg.prediction(*predictions)
        grid, schedule, spacing = _kgrid(cfg, steps, round_converted=round_karras and cfg.flag("use_karras_sigmas"))
        calls = second_order_calls(grid, schedule, midpoint) if fn in _SECOND_ORDER else None
        return Recipe(sampler, fn, grid, schedule, prediction, init_noise_sigma=kdiffusion_init_noise_sigma(
            spacing, grid.sigmas), x0_transform=cfg.x0_transform() if clip else None, call_timesteps=calls)

    return build


def second_order_calls(grid: Discretization, schedule: NoiseSchedule, midpoint: bool,
                       mids: tuple[float, ...] | None = None) -> tuple[float, ...]:
    """The per-call timesteps of Heun (t_k, then t_k+1) or KDPM2 (t_k, then the midpoint's interpolated t)."""
    out: list[float] = []
    for k, t in enumerate(grid.timesteps):
        out.append(t)
        if k < grid.steps - 1:
            if not midpoint:
                out.append(grid.timesteps[k + 1])
            else:
                mid = mids[k] if mids is not None else math.sqrt(grid.sigmas[k] * grid.sigmas[k + 1])
                out.append(float(np.float32(sigma_to_timestep(mid, schedule))))
    return tuple(out)


# ---------------------------------------------------------------------------- k-diffusion family


def _build_euler(cfg: SchedulerConfig, steps: int) -> Recipe:
    """EulerDiscreteScheduler: interpolation_type, sigma_min/max, final_sigmas_type, timestep_type."""
    prediction = cfg.prediction()
    log_linear = cfg.require("interpolation_type", "linear", "log_linear") == "log_linear"
    final_min = cfg.require("final_sigmas_type", "zero", "sigma_min") == "sigma_min"
    continuous = cfg.require("timestep_type", "discrete", "continuous") == "continuous"
    lo, hi = cfg.get("sigma_min"), cfg.get("sigma_max")
    grid, schedule, spacing = _kgrid(cfg, steps, sigma_min=None if lo is None else cfg.number("sigma_min", float, 0),
                                     sigma_max=None if hi is None else cfg.number("sigma_max", float, 0),
                                     log_linear=log_linear, final_sigma_min=final_min)
    if continuous and prediction == Prediction.V:  # diffusers feeds c_noise = log(sigma) / 4 (Karras et al. table 1)
        ts = torch.tensor(grid.sigmas[:-1], dtype=torch.float32).log().mul(0.25).tolist()
        grid = Discretization(grid.sigmas, tuple(ts))
    return Recipe(SamplerId.EULER, sample_euler, grid, schedule, prediction,
                  init_noise_sigma=kdiffusion_init_noise_sigma(spacing, grid.sigmas))


_EULER = {**_BETAS, **_SIGMA_OPTIONS, **_SPACING, "interpolation_type": "linear", "sigma_min": None,
          "sigma_max": None, "timestep_type": "discrete", "rescale_betas_zero_snr": False, "final_sigmas_type": "zero"}

def ancestral_levels_f32(sigmas: tuple[float, ...]) -> tuple[tuple[float, float, float], ...]:
    """(sigma_down, sigma_up, log-midpoint) per step as KDPM2AncestralDiscreteScheduler.set_timesteps has them.

    All in float32, as diffusers (sigma_down = sqrt(sigma_next^2 - sigma_up^2) cancels there, and the
    result is sensitive to its rounding). The midpoint sqrt(sigma * sigma_down) equals sigma_next in
    exact arithmetic; where its float32 value IS a grid sigma, diffusers still feeds the log-sigma-
    interpolated timestep there, so it is kept in float64 (off the grid, ~1e-7 away) to get that timestep.
    """
    s = torch.tensor(sigmas, dtype=torch.float32)
    s_next = torch.cat([s[1:], torch.zeros(1)])
    up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
    down = (s_next**2 - up**2) ** 0.5
    mid = s.log().lerp(down.log(), 0.5).exp()
    grid, out = set(sigmas), []
    for sigma, sigma_down, sigma_up, sigma_mid in zip(s.tolist()[:-1], down.tolist(), up.tolist(), mid.tolist()):
        if sigma_mid in grid and sigma_down > 0:
            sigma_mid = math.exp(0.5 * (math.log(sigma) + math.log(sigma_down)))
        out.append((sigma_down, sigma_up, sigma_mid))
    return tuple(out)


def _build_euler_ancestral(cfg: SchedulerConfig, steps: int) -> Recipe:
    """EulerAncestralDiscreteScheduler: ancestral Euler with diffusers' float32 (sigma_down, sigma_up)."""
    recipe = _ksampler(SamplerId.EULER_ANCESTRAL, sample_euler_ancestral, *_NO_SAMPLE)(cfg, steps)
    grid = recipe.grid
    return replace(recipe, grid=Discretization(grid.sigmas, grid.timesteps,
                                               step_options={"levels": ancestral_levels_f32(grid.sigmas)}))


def _build_dpm_2_ancestral(cfg: SchedulerConfig, steps: int) -> Recipe:
    """KDPM2AncestralDiscreteScheduler: DPM-2 ancestral with diffusers' float32 ancestral levels."""
    recipe = _ksampler(SamplerId.DPM_2_ANCESTRAL, sample_dpm_2_ancestral, *_NO_SAMPLE, round_karras=True)(cfg, steps)
    grid = recipe.grid
    levels = ancestral_levels_f32(grid.sigmas)
    calls = second_order_calls(grid, recipe.schedule, True, tuple(mid for _, _, mid in levels))
    return replace(recipe, grid=Discretization(grid.sigmas, grid.timesteps, step_options={"levels": levels}),
                   call_timesteps=calls)


# ---------------------------------------------------------------------------- variance-preserving family


def _vp_timesteps(cfg: SchedulerConfig, steps: int, schedule: NoiseSchedule) -> list[int]:
    """Integer timesteps of DDIM / DDPM / PNDM, checked to stay inside the training table."""
    ts = [int(t) for t in ddim_timesteps(steps, cfg.spacing, schedule, cfg.steps_offset)]
    if ts[0] >= schedule.num_train_timesteps or ts[-1] < 0:
        raise InvalidRequest(f"{cfg.name} with {steps} {cfg.spacing.value}-spaced steps and steps_offset "
                             f"{cfg.steps_offset} reaches t={ts[0]}, outside the {schedule.num_train_timesteps} "
                             "training timesteps; use fewer steps")
    return ts


def _check_steps(cfg: SchedulerConfig, steps: int, schedule: NoiseSchedule) -> None:
    if steps > schedule.num_train_timesteps:
        raise InvalidRequest(f"{cfg.name}: steps ({steps}) cannot exceed num_train_timesteps "
                             f"({schedule.num_train_timesteps})")


def _build_ddim(cfg: SchedulerConfig, steps: int) -> Recipe:
    """DDIMScheduler: steps to t - T // n (or the final alpha), clip_sample / thresholding, eta from the request."""
    schedule, prediction = cfg.schedule, cfg.prediction()
    _check_steps(cfg, steps, schedule)
    ts = _vp_timesteps(cfg, steps, schedule)
    final = 1.0 if cfg.flag("set_alpha_to_one") else vp_abar(0, schedule, 1.0)
    ratio = schedule.num_train_timesteps // steps
    sigmas = [vp_sigma(vp_abar(t, schedule, final)) for t in ts]
    targets = tuple(vp_sigma(vp_abar(t - ratio, schedule, final)) for t in ts)
    grid = Discretization(tuple(sigmas) + (targets[-1],), tuple(float(t) for t in ts), step_options={"targets": targets})
    return Recipe(SamplerId.DDIM, sample_ddim, grid, schedule, prediction, options={"x0_transform": cfg.x0_transform()},
                  space=LatentSpace.VP)  # DDIM clips x0 but keeps the model's eps: the sampler applies it


def _build_ddpm(cfg: SchedulerConfig, steps: int) -> Recipe:
    """DDPMScheduler: posterior steps to the next timestep, fixed variances; learned variances need a 2x-channel UNet."""
    schedule, prediction = cfg.schedule, cfg.prediction()
    variance = cfg.require("variance_type", "fixed_small", "fixed_small_log", "fixed_large")
    _check_steps(cfg, steps, schedule)
    ts = _vp_timesteps(cfg, steps, schedule)
    sigmas = tuple(vp_sigma(vp_abar(t, schedule, 1.0)) for t in ts) + (0.0,)
    grid = Discretization(sigmas, tuple(float(t) for t in ts), step_options={"draws": tuple(t > 0 for t in ts)})
    return Recipe(SamplerId.DDPM, sample_ddpm, grid, schedule, prediction, options={"variance": variance},
                  space=LatentSpace.VP, x0_transform=cfg.x0_transform())


def _build_pndm(cfg: SchedulerConfig, steps: int) -> Recipe:
    """PNDMScheduler: one grid entry per UNet call; PLMS alone (skip_prk_steps, SD 1.5), or 3 RK4 steps first."""
    schedule, prediction = cfg.schedule, cfg.prediction(*_NO_SAMPLE)
    _check_steps(cfg, steps, schedule)
    ts = _vp_timesteps(cfg, steps, schedule)
    n_train, ratio = schedule.num_train_timesteps, schedule.num_train_timesteps // steps
    final = 1.0 if cfg.flag("set_alpha_to_one") else vp_abar(0, schedule, 1.0)

    def level(t: int) -> float:
        return vp_sigma(vp_abar(t, schedule, final))

    if cfg.flag("skip_prk_steps"):
        calls = ts[:1] + ts[1:2] + ts[1:]  # T_n-1, T_n-2, T_n-2, T_n-3, ..., T_0
        if len(calls) > 1 and max(calls[1:]) + ratio >= n_train:
            raise InvalidRequest(f"{cfg.name} with {steps} steps would read t >= {n_train}; "
                                 "use another timestep_spacing or step count")
        ups = tuple(level(t + ratio) if t + ratio < n_train else 0.0 for t in calls)  # call 0 never restarts
        downs, prk, starts = tuple(level(t - ratio) for t in calls), 0, (0.0,) * len(calls)
    else:
        if steps < 4:  # diffusers' set_timesteps fails there (its three RK steps need 4 timesteps)
            raise InvalidRequest(f"{cfg.name} with skip_prk_steps=false needs steps >= 4 (got {steps}); "
                                 "use more steps or skip_prk_steps=true")
        calls, targets, start_ts = _prk_calls(ts[::-1], ratio)
        prk = len(start_ts)
        ups, downs = (0.0,) * len(calls), tuple(level(t) for t in targets)
        starts = tuple(level(t) for t in start_ts) + (0.0,) * (len(calls) - prk)
    sigmas = tuple(level(t) for t in calls) + (downs[-1],)
    grid = Discretization(sigmas, tuple(float(t) for t in calls),
                          step_options={"ups": ups, "downs": downs, "prk_starts": starts})
    return Recipe(SamplerId.PNDM, sample_plms, grid, schedule, prediction,
                  options={"v_outputs": prediction == Prediction.V, "prk_calls": prk},
                  space=LatentSpace.VP, unsliceable="skip_prk_steps=false" if prk else None)


def _prk_calls(ascending: list[int], ratio: int) -> tuple[list[int], list[int], list[int]]:
    """PNDMScheduler.set_timesteps without skip_prk_steps: (call timesteps, their targets, RK-step starts of the PRK calls).

    Three pseudo Runge-Kutta steps over the 4 largest timesteps (4 calls each: t, t - h, t - h, t - 2h with
    h = T // n // 2, targets t - h, t - h, t - 2h', t - 2h'), then PLMS from the 4th largest down (t -> t - T // n).
    """
    half = ratio // 2
    last = ascending[-4:]
    pairs = [v + d for v in last for d in (0, half)][:-1]
    prk = [v for v in pairs for _ in range(2)][1:-1][::-1]
    plms = ascending[:-3][::-1]
    targets = [t - (0 if i % 2 else half) for i, t in enumerate(prk)] + [t - ratio for t in plms]
    return prk + plms, targets, [prk[i // 4 * 4] for i in range(len(prk))]


_DDIM = {**_BETAS, **_THRESHOLD, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
         "clip_sample_range": 1.0, "timestep_spacing": "leading", "rescale_betas_zero_snr": False}
_DDPM = {**_BETAS, **_THRESHOLD, "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
         "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False}
_PNDM = {**_BETAS, "skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading",
         "steps_offset": 0}

_CLASSES = [
    SchedulerClass("EulerDiscreteScheduler", _EULER, _build_euler, {SamplerId.EULER: {}}),
    SchedulerClass("EulerAncestralDiscreteScheduler", {**_BETAS, **_SPACING, "rescale_betas_zero_snr": False},
                   _build_euler_ancestral, {SamplerId.EULER_ANCESTRAL: {}}),
    SchedulerClass("HeunDiscreteScheduler", {**_K_BETAS, **_SIGMA_OPTIONS, **_SPACING, "clip_sample": False,
                                             "clip_sample_range": 1.0},
                   _ksampler(SamplerId.HEUN, sample_heun, clip=True), {SamplerId.HEUN: {}}),
    SchedulerClass("KDPM2DiscreteScheduler", {**_K_BETAS, **_SIGMA_OPTIONS, **_SPACING},
                   _ksampler(SamplerId.DPM_2, sample_dpm_2, *_NO_SAMPLE, round_karras=True, midpoint=True),
                   {SamplerId.DPM_2: {}}),
    SchedulerClass("KDPM2AncestralDiscreteScheduler", {**_K_BETAS, **_SIGMA_OPTIONS, **_SPACING},
                   _build_dpm_2_ancestral, {SamplerId.DPM_2_ANCESTRAL: {}}),
    SchedulerClass("LMSDiscreteScheduler", {**_BETAS, **_SIGMA_OPTIONS, **_SPACING},
                   _ksampler(SamplerId.LMS, sample_lms), {SamplerId.LMS: {}}),
    SchedulerClass("DDIMScheduler", _DDIM, _build_ddim, {SamplerId.DDIM: {}}),
    SchedulerClass("DDPMScheduler", _DDPM, _build_ddpm, {SamplerId.DDPM: {}}),
    SchedulerClass("PNDMScheduler", _PNDM, _build_pndm, {SamplerId.PNDM: {}, SamplerId.PLMS: {"skip_prk_steps": True}}),
]


# ---- multistep family (owned by H2; H1 wrote DPMSolverMultistepScheduler's dpmpp_2m as the worked example) ----


def _solver_common(cfg: SchedulerConfig) -> None:
    """Keys of the DPM-Solver / UniPC / DEIS family that must stay at their defaults here."""
    for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting",
                "rescale_betas_zero_snr"):
        if key in cfg.cls.defaults:  # DEIS has no rescale_betas_zero_snr
            cfg.require(key, False)


def _build_dpm_solver_multistep(cfg: SchedulerConfig, steps: int) -> Recipe:
    """DPMSolverMultistepScheduler: DPM-Solver++ (ODE or SDE), order 1-3, midpoint / heun, its final-order rules."""
    prediction = cfg.prediction()
    algorithm = cfg.require("algorithm_type", "dpmsolver++", "sde-dpmsolver++")
    order = cfg.require("solver_order", 1, 2, 3)
    solver_type = cfg.require("solver_type", "midpoint", "heun", "logrho", "bh1", "bh2")  # diffusers: the last 3 -> midpoint
    final_min = cfg.require("final_sigmas_type", "zero", "sigma_min") == "sigma_min"
    _solver_common(cfg)
    cfg.require("use_lu_lambdas", False)
    cfg.require("variance_type", None)
    cfg.require("lambda_min_clipped", -math.inf)
    schedule = cfg.schedule
    karras = cfg.flag("use_karras_sigmas")
    grid = solver_grid(steps, cfg.spacing, schedule, cfg.steps_offset, sigma_schedule="karras" if karras else None,
                       final_sigma_min=final_min)
    max_orders = dpm_solver_max_orders(grid.steps, order, lower_order_final=cfg.flag("lower_order_final"),
                                       euler_at_final=cfg.flag("euler_at_final"), final_sigma_zero=not final_min)
    sde = algorithm == "sde-dpmsolver++"
    if sde:
        sampler = SamplerId.DPMPP_3M_SDE if order == 3 else SamplerId.DPMPP_2M_SDE
    else:  # there is no dpmpp_3m id: order 1 / 3 ODE configs report the 2M id of their sigma schedule
        sampler = SamplerId.DPMPP_2M_KARRAS if karras else SamplerId.DPMPP_2M
    return Recipe(sampler, sample_dpmpp_multistep, replace(grid, step_options={"max_orders": max_orders}), schedule,
                  prediction, options={"solver_order": order, "sde": sde,
                                       "solver_type": "heun" if solver_type == "heun" else "midpoint"},
                  space=LatentSpace.VP, x0_transform=cfg.x0_transform())


def _build_dpm_solver_singlestep(cfg: SchedulerConfig, steps: int) -> Recipe:
    """DPMSolverSinglestepScheduler: DPM-Solver++ singlestep (2S, 3S; ODE or SDE); linspace timesteps only."""
    prediction = cfg.prediction()
    algorithm = cfg.require("algorithm_type", "dpmsolver++", "sde-dpmsolver++", "deis")  # diffusers: deis -> dpmsolver++
    order = cfg.require("solver_order", 1, 2, 3)
    solver_type = cfg.require("solver_type", "midpoint", "heun", "logrho", "bh1", "bh2")
    final_min = cfg.require("final_sigmas_type", "zero", "sigma_min") == "sigma_min"
    _solver_common(cfg)
    cfg.require("variance_type", None)
    cfg.require("lambda_min_clipped", -math.inf)
    schedule = cfg.schedule
    karras = cfg.flag("use_karras_sigmas")
    grid = solver_grid(steps, Spacing.LINSPACE, schedule, 0, sigma_schedule="karras" if karras else None,
                       final_sigma_min=final_min)
    orders = dpm_singlestep_orders(grid.steps, order, lower_order_final=cfg.flag("lower_order_final"),
                                   final_sigma_zero=not final_min)
    return Recipe(SamplerId.DPMPP_2S, sample_dpmpp_singlestep, replace(grid, step_options={"orders": orders}),
                  schedule, prediction, options={"solver_order": order, "sde": algorithm == "sde-dpmsolver++",
                                                 "solver_type": "heun" if solver_type == "heun" else "midpoint"},
                  space=LatentSpace.VP, x0_transform=cfg.x0_transform())


def _build_unipc(cfg: SchedulerConfig, steps: int) -> Recipe:
    """UniPCMultistepScheduler: bh1 / bh2, orders 1-3, predict_x0 or eps, disable_corrector, Karras sigmas."""
    prediction = cfg.prediction()
    order = cfg.require("solver_order", 1, 2, 3)
    solver_type = "bh1" if cfg.require("solver_type", "bh1", "bh2", "midpoint", "heun", "logrho") == "bh1" else "bh2"
    final_min = cfg.require("final_sigmas_type", "zero", "sigma_min") == "sigma_min"
    predict_x0 = cfg.flag("predict_x0")
    if not predict_x0 and not final_min:
        raise InvalidRequest("scheduler_config.json: UniPCMultistepScheduler with predict_x0=false and "
                             "final_sigmas_type='zero' ends in NaN in diffusers; set final_sigmas_type to 'sigma_min'")
    _solver_common(cfg)
    cfg.require("solver_p", None)
    cfg.require("sigma_min", None)
    cfg.require("sigma_max", None)
    karras = cfg.flag("use_karras_sigmas")
    if karras:
        cfg.require("final_sigmas_type", "zero")
    schedule = cfg.schedule
    grid = solver_grid(steps, cfg.spacing, schedule, cfg.steps_offset, sigma_schedule="karras" if karras else None,
                       final_sigma_min=final_min)
    disabled = cfg.get("disable_corrector") or []
    if not isinstance(disabled, (list, tuple)) or not all(isinstance(k, int) for k in disabled):
        raise InvalidRequest(f"scheduler_config.json: disable_corrector={disabled!r} must be a list of step indices")
    step_options = {"max_orders": unipc_max_orders(grid.steps, order, cfg.flag("lower_order_final")),
                    "correctors": unipc_correctors(grid.steps, set(disabled))}
    return Recipe(SamplerId.UNIPC, sample_unipc, replace(grid, step_options=step_options), schedule, prediction,
                  options={"solver_order": order, "solver_type": solver_type, "predict_x0": predict_x0},
                  space=LatentSpace.VP, x0_transform=cfg.x0_transform() if predict_x0 else None)


def _build_deis(cfg: SchedulerConfig, steps: int) -> Recipe:
    """DEISMultistepScheduler: log-rho DEIS, orders 1-3, landing on the training sigma_min."""
    prediction = cfg.prediction()
    order = cfg.require("solver_order", 1, 2, 3)
    cfg.require("algorithm_type", "deis", "dpmsolver", "dpmsolver++")  # diffusers reads the other two as deis
    cfg.require("solver_type", "logrho", "midpoint", "heun", "bh1", "bh2")  # ... and these as logrho
    _solver_common(cfg)
    cfg.require("use_karras_sigmas", False)
    schedule = cfg.schedule
    grid = solver_grid(steps, cfg.spacing, schedule, cfg.steps_offset, final_sigma_min=True)
    max_orders = dpm_solver_max_orders(grid.steps, order, lower_order_final=cfg.flag("lower_order_final"),
                                       final_sigma_zero=False)
    return Recipe(SamplerId.DEIS, sample_deis, replace(grid, step_options={"max_orders": max_orders}), schedule,
                  prediction, options={"solver_order": order}, space=LatentSpace.VP, x0_transform=cfg.x0_transform())


def _build_dpmpp_sde(cfg: SchedulerConfig, steps: int) -> Recipe:
    """DPMSolverSDEScheduler: DPM-Solver++ SDE with Brownian-tree noise (noise_sampler_seed, else from the noise seed)."""
    prediction = cfg.prediction(*_NO_SAMPLE)
    cfg.require("use_exponential_sigmas", False)
    cfg.require("use_beta_sigmas", False)
    seed = cfg.get("noise_sampler_seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise InvalidRequest(f"scheduler_config.json: noise_sampler_seed={seed!r} must be a non-negative integer")
    schedule, spacing = cfg.schedule, cfg.spacing
    if steps > schedule.num_train_timesteps:
        raise InvalidRequest(f"{cfg.name}: steps ({steps}) cannot exceed num_train_timesteps "
                             f"({schedule.num_train_timesteps})")
    grid = dpmpp_sde_grid(steps, spacing, schedule, cfg.steps_offset, karras=cfg.flag("use_karras_sigmas"))
    positive = [s for s in grid.sigmas if s > 0]
    return Recipe(SamplerId.DPMPP_SDE, sample_dpmpp_sde, grid, schedule, prediction,
                  options={"seed": seed, "sigma_min": min(positive), "sigma_max": max(positive)},
                  init_noise_sigma=kdiffusion_init_noise_sigma(spacing, grid.sigmas))


def _consistency_builder(sampler: SamplerId) -> Callable[[SchedulerConfig, int], Recipe]:
    """LCMScheduler / TCDScheduler: their distillation timestep grid (original_inference_steps)."""
    tcd = sampler == SamplerId.TCD

    def build(cfg: SchedulerConfig, steps: int) -> Recipe:
        prediction = cfg.prediction()
        cfg.require("rescale_betas_zero_snr", False)
        schedule, original = cfg.schedule, cfg.number("original_inference_steps", int)
        if not 1 <= steps <= original <= schedule.num_train_timesteps:
            raise InvalidRequest(f"{cfg.name}: steps ({steps}) must lie in 1 .. original_inference_steps ({original}), "
                                 f"which cannot exceed num_train_timesteps ({schedule.num_train_timesteps})")
        grid = consistency_grid(steps, schedule, original, tcd=tcd)
        if tcd:  # TCD's step reads neither timestep_scaling nor clip_sample / thresholding
            return Recipe(sampler, sample_tcd, grid, schedule, prediction,
                          options={"train_sigmas": tuple(train_sigmas(schedule))}, space=LatentSpace.VP)
        return Recipe(sampler, sample_lcm, grid, schedule, prediction,
                      options={"timestep_scaling": cfg.number("timestep_scaling")}, space=LatentSpace.VP,
                      x0_transform=cfg.x0_transform())

    return build


_DPM_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True,
           "euler_at_final": False, "final_sigmas_type": "zero"}
_SOLVER = {**_BETAS, **_THRESHOLD, **_SIGMA_OPTIONS, **_SPACING, "use_flow_sigmas": False, "flow_shift": 1.0,
           "use_dynamic_shifting": False, "time_shift_type": "exponential"}
_CONSISTENCY = {**_BETAS, **_THRESHOLD, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
                "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "leading", "timestep_scaling": 10.0,
                "rescale_betas_zero_snr": False}
_MULTISTEP_CLASSES = [
    SchedulerClass("DPMSolverMultistepScheduler",
                   {**_SOLVER, **_DPM_2M, "use_lu_lambdas": False, "lambda_min_clipped": -math.inf,
                    "variance_type": None, "rescale_betas_zero_snr": False},
                   _build_dpm_solver_multistep,
                   {SamplerId.DPMPP_2M: {**_DPM_2M, "use_karras_sigmas": False},
                    SamplerId.DPMPP_2M_KARRAS: {**_DPM_2M, "use_karras_sigmas": True},
                    SamplerId.DPMPP_2M_SDE: {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
                    SamplerId.DPMPP_3M_SDE: {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}}),
    SchedulerClass("DPMSolverSinglestepScheduler",
                   {**_BETAS, **_THRESHOLD, **_SIGMA_OPTIONS, "solver_order": 2, "algorithm_type": "dpmsolver++",
                    "solver_type": "midpoint", "lower_order_final": False, "use_flow_sigmas": False, "flow_shift": 1.0,
                    "final_sigmas_type": "zero", "lambda_min_clipped": -math.inf, "variance_type": None,
                    "use_dynamic_shifting": False, "time_shift_type": "exponential"},
                   _build_dpm_solver_singlestep,
                   {SamplerId.DPMPP_2S: {"algorithm_type": "dpmsolver++", "solver_order": 2}}),
    SchedulerClass("UniPCMultistepScheduler",
                   {**_SOLVER, "solver_order": 2, "predict_x0": True, "solver_type": "bh2", "lower_order_final": True,
                    "disable_corrector": [], "solver_p": None, "final_sigmas_type": "zero",
                    "rescale_betas_zero_snr": False, "sigma_min": None, "sigma_max": None, "shift_terminal": None},
                   _build_unipc, {SamplerId.UNIPC: {}}),
    SchedulerClass("DEISMultistepScheduler",
                   {**_SOLVER, "solver_order": 2, "algorithm_type": "deis", "solver_type": "logrho",
                    "lower_order_final": True},
                   _build_deis, {SamplerId.DEIS: {}}),
    SchedulerClass("DPMSolverSDEScheduler",
                   {**_K_BETAS, **_SIGMA_OPTIONS, **_SPACING, "noise_sampler_seed": None},
                   _build_dpmpp_sde, {SamplerId.DPMPP_SDE: {}}),
    SchedulerClass("LCMScheduler", _CONSISTENCY, _consistency_builder(SamplerId.LCM), {SamplerId.LCM: {}}),
    SchedulerClass("TCDScheduler", _CONSISTENCY, _consistency_builder(SamplerId.TCD), {SamplerId.TCD: {}}),
]

# ---- end of the multistep family ----


SCHEDULER_CLASSES: dict[str, SchedulerClass] = {c.name: c for c in _CLASSES + _MULTISTEP_CLASSES}
SAMPLER_CLASSES: dict[SamplerId, tuple[SchedulerClass, Mapping[str, Any]]] = {
    sampler: (c, overrides) for c in SCHEDULER_CLASSES.values() for sampler, overrides in c.samplers.items()
}


def available_samplers() -> list[str]:
    """The --sampler names that have an implementation, in SamplerId order."""
    return [s.value for s in SamplerId if s in SAMPLER_CLASSES]


def parse_sampler(sampler: SamplerId | str) -> SamplerId:
    """A sampler id, or InvalidRequest listing the available ones."""
    try:
        parsed = SamplerId(sampler)
    except ValueError:
        parsed = None
    if parsed is None or parsed not in SAMPLER_CLASSES:
        raise InvalidRequest(f"unknown sampler {sampler!r}; choose one of: {', '.join(available_samplers())}")
    return parsed


def pipeline_fixes(config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """diffusers' StableDiffusionPipeline.__init__ rewrite of the scheduler it loads: steps_offset -> 1, clip_sample -> False.

    Both are read as the config's own class reads them (its defaults for absent keys); the notes say what changed.
    """
    out, notes = dict(config), []
    cls = SCHEDULER_CLASSES.get(str(config.get("_class_name")))
    own = SchedulerConfig(config, cls) if cls is not None else None

    def value(key: str, default: Any) -> Any:
        if own is not None:
            return own.get(key) if key in own.cls.defaults else default
        return config.get(key, default)

    if value("steps_offset", 1) != 1:
        notes.append(f"scheduler steps_offset {value('steps_offset', 1)} -> 1, as diffusers' StableDiffusionPipeline "
                     "rewrites it")
        out["steps_offset"] = 1
    if value("clip_sample", False) is True:
        notes.append("scheduler clip_sample true -> false, as diffusers' StableDiffusionPipeline rewrites it")
        out["clip_sample"] = False
    return out, notes


def recipe_for(config: Mapping[str, Any], sampler: SamplerId | str | None, steps: int) -> Recipe:
    """The Recipe of `sampler` (None: the config's own scheduler class) for `steps` steps, as diffusers builds it.

    With a sampler, its class is built from the checkpoint's config plus the overrides that select
    the sampler, as `<Class>.from_config(config, **overrides)` would.
    """
    if sampler is None:
        name = config.get("_class_name")
        cls = SCHEDULER_CLASSES.get(str(name))
        if cls is None:
            raise InvalidRequest(f"scheduler {name!r} has no LatentRT equivalent; choose a --sampler: "
                                 f"{', '.join(available_samplers())}")
        return cls.build(SchedulerConfig(config, cls), steps)
    wanted = parse_sampler(sampler)
    cls, overrides = SAMPLER_CLASSES[wanted]
    recipe = cls.build(SchedulerConfig({**config, **overrides}, cls), steps)
    return recipe if recipe.sampler == wanted else replace(recipe, sampler=wanted)
