"""Samplers as small pure functions (k-diffusion style): denoiser, latents, sigmas, noise in; latents out.

Every sampler works in sigma space (x = x0 + sigma * eps) and takes `sigmas` as CPU Python floats,
one per step plus the level the last step lands on. Randomness comes only from the explicit
`noise` source. Nothing here logs, syncs a device or modifies the caller's tensors. `callback`, if
given, is called after step i with (i, sigma the new x is at, new x).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .denoisers import Denoiser

NoiseSource = Callable[[tuple[int, ...]], torch.Tensor]  # shape -> standard normal noise on x's device
StepCallback = Callable[[int, float, torch.Tensor], None]  # (step index, sigma of x, x) after each step


class SeededNoise:
    """Standard normal noise from a seeded CPU generator: the stream diffusers' `randn_tensor` draws."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.device = torch.device(device)

    def __call__(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Draw float32 noise of `shape` on the CPU generator and move it to the target device."""
        return torch.randn(shape, generator=self.generator, dtype=torch.float32).to(self.device)


def _ancestral_step(sigma: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from sigma to sigma_to (k-diffusion's get_ancestral_step)."""
    sigma_up = eta * math.sqrt(max(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2, 0.0))
    return math.sqrt(max(sigma_to**2 - sigma_up**2, 0.0)), sigma_up


def _need(noise: NoiseSource | None) -> NoiseSource:
    """The noise source of a stochastic sampler; one must be given."""
    if noise is None:
        raise ValueError("this sampler is stochastic: pass a noise source (e.g. SeededNoise(seed))")
    return noise


def sample_euler(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, arXiv:2206.00364, algorithm 1)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, sigma)) / sigma  # dx/dsigma
        x = x + d * (sigma_next - sigma)
        if callback is not None:
            callback(i, sigma_next, x)
    return x


def sample_euler_ancestral(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Ancestral Euler (Ho et al. 2020 ancestral sampling, in the form of Karras et al. 2022 / k-diffusion).

    Draws noise at every step, the last included (times sigma_up = 0 there), as diffusers does, so a
    shared seeded source stays in step with diffusers' generator.
    """
    noise = _need(noise)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next)
        d = (x - denoise(x, sigma)) / sigma
        x = x + d * (sigma_down - sigma) + noise(tuple(x.shape)) * sigma_up
        if callback is not None:
            callback(i, sigma_next, x)
    return x


def sample_ddim(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    eta: float = 0.0,
    targets: Sequence[float] | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, arXiv:2010.02502, eq. 12) in sigma space, x_sigma = x_t / sqrt(abar_t).

    Step i goes from sigmas[i] to targets[i] (default sigmas[i + 1]); where a target differs from
    sigmas[i + 1] the result is re-read as x_t at sigmas[i + 1], which is what diffusers' DDIMScheduler
    does when it steps to t - T // n rather than to the next timestep (trailing / linspace spacings).
    With eta > 0, noise is drawn at every step (DDIM's sigma_t(eta), eq. 16).
    """
    targets = sigmas[1:] if targets is None else targets
    for i in range(len(sigmas) - 1):
        sigma, sigma_to, sigma_next = sigmas[i], targets[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_to, eta)
        x = denoised + (x - denoised) * (sigma_down / sigma)
        if eta > 0:
            x = x + _need(noise)(tuple(x.shape)) * sigma_up
        if sigma_to != sigma_next:
            x = x * (math.sqrt(sigma_next**2 + 1) / math.sqrt(sigma_to**2 + 1))
        if callback is not None:
            callback(i, sigma_next, x)
    return x


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, algorithm 2), first order on the first and 0-bound steps."""
    old_denoised: torch.Tensor | None = None
    h_last = 0.0
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)  # lambda_next - lambda, lambda = -log(sigma)
            d = denoised if old_denoised is None else denoised + (denoised - old_denoised) * (h / (2 * h_last))
            x = x * (sigma_next / sigma) - d * math.expm1(-h)
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, sigma_next, x)
    return x
