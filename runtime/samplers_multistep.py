"""Multistep ODE / SDE solvers as pure functions (DPM-Solver++, UniPC, DEIS), matched step for step with diffusers.

Same contract as `samplers.py`: `sample_x(denoise, x, sigmas, noise=None, callback=None, **options) -> x`
in sigma space (x = x0 + sigma * eps; `denoise(x, sigma)` returns x0), `sigmas` CPU Python floats with
one entry per step plus the level the last step lands on, randomness only from an explicit source, no
I/O, no in-place edits of the caller's tensors. `callback(i, sigma_next, x)` runs after step i and may
return a replacement x (`samplers.step_end`).

diffusers' variance-preserving schedulers hold x_t = x / sqrt(sigma^2 + 1); in sigma space their updates
lose the alpha_t factors: with lambda = -log(sigma) and h = lambda_next - lambda = log(sigma / sigma_next),
DPM-Solver++'s first-order step is x_next = (sigma_next / sigma) * x - expm1(-h) * denoised.

State diffusers keeps in the scheduler object becomes plain options, per step where it varies along
the schedule (tuples of length n, so a plan can slice them with the steps): the highest solver order
each step may use (`dpm_solver_max_orders`, `unipc_max_orders`; the warm-up from first order at a
run's first step is the sampler's own), the singlestep groups (`dpm_singlestep_orders`), UniPC's
correctors (`unipc_correctors`). Seeded Brownian-tree SDE sampling is in samplers_sde.py, LCM / TCD in
samplers_consistency.py.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Literal

import numpy as np
import torch

from .denoisers import Denoiser
from .samplers import NoiseSource, StepCallback, _need, step_end

DpmSolverType = Literal["midpoint", "heun"]
UniPCSolverType = Literal["bh1", "bh2"]


# --- per-step options: solver orders and correctors ---------------------------------------------


def dpm_solver_max_orders(
    total_steps: int,
    solver_order: int,
    *,
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    final_sigma_zero: bool = True,
) -> tuple[int, ...]:
    """Highest order each step of a `total_steps` schedule may use in DPMSolverMultistepScheduler.step.

    The last step is first order with `euler_at_final`, a zero final sigma, or `lower_order_final` below
    15 steps; the one before it at most second order under that `lower_order_final` rule. The warm-up
    (order 1, 2, ... from a run's first step) is the sampler's. DEISMultistepScheduler uses the same
    rule with euler_at_final and final_sigma_zero False.
    """
    few = lower_order_final and total_steps < 15
    orders = [solver_order] * total_steps
    if total_steps >= 2 and few:
        orders[-2] = min(solver_order, 2)
    if euler_at_final or few or final_sigma_zero:
        orders[-1] = 1
    return tuple(orders)


def unipc_max_orders(total_steps: int, solver_order: int, lower_order_final: bool = True) -> tuple[int, ...]:
    """Highest UniPC order per step (UniPCMultistepScheduler.step): lowered to the steps left with lower_order_final."""
    if not lower_order_final:
        return (solver_order,) * total_steps
    return tuple(min(solver_order, total_steps - k) for k in range(total_steps))


def unipc_correctors(total_steps: int, disable_corrector: Collection[int] = ()) -> tuple[bool, ...]:
    """Whether step k first corrects step k - 1's result (UniPC's disable_corrector lists those k - 1)."""
    return tuple(k > 0 and k - 1 not in disable_corrector for k in range(total_steps))


def _check_order(solver_order: int, highest: int = 3) -> None:
    """Solver orders these samplers implement."""
    if not 1 <= solver_order <= highest:
        raise ValueError(f"solver_order must be 1 .. {highest}, got {solver_order}")


def _per_step(values: Sequence, n: int, name: str) -> Sequence:
    """A per-step option, checked against the step count."""
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} steps")
    return values


# --- DPM-Solver++ multistep (ODE and SDE) -------------------------------------------------------


def _dpm_coefficients(h: float, order: int, solver_type: DpmSolverType, sde: bool) -> tuple[float, float, float, float]:
    """(x scale, D0, D1, D2 coefficients) of a DPM-Solver++ multistep update in sigma space (arXiv:2211.01095)."""
    if sde:  # SDE-DPM-Solver++ (section 5 / appendix): phi terms in 2h, x decays with exp(-h) too
        phi1 = -math.expm1(-2 * h)
        d1 = 0.5 * phi1 if (order == 2 and solver_type == "midpoint") else math.expm1(-2 * h) / (2 * h) + 1
        d2 = (phi1 - 2 * h) / (2 * h) ** 2 - 0.5
        return math.exp(-h), phi1, d1, d2
    phi1 = -math.expm1(-h)
    d1 = 0.5 * phi1 if (order == 2 and solver_type == "midpoint") else math.expm1(-h) / h + 1
    d2 = -((math.expm1(-h) + h) / h**2 - 0.5)
    return 1.0, phi1, d1, d2


def _dpm_derivatives(
    denoised: list[torch.Tensor], lambdas: list[float], lambda_next: float, order: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """D0, D1, D2 of the multistep formula from the last `order` denoised outputs (newest last)."""
    m0 = denoised[-1]
    if order == 1:
        return m0, None, None
    h = lambda_next - lambdas[-1]
    r0 = (lambdas[-1] - lambdas[-2]) / h
    d1_0 = (m0 - denoised[-2]) / r0
    if order == 2:
        return m0, d1_0, None
    r1 = (lambdas[-2] - lambdas[-3]) / h
    d1_1 = (denoised[-2] - denoised[-3]) / r1
    return m0, d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1)), (d1_0 - d1_1) / (r0 + r1)


def sample_dpmpp_multistep(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    solver_order: int = 2,
    solver_type: DpmSolverType = "midpoint",
    sde: bool = False,
    max_orders: Sequence[int] | None = None,
) -> torch.Tensor:
    """DPM-Solver++ multistep, ODE or SDE (Lu et al. 2022, arXiv:2211.01095), as DPMSolverMultistepScheduler.

    Step i runs at order min(solver_order, max_orders[i], i + 1) (see `dpm_solver_max_orders`; default:
    first order on a step landing on sigma 0). The SDE variant draws one noise tensor per step, the
    last included, in diffusers' order; a step landing on sigma 0 returns its denoised estimate.
    """
    n = len(sigmas) - 1
    _check_order(solver_order)
    caps = dpm_solver_max_orders(n, solver_order, final_sigma_zero=sigmas[-1] == 0) if max_orders is None else max_orders
    orders = [min(solver_order, cap, i + 1) for i, cap in enumerate(_per_step(caps, n, "max_orders"))]
    outputs: list[torch.Tensor] = []
    lambdas: list[float] = []
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        outputs = (outputs + [denoise(x, sigma)])[-3:]
        lambdas = (lambdas + [-math.log(sigma)])[-3:]
        z = _need(noise)(tuple(x.shape)) if sde else None
        if sigma_next == 0:
            x = outputs[-1]
        else:
            h = math.log(sigma / sigma_next)
            x_scale, c0, c1, c2 = _dpm_coefficients(h, orders[i], solver_type, sde)
            d0, d1, d2 = _dpm_derivatives(outputs, lambdas, -math.log(sigma_next), orders[i])
            x = x * (sigma_next / sigma * x_scale) + d0 * c0
            x = x if d1 is None else x + d1 * c1
            x = x if d2 is None else x + d2 * c2
            if z is not None:
                x = x + z * (sigma_next * math.sqrt(-math.expm1(-2 * h)))
        x = step_end(callback, i, sigma_next, x)
    return x


def sample_dpmpp_2m_sde(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    solver_type: DpmSolverType = "midpoint",
    max_orders: Sequence[int] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, arXiv:2211.01095): DPMSolverMultistepScheduler sde-dpmsolver++, order 2."""
    return sample_dpmpp_multistep(denoise, x, sigmas, noise, callback, solver_order=2, solver_type=solver_type,
                                  sde=True, max_orders=max_orders)


def sample_dpmpp_3m_sde(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    max_orders: Sequence[int] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (Lu et al. 2022, arXiv:2211.01095): DPMSolverMultistepScheduler sde-dpmsolver++, order 3."""
    return sample_dpmpp_multistep(denoise, x, sigmas, noise, callback, solver_order=3, sde=True, max_orders=max_orders)


def sample_dpmpp_3m(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    max_orders: Sequence[int] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022, arXiv:2211.01095): DPMSolverMultistepScheduler dpmsolver++, order 3."""
    return sample_dpmpp_multistep(denoise, x, sigmas, noise, callback, solver_order=3, max_orders=max_orders)


# --- DPM-Solver++ singlestep (DPMSolverSinglestepScheduler) -------------------------------------


def dpm_singlestep_orders(total_steps: int, solver_order: int, *, lower_order_final: bool = False,
                          final_sigma_zero: bool = True) -> tuple[int, ...]:
    """Order of each step of DPMSolverSinglestepScheduler (its get_order_list): groups 1, 2(, 3), each group one
    singlestep update from the group's first level; lower_order_final is forced on by uneven step counts or
    a zero final sigma, as diffusers' set_timesteps forces it."""
    if solver_order == 1:
        return (1,) * total_steps
    lower = lower_order_final or total_steps % solver_order != 0 or final_sigma_zero
    groups, rest = divmod(total_steps, solver_order)
    pattern = list(range(1, solver_order + 1))
    if not lower:
        orders = pattern * groups
    elif rest == 0:
        orders = pattern * (groups - 1) + pattern[:-1] + [1]
    else:
        orders = pattern * groups + pattern[:rest]
    if final_sigma_zero:
        orders[-1] = 1
    return tuple(orders)


def sample_dpmpp_singlestep(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    solver_order: int = 2,
    solver_type: DpmSolverType = "midpoint",
    sde: bool = False,
    orders: Sequence[int] | None = None,
) -> torch.Tensor:
    """DPM-Solver++ singlestep, e.g. DPM-Solver++(2S) (Lu et al. 2022, arXiv:2211.01095, algorithm 1), as
    DPMSolverSinglestepScheduler.

    An order-k step (see `dpm_singlestep_orders`; k <= steps run so far + 1) goes from the level of the
    last first-order step, using the model outputs since, so the intermediate levels of a group are its
    first-order predictions. The SDE variant draws one noise tensor per step.
    """
    n = len(sigmas) - 1
    _check_order(solver_order)
    given = dpm_singlestep_orders(n, solver_order, final_sigma_zero=sigmas[-1] == 0) if orders is None else orders
    outputs: list[torch.Tensor] = []
    x_start = x
    for i, wanted in enumerate(_per_step(given, n, "orders")):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        outputs = (outputs + [denoise(x, sigma)])[-3:]
        z = _need(noise)(tuple(x.shape)) if sde else None
        order = min(wanted, solver_order, i + 1)
        if order == 1:
            x_start = x
        if sigma_next == 0:
            x = outputs[-1]
        else:
            x = _singlestep_update(x_start, outputs, sigmas[i + 1 - order:i + 1], sigma_next, order, solver_type, z)
        x = step_end(callback, i, sigma_next, x)
    return x


def _singlestep_update(x_start: torch.Tensor, outputs: list[torch.Tensor], levels: Sequence[float], sigma_next: float,
                       order: int, solver_type: DpmSolverType, z: torch.Tensor | None) -> torch.Tensor:
    """One singlestep DPM-Solver++ update from levels[0] (where x_start is) with the last `order` outputs."""
    lam = [-math.log(s) for s in levels]
    h = -math.log(sigma_next) - lam[0]
    x_scale, c0, c1, c2 = _dpm_coefficients(h, order, solver_type, z is not None)
    out = x_start * (sigma_next / levels[0] * x_scale)
    if order == 1:
        out = out + outputs[-1] * c0
    elif order == 2:
        m1, m0 = outputs[-2:]
        out = out + m1 * c0 + (m0 - m1) * (c1 * h / (lam[1] - lam[0]))
    else:
        m2, m1, m0 = outputs[-3:]
        r1, r0 = (lam[1] - lam[0]) / h, (lam[2] - lam[0]) / h
        d1_0, d1_1 = (m1 - m2) / r1, (m0 - m2) / r0
        out = out + m2 * c0
        if solver_type == "midpoint":
            out = out + d1_1 * c1
        else:
            out = out + (d1_0 * r0 - d1_1 * r1) * (c1 / (r0 - r1)) + (d1_1 - d1_0) * (2 * c2 / (r0 - r1))
    if z is not None:
        out = out + z * (sigma_next * math.sqrt(-math.expm1(-2 * h)))
    return out


# --- UniPC (UniPCMultistepScheduler) -------------------------------------------------------------


def _unipc_rhos(rks: list[float], hh: float, b_h: float, order: int, corrector: bool) -> list[float]:
    """UniPC's rho coefficients: solve R rho = b(h) (Zhao et al. 2023, arXiv:2302.04867, algorithms 1-2, B(h) form)."""
    if order == 1 and corrector:
        return [0.5]
    if order == 2 and not corrector:
        return [0.5]
    if order == 1:
        return []
    rks = rks + [1.0]
    h_phi_k, factorial, b = math.expm1(hh) / hh - 1, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    matrix = np.array([[rk ** (i - 1) for rk in rks] for i in range(1, order + 1)])
    size = order if corrector else order - 1
    return np.linalg.solve(matrix[:size, :size], np.array(b[:size])).tolist()


def _unipc_update(x: torch.Tensor, outputs: list[torch.Tensor], sigmas: list[float], sigma_next: float,
                  order: int, solver_type: UniPCSolverType, predict_x0: bool,
                  model_next: torch.Tensor | None = None) -> torch.Tensor:
    """A UniP predictor step (model_next None) or UniC corrector step from sigmas[-1] to sigma_next.

    `outputs` / `sigmas`: the model outputs (x0, or eps when not predict_x0) and their sigmas, newest last.
    """
    m0 = outputs[-1]
    if predict_x0 and sigma_next == 0:  # h = inf: the step returns the denoised estimate (diffusers' bh1: NaN)
        return m0
    lam = [-math.log(s) for s in sigmas]
    h = -math.log(sigma_next) - lam[-1]
    hh = -h if predict_x0 else h
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    rks = [(lam[-1 - k] - lam[-1]) / h for k in range(1, order)]  # r_k = (lambda_{s_k} - lambda_s0) / h
    rhos = _unipc_rhos(rks, hh, b_h, order, corrector=model_next is not None)
    res: torch.Tensor | None = None
    for k, (rho, rk) in enumerate(zip(rhos, rks), start=1):
        term = (outputs[-1 - k] - m0) * (rho / rk)
        res = term if res is None else res + term
    if model_next is not None:
        term = (model_next - m0) * rhos[-1]
        res = term if res is None else res + term
    if predict_x0:
        out = x * (sigma_next / sigmas[-1]) - m0 * math.expm1(hh)
        return out if res is None else out - res * b_h
    out = x - m0 * (sigma_next * math.expm1(hh))
    return out if res is None else out - res * (sigma_next * b_h)


def sample_unipc(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    solver_order: int = 2,
    solver_type: UniPCSolverType = "bh2",
    predict_x0: bool = True,
    max_orders: Sequence[int] | None = None,
    correctors: Sequence[bool] | None = None,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, arXiv:2302.04867): UniP-p predictor + UniC corrector, as UniPCMultistepScheduler.

    Step i first corrects step i - 1's result with the model output at it (no extra model call) when
    correctors[i] (see `unipc_correctors`; never at a run's first step), then predicts at order
    min(solver_order, max_orders[i], i + 1) (see `unipc_max_orders`). predict_x0=False runs on eps
    and cannot land on sigma 0 (diffusers gives NaN there).
    """
    n = len(sigmas) - 1
    if not predict_x0 and sigmas[-1] == 0:
        raise ValueError("UniPC with predict_x0=False cannot land on sigma 0; use final_sigmas_type='sigma_min'")
    caps = unipc_max_orders(n, solver_order) if max_orders is None else _per_step(max_orders, n, "max_orders")
    orders = [min(solver_order, cap, i + 1) for i, cap in enumerate(caps)]
    correct = unipc_correctors(n) if correctors is None else _per_step(correctors, n, "correctors")
    outputs: list[torch.Tensor] = []
    x_last: torch.Tensor | None = None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        model_out = denoised if predict_x0 else (x - denoised) / sigma
        if x_last is not None and correct[i]:
            x = _unipc_update(x_last, outputs, list(sigmas[i - len(outputs):i]), sigma, orders[i - 1],
                              solver_type, predict_x0, model_next=model_out)
        outputs = (outputs + [model_out])[-solver_order:]
        x_last = x
        x = _unipc_update(x, outputs, list(sigmas[i + 1 - len(outputs):i + 1]), sigma_next, orders[i], solver_type,
                          predict_x0)
        x = step_end(callback, i, sigma_next, x)
    return x


# --- DEIS (DEISMultistepScheduler) ----------------------------------------------------------------


def _deis_integral_2(t: float, b: float, c: float) -> float:
    """Antiderivative of the Lagrange basis (log rho - log c) / (log b - log c) over rho (DEIS logrho, order 2)."""
    return t * (-math.log(c) + math.log(t) - 1) / (math.log(b) - math.log(c))


def _deis_integral_3(t: float, b: float, c: float, d: float) -> float:
    """Antiderivative of the quadratic Lagrange basis in log rho, node b, others c and d (DEIS logrho, order 3)."""
    lt, lc, ld = math.log(t), math.log(c), math.log(d)
    num = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
    return num / ((math.log(b) - lc) * (math.log(b) - ld))


def _deis_coefficients(rhos: list[float], rho_next: float) -> list[float]:
    """Weights of eps_0, eps_1, ... (newest first) integrating the log-rho polynomial from rhos[0] to rho_next."""
    if len(rhos) == 1:
        return [rho_next - rhos[0]]
    if len(rhos) == 2:
        r0, r1 = rhos
        return [_deis_integral_2(rho_next, r0, r1) - _deis_integral_2(r0, r0, r1),
                _deis_integral_2(rho_next, r1, r0) - _deis_integral_2(r0, r1, r0)]
    r0, r1, r2 = rhos
    return [_deis_integral_3(rho_next, r0, r1, r2) - _deis_integral_3(r0, r0, r1, r2),
            _deis_integral_3(rho_next, r1, r2, r0) - _deis_integral_3(r0, r1, r2, r0),
            _deis_integral_3(rho_next, r2, r0, r1) - _deis_integral_3(r0, r2, r0, r1)]


def sample_deis(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: Sequence[float],
    noise: NoiseSource | None = None,
    callback: StepCallback | None = None,
    *,
    solver_order: int = 2,
    max_orders: Sequence[int] | None = None,
) -> torch.Tensor:
    """DEIS multistep, log-rho polynomial extrapolation of eps (Zhang & Chen 2022, arXiv:2204.13902), as
    DEISMultistepScheduler. In sigma space rho = sigma, so x_next = x + sum_j C_j eps_j.

    Step i runs at order min(solver_order, max_orders[i], i + 1) (see `dpm_solver_max_orders` with
    final_sigma_zero=False: DEIS lands on the training sigma_min, never on 0).
    """
    n = len(sigmas) - 1
    _check_order(solver_order)
    if sigmas[-1] <= 0:
        raise ValueError("DEIS (log rho) needs a final sigma above 0, e.g. the training sigma_min")
    caps = dpm_solver_max_orders(n, solver_order, final_sigma_zero=False) if max_orders is None else max_orders
    orders = [min(solver_order, cap, i + 1) for i, cap in enumerate(_per_step(caps, n, "max_orders"))]
    eps: list[torch.Tensor] = []
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        eps = ([(x - denoise(x, sigma)) / sigma] + eps)[:3]  # newest first
        weights = _deis_coefficients([sigmas[i - j] for j in range(orders[i])], sigma_next)
        for w, e in zip(weights, eps):
            x = x + e * w
        x = step_end(callback, i, sigma_next, x)
    return x
