"""Noise schedules, timestep spacings and sigmas as pure functions, computed the way diffusers does.

Betas and cumulative alphas are float32 tensors, bit-identical to diffusers' schedulers. Timesteps
and sigmas are plain CPU Python floats holding the float32 values diffusers' schedulers hold, so a
sampler loop never touches a device tensor to decide anything. A sigma is the noise level of the
variance-exploding parameterisation x = x0 + sigma * eps, sigma(t) = sqrt((1 - abar_t) / abar_t)
(Karras et al. 2022, arXiv:2206.00364, table 1).

Each diffusers scheduler class has its own timestep convention; each has a function here:
`discrete_timesteps` (Euler, Euler ancestral), `ddim_timesteps` (DDIM), `dpm_solver_timesteps`
(DPM-Solver multistep). Spacings follow Lin et al. 2023, arXiv:2305.08891, table 2.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from latentrt.families import NoiseSchedule, Spacing


def betas(schedule: NoiseSchedule) -> torch.Tensor:
    """Per-step betas, float32, as diffusers' schedulers compute them ('linear' or 'scaled_linear')."""
    start, end, n = schedule.beta_start, schedule.beta_end, schedule.num_train_timesteps
    if schedule.beta_schedule == "linear":
        return torch.linspace(start, end, n, dtype=torch.float32)
    if schedule.beta_schedule == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    raise ValueError(f"unsupported beta_schedule {schedule.beta_schedule!r}; use 'linear' or 'scaled_linear'")


def alphas_cumprod(schedule: NoiseSchedule) -> torch.Tensor:
    """Cumulative product of (1 - beta), float32: abar_t for t = 0 .. T-1."""
    return torch.cumprod(1.0 - betas(schedule), dim=0)


@functools.lru_cache(maxsize=16)
def _train_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    """sigma(t) for every training timestep, float32, read-only (diffusers' unflipped `sigmas`)."""
    abar = alphas_cumprod(schedule)
    sigmas = (((1 - abar) / abar) ** 0.5).numpy()
    sigmas.flags.writeable = False
    return sigmas


def train_sigmas(schedule: NoiseSchedule) -> list[float]:
    """sigma(t) for t = 0 .. T-1 (ascending), as float32 values."""
    return _train_sigmas(schedule).tolist()


def discrete_timesteps(
    steps: int, spacing: Spacing, schedule: NoiseSchedule, steps_offset: int = 1
) -> list[float]:
    """Timesteps of diffusers' EulerDiscreteScheduler / EulerAncestralDiscreteScheduler, descending."""
    n_train = schedule.num_train_timesteps
    if spacing == Spacing.LINSPACE:
        ts = np.linspace(0, n_train - 1, steps, dtype=np.float32)[::-1]
    elif spacing == Spacing.LEADING:
        ts = (np.arange(0, steps) * (n_train // steps)).round()[::-1].astype(np.float32) + steps_offset
    else:
        ts = np.arange(n_train, 0, -n_train / steps).round().astype(np.float32) - 1
    return ts.astype(np.float32).tolist()


def ddim_timesteps(steps: int, spacing: Spacing, schedule: NoiseSchedule, steps_offset: int = 1) -> list[float]:
    """Integer timesteps of diffusers' DDIMScheduler (linspace rounds to integers), descending."""
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
    """Integer timesteps of diffusers' DPMSolverMultistepScheduler (its own n+1-point grids), descending."""
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


def interp_sigmas(timesteps: Sequence[float], schedule: NoiseSchedule) -> list[float]:
    """sigma at (possibly fractional) timesteps, linear in t, unrounded float64 (what Euler's Karras option reads)."""
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


def sigma_to_timestep(sigma: float, schedule: NoiseSchedule) -> float:
    """Fractional timestep whose sigma is `sigma`, interpolating linearly in log-sigma (diffusers' _sigma_to_t)."""
    log_sigmas = np.log(_train_sigmas(schedule))  # float32, as diffusers keeps it
    log_sigma = np.log(max(sigma, 1e-10))
    low = int(np.cumsum(log_sigma - log_sigmas >= 0).argmax().clip(max=len(log_sigmas) - 2))
    w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])
    w = float(np.clip(w, 0, 1))
    return (1 - w) * low + w * (low + 1)
