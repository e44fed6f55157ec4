"""Denoiser wrappers: a UNet's eps / v output -> denoised x0, and classifier-free guidance.

A `Model` is the raw network: it takes the scaled model input (x * c_in, the tensor diffusers feeds
its UNet) and the UNet timestep, and returns eps or v. A `Denoiser` is what samplers call: it takes
x in sigma space (x = x0 + sigma * eps) and sigma, and returns the denoised estimate of x0
(Karras et al. 2022, arXiv:2206.00364, section 2 and table 1, with c_in = 1 / sqrt(sigma^2 + 1)).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from latentrt.families import Prediction

Model = Callable[[torch.Tensor, float], torch.Tensor]  # (x * c_in, t) -> eps or v
Denoiser = Callable[[torch.Tensor, float], torch.Tensor]  # (x, sigma) -> denoised x0


def needs_cfg(guidance: float) -> bool:
    """Whether a guidance scale calls for classifier-free guidance (a doubled UNet batch), as diffusers decides."""
    return guidance > 1.0


X0Transform = Callable[[torch.Tensor], torch.Tensor]  # denoised x0 -> clipped / thresholded x0


def make_denoiser(model: Model, prediction: Prediction, sigma_to_t: Callable[[float], float],
                  x0_transform: X0Transform | None = None) -> Denoiser:
    """Wrap an eps-, v- or x0-prediction model as a denoiser in sigma space; `x0_transform` clips / thresholds x0."""

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        scale = math.sqrt(sigma**2 + 1)  # 1 / c_in
        out = model(x / scale, sigma_to_t(sigma))
        if prediction == Prediction.EPS:
            x0 = x - sigma * out  # x0 = x - sigma * eps
        elif prediction == Prediction.V:
            x0 = x / (sigma**2 + 1) - (sigma / scale) * out  # v = alpha * eps - sigma_vp * x0 (Salimans & Ho 2022)
        else:
            x0 = out
        return x0 if x0_transform is None else x0_transform(x0)

    return denoise


def clip_x0(limit: float) -> X0Transform:
    """Clamp x0 to [-limit, limit] (diffusers' clip_sample with clip_sample_range)."""
    return lambda x0: x0.clamp(-limit, limit)


def dynamic_threshold(ratio: float, max_value: float) -> X0Transform:
    """Dynamic thresholding (Saharia et al. 2022, arXiv:2205.11487, section 2.3), as diffusers' _threshold_sample."""

    def threshold(x0: torch.Tensor) -> torch.Tensor:
        flat = x0.reshape(x0.shape[0], -1)
        s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(x0.shape)

    return threshold


def guided(model_2b: Model, guidance: float, guidance_rescale: float = 0.0) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) over a model run on a doubled batch.

    `model_2b` runs the batch torch.cat([uncond, cond]) as diffusers does; the returned model takes the
    single batch, duplicates it, makes ONE call and combines uncond + guidance * (cond - uncond).
    `guidance_rescale` > 0 applies Lin et al. 2023 (arXiv:2305.08891, section 3.4), as diffusers'
    `rescale_noise_cfg` does.
    """

    def model(x: torch.Tensor, t: float) -> torch.Tensor:
        uncond, cond = model_2b(torch.cat([x, x]), t).chunk(2)  # (2B, C, H, W) -> 2 x (B, C, H, W)
        out = uncond + guidance * (cond - uncond)
        if guidance_rescale > 0:
            out = _rescale(out, cond, guidance_rescale)
        return out

    return model


def _rescale(out: torch.Tensor, cond: torch.Tensor, amount: float) -> torch.Tensor:
    """Match the guided output's per-sample std to the conditional one, blended by `amount`."""
    dims = list(range(1, out.ndim))
    rescaled = out * (cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
    return amount * rescaled + (1 - amount) * out
