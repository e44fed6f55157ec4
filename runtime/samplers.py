"""Samplers as small pure functions (k-diffusion style): denoiser, latents, sigmas, noise in; latents out.

Every sampler works in sigma space (x = x0 + sigma * eps) and takes `sigmas` as CPU Python floats,
one per step plus the level the last step lands on. Randomness comes only from the explicit
`noise` source, drawn exactly as often and in the same order as the diffusers scheduler the
sampler reproduces. Nothing here logs, syncs a device or modifies the caller's tensors.
`callback`, if given, is called after step i with (i, sigma the new x is at, new x); a tensor it returns
replaces x from there on (step i + 1 starts from it, or it is the result), None keeps x: the latents a
diffusers pipeline loop rewrites between scheduler.step calls (inpainting's blend), while the sampler's
history (earlier denoised outputs, ...) stays as computed. Options are keyword-only; per-step options
are sequences with one value per step.

The variance-preserving samplers (DDIM, DDPM, PNDM) do their update in diffusers' x_t = x / sqrt(sigma^2 + 1)
form, with abar = 1 / (sigma^2 + 1), and convert back at the edges: their steps may land on a level
(`targets`) other than the next step's sigma, and x_t is then read at the next sigma as diffusers reads it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .denoisers import Denoiser

NoiseSource = Callable[[tuple[int, ...]], torch.Tensor]  # shape -> standard normal noise on x's device
# (step index, sigma of x, x) after each step -> a replacement x, or None to keep it
StepCallback = Callable[[int, float, torch.Tensor], "torch.Tensor | None"]


class SeededNoise:
    """Standard normal noise from a seeded CPU generator: the stream diffusers' `randn_tensor` draws."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.device = torch.device(device)

    def __call__(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Draw float32 noise of `shape` on the CPU generator and move it to the target device."""
        return torch.randn(shape, generator=self.generator, dtype=torch.float32).to(self.device)


def step_end(callback: StepCallback | None, i: int, sigma: float, x: torch.Tensor) -> torch.Tensor:
    """x after step i: what `callback(i, sigma, x)` returns in its place (a pipeline's edit), else x itself."""
    if callback is None:
        return x
    replaced = callback(i, sigma, x)
    return x if replaced is None else replaced


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
        x = step_end(callback, i, sigma_next, x)
    return x


def sample_euler_ancestral(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    levels: Sequence[tuple[float, ...]] | None = None,
) -> torch.Tensor:
    """Ancestral Euler (Ho et al. 2020 ancestral sampling, in the form of Karras et al. 2022 / k-diffusion).

    Draws noise at every step, the last included (times sigma_up = 0 there), as diffusers does, so a
    shared seeded source stays in step with diffusers' generator. `levels` gives each step's
    (sigma_down, sigma_up, ...) precomputed (diffusers' float32 values: sigma_down cancels when sigma >> sigma_next).
    """
    noise = _need(noise)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next) if levels is None else levels[i][:2]
        d = (x - denoise(x, sigma)) / sigma
        x = x + d * (sigma_down - sigma) + noise(tuple(x.shape)) * sigma_up
        x = step_end(callback, i, sigma_next, x)
    return x


def sample_heun(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    half_last_step: bool = False,
) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, arXiv:2206.00364, algorithm 1); Euler on the step to 0.

    `half_last_step`: the last step stops after its Euler stage (diffusers' SDXL base cut between two calls).
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, sigma)) / sigma
        if sigma_next == 0 or (half_last_step and i == len(sigmas) - 2):
            x = x + d * (sigma_next - sigma)
        else:
            x_2 = x + d * (sigma_next - sigma)
            d_2 = (x_2 - denoise(x_2, sigma_next)) / sigma_next
            x = x + (d + d_2) / 2 * (sigma_next - sigma)
        x = step_end(callback, i, sigma_next, x)
    return x


def _log_midpoint(sigma: float, sigma_to: float) -> float:
    """The geometric mean of two sigmas (the midpoint in log-sigma, k-diffusion's DPM-2)."""
    return math.exp(math.log(sigma) + 0.5 * (math.log(sigma_to) - math.log(sigma)))


def sample_dpm_2(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    half_last_step: bool = False,
) -> torch.Tensor:
    """DPM-Solver-2 (Lu et al. 2022, arXiv:2206.00927, algorithm 1) in k-diffusion's form: a midpoint in log-sigma.

    `half_last_step`: the last step stops at its midpoint (diffusers' SDXL base cut between two calls).
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, sigma)) / sigma
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            sigma_mid = _log_midpoint(sigma, sigma_next)
            x_2 = x + d * (sigma_mid - sigma)
            if half_last_step and i == len(sigmas) - 2:
                x = x_2
                x = step_end(callback, i, sigma_mid, x)
                break
            d_2 = (x_2 - denoise(x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (sigma_next - sigma)
        x = step_end(callback, i, sigma_next, x)
    return x


def sample_dpm_2_ancestral(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    levels: Sequence[tuple[float, float, float]] | None = None,
    half_last_step: bool = False,
) -> torch.Tensor:
    """Ancestral DPM-Solver-2 (k-diffusion): DPM-2 to sigma_down, then noise * sigma_up; none on the step to 0.

    `levels` gives each step's (sigma_down, sigma_up, sigma_mid) precomputed (diffusers computes them
    in float32 in set_timesteps, where sigma_down = sqrt(sigma_next^2 - sigma_up^2) cancels badly).
    `half_last_step`: the last step stops at its midpoint (diffusers' SDXL base cut between two calls).
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, sigma)) / sigma
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            if levels is None:
                sigma_down, sigma_up = _ancestral_step(sigma, sigma_next)
                sigma_mid = _log_midpoint(sigma, sigma_down)
            else:
                sigma_down, sigma_up, sigma_mid = levels[i]
            x_2 = x + d * (sigma_mid - sigma)
            if half_last_step and i == len(sigmas) - 2:
                x = x_2
                x = step_end(callback, i, sigma_mid, x)
                break
            d_2 = (x_2 - denoise(x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (sigma_down - sigma) + _need(noise)(tuple(x.shape)) * sigma_up
        x = step_end(callback, i, sigma_next, x)
    return x


def _lms_coefficient(sigmas: Sequence[float], j: int, order: int, k: int) -> float:
    """Integral over [sigma_j, sigma_j+1] of the Lagrange basis polynomial of node j - k (nodes j, j-1, ..)."""
    nodes = [sigmas[j - m] for m in range(order) if m != k]
    basis = np.polynomial.Polynomial.fromroots(nodes) if nodes else np.polynomial.Polynomial([1.0])
    poly = basis / float(np.prod([sigmas[j - k] - n for n in nodes]))
    antiderivative = poly.integ()
    return float(antiderivative(sigmas[j + 1]) - antiderivative(sigmas[j]))


def sample_lms(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    order: int = 4,
    history: Sequence[float] = (),
) -> torch.Tensor:
    """Linear multistep (k-diffusion's sample_lms, Adams-Bashforth in sigma) as diffusers' LMSDiscreteScheduler.

    `history` is the full schedule's sigmas before sigmas[0] (steps skipped by img2img strength):
    diffusers picks the order from the absolute step index (min(index + 1, order)) and fits the
    polynomial through those earlier sigmas, while using only the derivatives this run has seen.
    """
    full = list(history) + list(sigmas)
    derivatives: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        j, sigma, sigma_next = len(history) + i, sigmas[i], sigmas[i + 1]
        derivatives = (derivatives + [(x - denoise(x, sigma)) / sigma])[-order:]
        cur_order = min(j + 1, order)
        coeffs = [_lms_coefficient(full, j, cur_order, k) for k in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(derivatives)))
        x = step_end(callback, i, sigma_next, x)
    return x


# ---------------------------------------------------------------------------- variance-preserving samplers


def _vp_scale(sigma: float) -> float:
    """sqrt(sigma^2 + 1) = 1 / sqrt(abar): x (sigma space) = x_t * this."""
    return math.sqrt(sigma**2 + 1)


def sample_ddim(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    eta: float = 0.0,
    targets: Sequence[float] | None = None,
    x0_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, arXiv:2010.02502, eq. 12) in sigma space, x_sigma = x_t / sqrt(abar_t).

    Step i goes from sigmas[i] to targets[i] (default sigmas[i + 1]); where a target differs from
    sigmas[i + 1] the result is re-read as x_t at sigmas[i + 1], which is what diffusers' DDIMScheduler
    does when it steps to t - T // n rather than to the next timestep (trailing / linspace spacings).
    With eta > 0, noise is drawn at every step (DDIM's sigma_t(eta), eq. 16). `x0_transform`
    (clip_sample / thresholding) changes x0 only: the direction keeps the model's own eps, as diffusers.
    """
    targets = sigmas[1:] if targets is None else targets
    for i in range(len(sigmas) - 1):
        sigma, sigma_to, sigma_next = sigmas[i], targets[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_to, eta)
        if x0_transform is None:
            x = denoised + (x - denoised) * (sigma_down / sigma)
        else:
            x = x0_transform(denoised) + (x - denoised) * (sigma_down / sigma)
        if eta > 0:
            x = x + _need(noise)(tuple(x.shape)) * sigma_up
        if sigma_to != sigma_next:
            x = x * (_vp_scale(sigma_next) / _vp_scale(sigma_to))
        x = step_end(callback, i, sigma_next, x)
    return x


def sample_ddpm(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    variance: str = "fixed_small",
    draws: Sequence[bool] | None = None,
) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, arXiv:2006.11239, eqs. 6-7) over the given levels.

    Posterior mean from x0 and x_t, plus noise with the posterior variance (`fixed_small`,
    `fixed_small_log`) or beta_t (`fixed_large`), as diffusers' DDPMScheduler; noise is drawn at
    step i if draws[i] (diffusers draws whenever t > 0, even where the variance is 0).
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        abar, abar_prev = 1 / (sigma**2 + 1), 1 / (sigma_next**2 + 1)
        beta = 1 - abar / abar_prev
        denoised = denoise(x, sigma)
        x_t = x / _vp_scale(sigma)
        mean = denoised * (abar_prev**0.5 * beta / (1 - abar)) + x_t * ((abar / abar_prev) ** 0.5 * (1 - abar_prev) / (1 - abar))
        if draws is None or draws[i]:
            std = beta**0.5 if variance == "fixed_large" else max((1 - abar_prev) / (1 - abar) * beta, 1e-20) ** 0.5
            mean = mean + _need(noise)(tuple(x.shape)) * std
        x = mean * _vp_scale(sigma_next)
        x = step_end(callback, i, sigma_next, x)
    return x


def _plms_update(sample_t: torch.Tensor, eps: torch.Tensor, abar: float, abar_prev: float) -> torch.Tensor:
    """PNDM's transfer x_t -> x_t_prev given eps (Liu et al. 2022, arXiv:2202.09778, eq. 9; diffusers' _get_prev_sample)."""
    denom = abar * (1 - abar_prev) ** 0.5 + (abar * (1 - abar) * abar_prev) ** 0.5
    return sample_t * (abar_prev / abar) ** 0.5 - eps * ((abar_prev - abar) / denom)


def _plms_combination(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the last 1-4 model outputs (newest last), PLMS's eq. 12."""
    e = outputs[::-1]
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24


def sample_plms(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    ups: Sequence[float],
    downs: Sequence[float],
    v_outputs: bool = False,
    prk_calls: int = 0,
    prk_starts: Sequence[float] = (),
) -> torch.Tensor:
    """Pseudo numerical methods (PNDM / PLMS, Liu et al. 2022, arXiv:2202.09778) as diffusers' PNDMScheduler.

    One entry of `sigmas` per UNet call. The first `prk_calls` calls are pseudo Runge-Kutta steps (4
    calls each, all transfers from the RK step's start, read at prk_starts[i], to downs[i]; the 4th
    with the RK4 combination, eq. 13). Then PLMS: each call steps from sigmas[i] to downs[i] with the
    Adams-Bashforth combination of the kept outputs (eq. 12). Without PRK, call 1 (a second evaluation
    at the same level) restarts from call 0's input, read at ups[1], and steps to sigmas[1] with the
    mean of both outputs, and is not kept. diffusers combines raw UNet outputs, so with `v_outputs` the
    combination is of v and converted to eps with the sample it is applied to.
    """
    outputs: list[torch.Tensor] = []
    x_t = first_t = x / _vp_scale(sigmas[0])
    rk_sum = torch.zeros_like(x_t)  # diffusers' cur_model_output: the RK4 weighted sum so far
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_sigma = x_t * _vp_scale(sigma)
        denoised = denoise(x_sigma, sigma)
        eps = (x_sigma - denoised) / sigma
        abar = 1 / (sigma**2 + 1)
        out = abar**0.5 * eps - (1 - abar) ** 0.5 * denoised if v_outputs else eps
        if i < prk_calls:
            role = i % 4
            if role == 0:
                first_t, rk_sum = x_t, out / 6
                outputs.append(out)
            elif role < 3:
                rk_sum = rk_sum + out / 3
            combined = out if role < 3 else rk_sum + out / 6
            sample_t, sigma_from, sigma_to = first_t, prk_starts[i], downs[i]
        elif i == 1 and prk_calls == 0:
            combined, sample_t, sigma_from, sigma_to = (out + outputs[-1]) / 2, first_t, ups[i], sigma
        else:
            outputs = (outputs + [out])[-4:]
            combined, sample_t, sigma_from, sigma_to = _plms_combination(outputs), x_t, sigma, downs[i]
        abar_from, abar_to = 1 / (sigma_from**2 + 1), 1 / (sigma_to**2 + 1)
        if v_outputs:
            combined = abar_from**0.5 * combined + (1 - abar_from) ** 0.5 * sample_t
        x_t = _plms_update(sample_t, combined, abar_from, abar_to)
        if callback is not None:
            replaced = callback(i, sigma_next, x_t * _vp_scale(sigma_next))
            x_t = x_t if replaced is None else replaced / _vp_scale(sigma_next)
    return x_t * _vp_scale(sigmas[-1])
