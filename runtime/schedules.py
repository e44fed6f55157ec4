"""Discretizations: noise schedules, timestep spacings and sigma grids as pure functions, computed as diffusers does.

Betas and cumulative alphas are float32 tensors, bit-identical to diffusers' schedulers. Timesteps
and sigmas are plain CPU Python floats holding the float32 values diffusers' schedulers hold, so a
sampler loop never touches a device tensor to decide anything. A sigma is the noise level of the
variance-exploding parameterisation x = x0 + sigma * eps, sigma(t) = sqrt((1 - abar_t) / abar_t)
(Karras et al. 2022, arXiv:2206.00364, table 1).

A `Discretization` is one full schedule: per step the sigma and the UNet timestep diffusers feeds
there, then the level the last step lands on. Three builders reproduce the three families of
diffusers' `set_timesteps`: `kdiffusion_grid` (Euler, Heun, KDPM2, LMS, ... : float timesteps,
sigmas interpolated in t), `solver_grid` (DPM-Solver, UniPC, DEIS: n + 1-point integer grids) and
`vp_timesteps` (DDIM, DDPM, PNDM: integer timesteps on the training table). Spacings follow Lin et
al. 2023, arXiv:2305.08891, table 2.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from latentrt.families import NoiseSchedule, Spacing

ZERO_SNR_ABAR = 2.0**-24  # what Euler / DPM-Solver / UniPC put in place of abar_T = 0 under zero-terminal-SNR
VP_MIN_ABAR = 1e-30  # VP schedulers keep abar_T = 0; in sigma space it is this (sigma 1e15, exact for v / sample)


@dataclass(frozen=True)
class Discretization:
    """One full schedule (before strength / denoising_start / denoising_end slicing)."""

    sigmas: tuple[float, ...]  # n + 1: the level of each step, then the level the last step lands on
    timesteps: tuple[float, ...]  # n: the UNet timestep diffusers feeds at sigmas[i] (float32 values)
    extra_timesteps: Mapping[float, float] = field(default_factory=dict)  # other sigma -> timestep fed verbatim
    step_options: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # per-step sampler options (len n)

    def __post_init__(self) -> None:
        assert len(self.sigmas) == len(self.timesteps) + 1, "one sigma per step plus the landing level"
        assert all(len(v) == len(self.timesteps) for v in self.step_options.values()), "one option value per step"

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def slice(self, start: int, stop: int) -> Discretization:
        """Steps start .. stop - 1 (img2img strength, refiner handoff): pure slicing."""
        return Discretization(self.sigmas[start:stop + 1], self.timesteps[start:stop], self.extra_timesteps,
                              {k: v[start:stop] for k, v in self.step_options.items()})

    def timestep_map(self) -> dict[float, float]:
        """sigma -> the timestep diffusers feeds there, for every grid point (later grid points win)."""
        return {**self.extra_timesteps, **dict(zip(self.sigmas, self.timesteps))}


# ---------------------------------------------------------------------------- the training schedule


def betas(schedule: NoiseSchedule) -> torch.Tensor:
    """Per-step betas, float32, as diffusers' schedulers compute them (then zero-terminal-SNR rescaled if asked)."""
    start, end, n = schedule.beta_start, schedule.beta_end, schedule.num_train_timesteps
    if schedule.trained_betas is not None:
        out = torch.tensor(schedule.trained_betas, dtype=torch.float32)
    elif schedule.beta_schedule == "linear":
        out = torch.linspace(start, end, n, dtype=torch.float32)
    elif schedule.beta_schedule == "scaled_linear":
        out = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    elif schedule.beta_schedule == "squaredcos_cap_v2":
        out = _cosine_betas(n)
    else:
        raise ValueError(f"unsupported beta_schedule {schedule.beta_schedule!r}; "
                         "use 'linear', 'scaled_linear' or 'squaredcos_cap_v2'")
    return rescale_zero_terminal_snr(out) if schedule.rescale_zero_snr else out


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 (arXiv:2102.09672, eq. 17) cosine schedule, betas capped at 0.999 (diffusers' betas_for_alpha_bar)."""
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=torch.float32)


def rescale_zero_terminal_snr(b: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (arXiv:2305.08891, algorithm 1): shift and scale sqrt(abar) so that abar_T = 0."""
    sqrt_abar = torch.cumprod(1.0 - b, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    return 1 - torch.cat([abar[0:1], abar[1:] / abar[:-1]])


def alphas_cumprod(schedule: NoiseSchedule) -> torch.Tensor:
    """Cumulative product of (1 - beta), float32: abar_t for t = 0 .. T-1 (abar_T = 0 under zero-terminal-SNR)."""
    return torch.cumprod(1.0 - betas(schedule), dim=0)


@functools.lru_cache(maxsize=32)
def _train_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    """sigma(t) for every training timestep, float32, read-only (Euler's unflipped table; abar_T -> 2^-24 if zero SNR)."""
    abar = alphas_cumprod(schedule)
    if schedule.rescale_zero_snr:
        abar[-1] = ZERO_SNR_ABAR
    sigmas = (((1 - abar) / abar) ** 0.5).numpy()
    sigmas.flags.writeable = False
    return sigmas


def train_sigmas(schedule: NoiseSchedule) -> list[float]:
    """sigma(t) for t = 0 .. T-1 (ascending), as float32 values."""
    return _train_sigmas(schedule).tolist()


@functools.lru_cache(maxsize=32)
def _vp_abar(schedule: NoiseSchedule) -> tuple[float, ...]:
    """abar_t as float32 values, as the VP schedulers (DDIM, DDPM, PNDM, LCM, TCD) index it."""
    return tuple(alphas_cumprod(schedule).tolist())


def vp_abar(t: int, schedule: NoiseSchedule, final: float) -> float:
    """abar at integer timestep t; `final` (abar_0, or 1 with set_alpha_to_one) where t < 0."""
    return _vp_abar(schedule)[t] if t >= 0 else final


def vp_sigma(abar: float) -> float:
    """sigma of a VP scheduler's abar: sqrt((1 - abar) / abar); abar = 0 (zero terminal SNR) -> a huge finite sigma."""
    abar = max(abar, VP_MIN_ABAR)
    return math.sqrt((1 - abar) / abar)


# ---------------------------------------------------------------------------- timestep spacings


def discrete_timesteps(
    steps: int, spacing: Spacing, schedule: NoiseSchedule, steps_offset: int = 1
) -> list[float]:
    """Float timesteps of diffusers' k-diffusion-style schedulers (Euler, Heun, KDPM2, LMS, ...), descending."""
    n_train = schedule.num_train_timesteps
    if spacing == Spacing.LINSPACE:
        ts = np.linspace(0, n_train - 1, steps, dtype=np.float32)[::-1]
    elif spacing == Spacing.LEADING:
        ts = (np.arange(0, steps) * (n_train // steps)).round()[::-1].astype(np.float32) + steps_offset
    else:
        ts = np.arange(n_train, 0, -n_train / steps).round().astype(np.float32) - 1
    return ts.astype(np.float32).tolist()


def ddim_timesteps(steps: int, spacing: Spacing, schedule: NoiseSchedule, steps_offset: int = 1) -> list[float]:
    """Integer timesteps of diffusers' DDIM / DDPM / PNDM / LCM-style schedulers (linspace rounds), descending."""
    n_train = schedule.num_train_timesteps
    if spacing == Spacing.LINSPACE:
        ts = np.linspace(0, n_train - 1, steps).round()[::-1].astype(np.int64)
    elif spacing == Spacing.LEADING:
        ts = (np.arange(0, steps) * (n_train // steps)).round()[::-1].astype(np.int64) + steps_offset
    else:
        ts = np.round(np.arange(n_train, 0, -n_train / steps)).astype(np.int64) - 1
    return [float(t) for t in ts]


def dpm_solver_timesteps(
    steps: int, spacing: Spacing, schedule: NoiseSchedule, steps_offset: int = 1
) -> list[float]:
    """Integer timesteps of diffusers' DPMSolverMultistep / UniPC / DEIS (their own n+1-point grids), descending."""
    n_train = schedule.num_train_timesteps
    if spacing == Spacing.LINSPACE:
        ts = np.linspace(0, n_train - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == Spacing.LEADING:
        ts = (np.arange(0, steps + 1) * (n_train // (steps + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
    else:
        ts = np.arange(n_train, 0, -n_train / steps).round().astype(np.int64) - 1
    return [float(t) for t in ts]


def turbo_timesteps(steps: int) -> list[float]:
    """SDXL-Turbo / SD-Turbo timesteps: trailing spacing over 1000 training steps (999; 999, 499; ...)."""
    return discrete_timesteps(steps, Spacing.TRAILING, NoiseSchedule(), steps_offset=0)


# ---------------------------------------------------------------------------- sigmas


def interp_sigmas(timesteps: Sequence[float], schedule: NoiseSchedule) -> list[float]:
    """sigma at (possibly fractional) timesteps, linear in t, unrounded float64 (what the sigma conversions read)."""
    table = _train_sigmas(schedule)
    return np.interp(np.asarray(timesteps, dtype=np.float64), np.arange(len(table)), table).tolist()


def sigmas_for(timesteps: Sequence[float], schedule: NoiseSchedule) -> list[float]:
    """One sigma per timestep, interpolated linearly in t as diffusers' Euler schedulers do (float32 values)."""
    return np.asarray(interp_sigmas(timesteps, schedule), dtype=np.float32).tolist()


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022 (arXiv:2206.00364, eq. 5): n sigmas from sigma_max to sigma_min, then 0.0."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho).tolist() + [0.0]


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> list[float]:
    """n sigmas evenly spaced in log-sigma from sigma_max to sigma_min, then 0.0 (diffusers' use_exponential_sigmas)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)).tolist() + [0.0]


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> list[float]:
    """Lee et al. 2024 (arXiv:2407.12173): sigmas at Beta(0.6, 0.6) quantiles, then 0.0 (use_beta_sigmas; needs scipy)."""
    from scipy.stats import beta as beta_dist  # type: ignore[import-untyped]

    ppf = [float(beta_dist.ppf(q, alpha, beta)) for q in 1 - np.linspace(0, 1, n)]
    return [sigma_min + p * (sigma_max - sigma_min) for p in ppf] + [0.0]


SIGMA_SCHEDULES = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}


def sigma_to_timestep(sigma: float, schedule: NoiseSchedule) -> float:
    """Fractional timestep whose sigma is `sigma`, interpolating linearly in log-sigma (diffusers' _sigma_to_t)."""
    log_sigmas = np.log(_train_sigmas(schedule))  # float32, as diffusers keeps it
    log_sigma = np.log(max(sigma, 1e-10))
    low = int(np.cumsum(log_sigma - log_sigmas >= 0).argmax().clip(max=len(log_sigmas) - 2))
    w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])
    w = float(np.clip(w, 0, 1))
    return (1 - w) * low + w * (low + 1)


def _f32(values: Sequence[float] | np.ndarray) -> list[float]:
    """Round to float32 values, as diffusers stores its sigmas and timesteps."""
    return np.asarray(values, dtype=np.float32).tolist()


# ---------------------------------------------------------------------------- grids


def kdiffusion_grid(
    steps: int,
    spacing: Spacing,
    schedule: NoiseSchedule,
    steps_offset: int = 0,
    *,
    sigma_schedule: str | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    round_converted: bool = False,
    log_linear: bool = False,
    final_sigma_min: bool = False,
) -> Discretization:
    """The set_timesteps of diffusers' Euler / EulerAncestral / Heun / KDPM2 / KDPM2Ancestral / LMS / DPMSolverSDE.

    Timesteps from the spacing; sigmas interpolated linearly in t (or `log_linear`: evenly in
    log-sigma over the whole table, Euler's interpolation_type="log_linear"); `sigma_schedule`
    ("karras", "exponential", "beta") replaces them (from sigma_min / sigma_max, default the
    interpolated ends) and re-derives timesteps by log-sigma interpolation (rounded for KDPM2's
    Karras option); the last step lands on 0, or on sigma(t=0) with final_sigmas_type="sigma_min".
    """
    ts: list[float] = discrete_timesteps(steps, spacing, schedule, steps_offset)
    table = _train_sigmas(schedule)
    if log_linear:  # diffusers keeps n + 2 sigmas here: the last step lands on the (n + 1)-th log-linear point
        points = torch.linspace(float(np.log(table[-1])), float(np.log(table[0])), steps + 1).exp().tolist()
        sigmas, landing = points[:steps], points[steps]
    else:
        points = sigmas = interp_sigmas(ts, schedule)
        landing = 0.0
    if sigma_schedule is not None:
        lo = sigma_min if sigma_min is not None else points[-1]
        hi = sigma_max if sigma_max is not None else points[0]
        sigmas = SIGMA_SCHEDULES[sigma_schedule](lo, hi, steps)[:-1]
        ts = [sigma_to_timestep(s, schedule) for s in sigmas]
        if round_converted:
            ts = [float(round(t)) for t in ts]
    last = float(table[0]) if final_sigma_min else 0.0
    if log_linear and sigma_schedule is None:
        last = landing
    return Discretization(tuple(_f32(sigmas + [last])), tuple(_f32(ts)))


def solver_grid(
    steps: int,
    spacing: Spacing,
    schedule: NoiseSchedule,
    steps_offset: int = 0,
    *,
    sigma_schedule: str | None = None,
    final_sigma_min: bool = False,
) -> Discretization:
    """The set_timesteps of diffusers' DPMSolverMultistep (UniPC / DEIS share it): n + 1-point integer grids.

    Karras / exponential / beta sigmas span the whole training range and their timesteps are the
    rounded log-sigma interpolation; the last step lands on 0 (final_sigmas_type="zero") or sigma(t=0).
    """
    table = _train_sigmas(schedule)
    if sigma_schedule is None:
        ts = dpm_solver_timesteps(steps, spacing, schedule, steps_offset)
        sigmas = sigmas_for(ts, schedule)
    else:
        sigmas = SIGMA_SCHEDULES[sigma_schedule](float(table[0]), float(table[-1]), steps)[:-1]
        ts = [float(round(sigma_to_timestep(s, schedule))) for s in sigmas]
    last = float(table[0]) if final_sigma_min else 0.0
    return Discretization(tuple(_f32(sigmas + [last])), tuple(ts))
