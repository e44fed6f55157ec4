"""Latent consistency (LCMScheduler) and trajectory consistency (TCDScheduler) samplers as pure functions.

Same sampler contract as samplers.py, in sigma space; the grid functions reproduce the two classes'
set_timesteps (their distillation timestep grid, not a timestep spacing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from latentrt.families import NoiseSchedule

from .denoisers import Denoiser
from .samplers import NoiseSource, StepCallback, _need, step_end
from .samplers_multistep import _per_step
from .schedules import Discretization, train_sigmas


def lcm_timesteps(steps: int, original_inference_steps: int = 50, num_train_timesteps: int = 1000,
                  strength: float = 1.0) -> list[float]:
    """LCMScheduler / TCDScheduler timesteps: `steps` evenly spaced indices into the distillation grid
    k - 1, 2k - 1, ..., k = T // original_inference_steps (Luo et al. 2023, arXiv:2310.04378, section 4.3)."""
    if not 1 <= steps <= original_inference_steps <= num_train_timesteps:
        raise ValueError(f"need 1 <= steps ({steps}) <= original_inference_steps ({original_inference_steps}) "
                         f"<= num_train_timesteps ({num_train_timesteps})")
    k = num_train_timesteps // original_inference_steps
    origin = (np.arange(1, int(original_inference_steps * strength) + 1) * k - 1)[::-1]
    if len(origin) // steps < 1:
        raise ValueError(f"{steps} steps need original_inference_steps * strength >= {steps}")
    indices = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return [float(t) for t in origin[indices]]


def consistency_grid(steps: int, schedule: NoiseSchedule, original_inference_steps: int = 50,
                     tcd: bool = False) -> Discretization:
    """LCMScheduler / TCDScheduler.set_timesteps as a grid: sigma(t) at `lcm_timesteps`, landing on 0 (LCM's
    last step returns the consistency function) or on sigma(0) (TCD's lands on t = 0), with the per-step
    options of `sample_lcm` / `sample_tcd`."""
    ts = lcm_timesteps(steps, original_inference_steps, schedule.num_train_timesteps)
    table = train_sigmas(schedule)
    sigmas = tuple(table[int(t)] for t in ts) + (table[0] if tcd else 0.0,)
    options = {"prev_timesteps": tcd_prev_timesteps(ts)} if tcd else {"timesteps": tuple(ts)}
    return Discretization(sigmas, tuple(ts), step_options=options)


def lcm_boundary_scalings(timestep: float, timestep_scaling: float = 10.0, sigma_data: float = 0.5
                          ) -> tuple[float, float]:
    """(c_skip, c_out) of the consistency boundary condition at a discrete timestep (arXiv:2310.04378, eq. 2)."""
    scaled = timestep * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / math.sqrt(scaled**2 + sigma_data**2)


def sample_lcm(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    timesteps: Sequence[float],
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """Multistep latent consistency sampling (Luo et al. 2023, arXiv:2310.04378, algorithm 1), as LCMScheduler.

    Each step takes the consistency function f = c_skip * x_t + c_out * x0 (c_skip applies to diffusers'
    x_t = x / sqrt(sigma^2 + 1)) and re-noises it to sigma_next with fresh noise; landing on 0 returns f.
    `timesteps`: the UNet timestep of each step (see `lcm_timesteps`), for the boundary scalings.
    """
    _per_step(timesteps, len(sigmas) - 1, "timesteps")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        c_skip, c_out = lcm_boundary_scalings(timesteps[i], timestep_scaling)
        x = denoise(x, sigma) * c_out + x * (c_skip / math.sqrt(sigma**2 + 1))
        if sigma_next > 0:
            x = x + _need(noise)(tuple(x.shape)) * sigma_next
        x = step_end(callback, i, sigma_next, x)
    return x


def tcd_prev_timesteps(timesteps: Sequence[float]) -> tuple[float, ...]:
    """The timestep each TCD step heads for: the next one, 0 after the last (TCDScheduler.step's prev_timestep)."""
    return tuple(timesteps[1:]) + (0.0,)


def tcd_targets(prev_timesteps: Sequence[float], eta: float, train_sigmas: Sequence[float]) -> list[float]:
    """Sigma each TCD step lands on before re-noising: that of t_s = floor((1 - eta) * t_prev)
    (Zheng et al. 2024, arXiv:2402.19159, eq. 9). `train_sigmas`: sigma(t) for t = 0 .. T-1.

    The product is rounded to float32 before the floor, as TCDScheduler.step computes it.
    """
    ts = torch.floor(torch.tensor(prev_timesteps, dtype=torch.int64) * (1 - eta)).long().tolist()
    return [train_sigmas[t] for t in ts]


def sample_tcd(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    prev_timesteps: Sequence[float],
    train_sigmas: Sequence[float],
    eta: float = 0.3,
) -> torch.Tensor:
    """Trajectory consistency distillation sampling, strategic stochastic sampling with gamma = `eta`
    (Zheng et al. 2024, arXiv:2402.19159, algorithm 4), as TCDScheduler.

    Step i moves deterministically (DDIM) to the level of `tcd_targets`, then forward-diffuses to
    sigmas[i + 1] with fresh noise when eta > 0 and that level lies below it (every step but the last).
    `prev_timesteps`: see `tcd_prev_timesteps`; `train_sigmas`: sigma(t) for t = 0 .. T-1.
    """
    targets = tcd_targets(_per_step(prev_timesteps, len(sigmas) - 1, "prev_timesteps"), eta, train_sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_s, sigma_next = sigmas[i], targets[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        x = denoised + (x - denoised) * (sigma_s / sigma)
        if eta > 0 and sigma_s < sigma_next:
            x = x + _need(noise)(tuple(x.shape)) * math.sqrt(sigma_next**2 - sigma_s**2)
        x = step_end(callback, i, sigma_next, x)
    return x
