"""DPM-Solver++ SDE with seeded Brownian-tree noise (DPMSolverSDEScheduler) as a pure sampler, and its grid.

Same sampler contract as samplers.py, in sigma space. The noise is not drawn from the plain seeded
stream but from a Brownian tree (torchsde) read at the step's noise levels, as diffusers'
BrownianTreeNoiseSampler does; the tree is seeded explicitly, so the same seed gives the same image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from latentrt.families import NoiseSchedule, Spacing

from .denoisers import Denoiser
from .samplers import NoiseSource, StepCallback, _need, step_end
from .schedules import Discretization, karras_sigmas, sigma_to_timestep, train_sigmas


class BrownianNoise:
    """Brownian-tree noise over sigma from an explicit seed (torchsde, Li et al. 2020, arXiv:2001.01328).

    Draws what diffusers' BrownianTreeNoiseSampler draws for `noise_sampler_seed=seed`: the increment of one
    Brownian motion between two noise levels, divided by sqrt(|sigma_next - sigma|). The tree spans
    [sigma_min, sigma_max] of the scheduler's whole schedule (sigma_min: its smallest non-zero sigma) and
    is built on the CPU in float32 at the first call, so every backend gets the same noise.
    """

    def __init__(self, seed: int, sigma_min: float, sigma_max: float):
        self.seed, self.sigma_min, self.sigma_max = seed, sigma_min, sigma_max
        self._tree = None
        self._shape: tuple[int, ...] | None = None

    def _build(self, shape: tuple[int, ...]) -> None:
        import torchsde  # a dependency only this sampler needs

        lo, hi = torch.tensor(self.sigma_min), torch.tensor(self.sigma_max)  # float32, as diffusers passes them
        self._tree = torchsde.BrownianInterval(t0=lo, t1=hi, size=shape, dtype=torch.float32, device="cpu",
                                               entropy=self.seed, tol=1e-6, pool_size=24, halfway_tree=True)
        self._shape = shape

    def __call__(self, shape: tuple[int, ...], sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """Standard normal noise for the step sigma -> sigma_next (float32 scalars: the tree reads them exactly)."""
        if self._tree is None:
            self._build(shape)
        if shape != self._shape:
            raise ValueError(f"a BrownianNoise tree is drawn for one latent shape ({self._shape}), not {shape}")
        lo, hi, sign = (sigma, sigma_next, 1.0) if sigma < sigma_next else (sigma_next, sigma, -1.0)
        assert self._tree is not None
        increment = self._tree(lo, hi)  # W(hi) - W(lo); a tensor unless Levy areas are asked for
        assert isinstance(increment, torch.Tensor)
        return increment * sign / (sigma_next - sigma).abs().sqrt()


def seed_from_noise(noise: NoiseSource) -> int:
    """A 62-bit seed made of one draw from a seeded noise source (one device sync, before any step)."""
    bits = noise((2,)).cpu().view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    return int(bits[0]) << 31 | int(bits[1])


def _sde_levels(sigma: float, sigma_next: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 (sigma, midpoint, sigma_next) through t = -log(sigma), bit for bit as DPMSolverSDEScheduler.step.

    The Brownian tree is read at these points; a query one float32 ulp away draws visibly different noise.
    """
    t = torch.tensor(sigma, dtype=torch.float32).log().neg()
    t_next = torch.tensor(sigma_next, dtype=torch.float32).log().neg()
    t_mid = t + (t_next - t) * 0.5
    return t.neg().exp(), t_mid.neg().exp(), t_next.neg().exp()


def dpmpp_sde_midpoints(sigmas: Sequence[float]) -> list[float]:
    """The midpoint sigma at which `sample_dpmpp_sde` evaluates the model, per step not landing on 0."""
    return [float(_sde_levels(s, s_next)[1]) for s, s_next in zip(sigmas[:-1], sigmas[1:]) if s_next > 0]


def dpmpp_sde_grid(steps: int, spacing: Spacing, schedule: NoiseSchedule, steps_offset: int = 0,
                   karras: bool = False) -> Discretization:
    """DPMSolverSDEScheduler.set_timesteps: float64 timesteps and sigmas (float32 once stored), and the
    timestep diffusers feeds at each midpoint (from the float64 sigmas) as extra_timesteps."""
    n_train = schedule.num_train_timesteps
    if spacing == Spacing.LINSPACE:
        ts = np.linspace(0, n_train - 1, steps, dtype=float)[::-1]
    elif spacing == Spacing.LEADING:
        ts = (np.arange(0, steps) * (n_train // steps)).round()[::-1].astype(float) + steps_offset
    else:
        ts = np.arange(n_train, 0, -n_train / steps).round().astype(float) - 1
    sigmas = np.interp(ts, np.arange(n_train), np.asarray(train_sigmas(schedule)))
    if karras:
        sigmas = np.asarray(karras_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)[:-1])
        ts = np.array([sigma_to_timestep(s, schedule) for s in sigmas])
    t = -np.log(sigmas)
    mid_ts = [sigma_to_timestep(s, schedule) for s in np.exp(-(t[:-1] + np.diff(t) * 0.5))]
    stored = np.asarray(list(sigmas) + [0.0], dtype=np.float32).tolist()
    return Discretization(tuple(stored), tuple(float(x) for x in ts),
                          extra_timesteps=dict(zip(dpmpp_sde_midpoints(stored), mid_ts)))


def _sde_half_step(x: torch.Tensor, denoised: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor,
                   brownian: BrownianNoise) -> torch.Tensor:
    """One ancestral DPM-Solver++(1S) step from sigma_from to sigma_to with Brownian noise (k-diffusion dpmpp_sde)."""
    s_from, s_to = float(sigma_from), float(sigma_to)
    sigma_up = min(s_to, math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2))
    ratio = math.sqrt(s_to**2 - sigma_up**2) / s_from  # sigma_down / sigma_from
    z = brownian(tuple(x.shape), sigma_from, sigma_to).to(x.device)  # the tree lives on the CPU
    return x * ratio - denoised * (ratio - 1) + z * sigma_up


def sample_dpmpp_sde(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    seed: int | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """DPM-Solver++ SDE, second order with a midpoint (Lu et al. 2022, arXiv:2211.01095; k-diffusion's
    sample_dpmpp_sde with r = 1/2, eta = 1), as diffusers' DPMSolverSDEScheduler.

    Two model calls per step (at sigma and at the midpoint of `dpmpp_sde_midpoints`); a step landing on
    0 is one Euler step. Noise is Brownian-tree noise (`BrownianNoise`) from `seed` (diffusers'
    noise_sampler_seed) over [sigma_min, sigma_max] of the whole schedule (default: of `sigmas`). Without
    a seed the tree's seed is drawn from `noise` before the first step: the same noise seed gives the
    same result (diffusers then seeds the tree from the global RNG, which no run can reproduce).
    """
    positive = [s for s in sigmas if s > 0]
    if seed is None:
        seed = seed_from_noise(_need(noise))
    brownian = BrownianNoise(seed, min(positive) if sigma_min is None else sigma_min,
                             max(positive) if sigma_max is None else sigma_max)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = x + (x - denoised) / sigma * (sigma_next - sigma)
        else:
            s, s_mid, s_next = _sde_levels(sigma, sigma_next)
            x_mid = _sde_half_step(x, denoised, s, s_mid, brownian)
            x = _sde_half_step(x, denoise(x_mid, float(s_mid)), s, s_next, brownian)
        x = step_end(callback, i, sigma_next, x)
    return x
