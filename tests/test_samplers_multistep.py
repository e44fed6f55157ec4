"""The multistep, SDE and consistency samplers against diffusers' schedulers, step for step, on a fixed denoiser.

Covers runtime/samplers_multistep.py, samplers_sde.py, samplers_consistency.py and their entries in
runtime/scheduler_config.py (a scheduler_config.json dict -> plan, vs `<Class>.from_config(dict)`).

The fixed denoiser is a deterministic fake UNet (tanh of its input, scaled by a function of t, plus a
fixed tensor), the same function in both loops. The reference loop is diffusers' own: set_timesteps,
scale_model_input, step(generator=g) where the scheduler takes a generator. Our samplers get the
diffusers scheduler's own grid (its sigmas / timesteps, or sigma(t) from its alphas_cumprod), so these
tests check the samplers, not the discretization; the denoiser maps sigma -> timestep with a table.

Tolerance: rtol = atol = 1e-5 on float32 latents, as in test_samplers.py: diffusers does its scalar maths
in float32 tensors and we do it in Python floats (float64), so results differ by a few float32 ulps.
Three cases need atol = 2e-4, all from float32 rounding:
- DEIS order 3 (measured max |diff| 1.1e-4, 20 leading steps): diffusers' log-rho coefficients cancel
  in float32 (10 linspace steps: diffusers 4.3e-5 away from a float64 run of the same maths, ours 6e-7); in float64 (diffusers' sigmas and latents cast to float64)
  the two agree to 1e-9, which `test_deis_matches_diffusers_in_float64` checks.
- DPM-Solver++(3M) SDE landing on sigma_min without lowering the final orders: an ill-conditioned
  run (latents grow to |x| ~ 55) in which both sides drift ~2e-5 from a float64 run (measured max |diff| 4.1e-5).
  Singlestep third-order SDE (heun) is the same float32 D2 cancellation (measured max |diff| 1.8e-5).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import diffusers
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from latentrt.families import Prediction
from latentrt.runtime.denoisers import Denoiser, make_denoiser
from latentrt.runtime.samplers import SeededNoise
from latentrt.runtime.samplers_consistency import lcm_timesteps, sample_lcm, sample_tcd, tcd_prev_timesteps
from latentrt.runtime.samplers_multistep import (
    dpm_singlestep_orders,
    dpm_solver_max_orders,
    sample_deis,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m,
    sample_dpmpp_3m_sde,
    sample_dpmpp_multistep,
    sample_dpmpp_singlestep,
    sample_unipc,
    unipc_correctors,
    unipc_max_orders,
)
from latentrt.runtime.samplers_sde import BrownianNoise, dpmpp_sde_midpoints, sample_dpmpp_sde

# torchsde warns when a query lies one float32 ulp outside the tree's [sigma_min, sigma_max]; diffusers' own
# queries (sigma -> t = -log sigma -> sigma) do the same, and we reproduce them bit for bit.
pytestmark = pytest.mark.filterwarnings("ignore:Should have t[ab]:UserWarning")

SHAPE = (2, 4, 8, 8)
FIXED = 0.1 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234))
SEED = 7
RTOL = ATOL = 1e-5
LOOSE_ATOL = 2e-4  # the float32 cases in the module docstring
SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "steps_offset": 1}
SPACINGS = ["leading", "trailing", "linspace"]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
STEPS = [1, 2, 4, 10]
Trace = list[torch.Tensor]


def fake_unet(x_in: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """The fixed deterministic 'UNet': smooth in its input, depends on t."""
    return torch.tanh(0.3 * x_in) * (0.5 + float(t) / 1000) + FIXED


def denoiser(prediction: str, table: Mapping[float, float]) -> Denoiser:
    """Our denoiser over the fake UNet, feeding the timestep the table gives for each sigma."""
    return make_denoiser(fake_unet, Prediction(prediction), table.__getitem__)


def pipeline_stub(scheduler: Any) -> Any:
    """Stand-in `self` for diffusers pipeline methods that only read `self.scheduler` (get_timesteps)."""
    return SimpleNamespace(scheduler=scheduler)


def scheduler_for(cls: type, **config: Any) -> Any:
    return cls.from_config({**SD_CONFIG, **config})


def diffusers_trace(scheduler: Any, steps: int, g: torch.Generator, done: Callable[[Any], bool] = lambda s: True,
                    dtype: torch.dtype = torch.float32, **step_kwargs: Any) -> Trace:
    """diffusers' txt2img loop from seeded noise, recording the latents after every completed step.

    dtype float64 casts the scheduler's sigmas and the latents, so its scalar maths runs in float64 too.
    """
    scheduler.set_timesteps(steps)
    if dtype != torch.float32:
        scheduler.sigmas = scheduler.sigmas.to(dtype)
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = g
    latents = randn_tensor(SHAPE, generator=g).to(dtype) * scheduler.init_noise_sigma
    trace = []
    for t in scheduler.timesteps:
        out = fake_unet(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(out, t, latents, **step_kwargs).prev_sample
        if done(scheduler):
            trace.append(latents)
    return trace


def our_trace(sample: Callable[..., torch.Tensor], sigmas: list[float], table: Mapping[float, float], prediction: str,
              noise: SeededNoise, *, variance_preserving: bool = True, init_noise_sigma: float = 1.0,
              dtype: torch.dtype = torch.float32, **options: Any) -> Trace:
    """Our sampler from the same seeded noise, latents converted to diffusers' convention at the edges."""
    scale = (lambda s: math.sqrt(s**2 + 1)) if variance_preserving else (lambda s: 1.0)
    x = noise(SHAPE).to(dtype) * init_noise_sigma * scale(sigmas[0])
    trace: Trace = []
    final = sample(denoiser(prediction, table), x, sigmas, noise, lambda i, s, xs: trace.append(xs / scale(s)),
                   **options)
    assert len(trace) == len(sigmas) - 1 and torch.equal(final / scale(sigmas[-1]), trace[-1])
    return trace


def assert_same_trace(ours: Trace, ref: Trace, rtol: float = RTOL, atol: float = ATOL) -> None:
    assert len(ours) == len(ref), "step counts differ"
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, i=i: f"step {i}: {m}")


def grid(scheduler: Any) -> tuple[list[float], dict[float, float]]:
    """A multistep scheduler's sigmas (after set_timesteps) and the sigma -> timestep table of its steps."""
    sigmas = scheduler.sigmas.tolist()
    return sigmas, dict(zip(sigmas, scheduler.timesteps.tolist()))


def compare(cls: type, config: dict, steps: int, sample: Callable[..., torch.Tensor],
            per_step: Callable[[int], dict[str, Any]] | None = None, atol: float = ATOL, rtol: float = RTOL,
            dtype: torch.dtype = torch.float32, **options: Any) -> tuple[SeededNoise, torch.Generator]:
    """Run diffusers' `cls` and our `sample` from one seed and compare every step; return both noise streams."""
    g, noise = torch.Generator().manual_seed(SEED), SeededNoise(SEED)
    scheduler = scheduler_for(cls, **config)
    ref = diffusers_trace(scheduler, steps, g, dtype=dtype)
    sigmas, table = grid(scheduler)
    if per_step is not None:
        options |= per_step(len(sigmas) - 1)
    prediction = config.get("prediction_type", "epsilon")
    assert_same_trace(our_trace(sample, sigmas, table, prediction, noise, dtype=dtype, **options), ref, rtol, atol)
    return noise, g


# --- DPM-Solver++ multistep ------------------------------------------------------------------------

DPM_VARIANTS = {  # id -> (DPMSolverMultistepScheduler settings, our sampler, its options)
    "2m_sde": ({"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, sample_dpmpp_2m_sde, {}),
    "2m_sde_heun": ({"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "heun"},
                    sample_dpmpp_2m_sde, {"solver_type": "heun"}),
    "3m_sde": ({"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, sample_dpmpp_3m_sde, {}),
    "3m": ({"algorithm_type": "dpmsolver++", "solver_order": 3}, sample_dpmpp_3m, {}),
    "2m_heun": ({"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "heun"},
                sample_dpmpp_multistep, {"solver_type": "heun"}),
}


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("variant", list(DPM_VARIANTS))
def test_dpm_solver_multistep_matches_diffusers(variant: str, spacing: str, prediction: str, steps: int):
    settings, sample, options = DPM_VARIANTS[variant]
    config = {**settings, "timestep_spacing": spacing, "prediction_type": prediction}
    noise, g = compare(diffusers.DPMSolverMultistepScheduler, config, steps, sample, **options)
    assert torch.equal(noise(SHAPE), randn_tensor(SHAPE, generator=g))  # both consumed the same draws


@pytest.mark.parametrize("steps", [4, 10, 20])
@pytest.mark.parametrize(
    "settings",
    [
        {"lower_order_final": False},
        {"euler_at_final": True},
        {"final_sigmas_type": "sigma_min"},
        {"final_sigmas_type": "sigma_min", "lower_order_final": False},
        {"final_sigmas_type": "sigma_min", "euler_at_final": True},
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
@pytest.mark.parametrize("variant", ["2m_sde", "3m_sde", "3m"])
def test_dpm_solver_order_rules_match_diffusers(variant: str, settings: dict, steps: int):
    base, sample, options = DPM_VARIANTS[variant]
    config = {**base, **settings, "timestep_spacing": "trailing"}

    def max_orders(n: int) -> dict[str, Any]:
        return {"max_orders": dpm_solver_max_orders(
            n, base["solver_order"], lower_order_final=settings.get("lower_order_final", True),
            euler_at_final=settings.get("euler_at_final", False),
            final_sigma_zero=settings.get("final_sigmas_type", "zero") == "zero")}

    ill_conditioned = variant == "3m_sde" and settings.get("final_sigmas_type") == "sigma_min" and steps >= 10
    compare(diffusers.DPMSolverMultistepScheduler, config, steps, sample, max_orders,
            atol=LOOSE_ATOL if ill_conditioned else ATOL, **options)


# --- DPM-Solver++ singlestep ---------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 12])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize(
    "settings",
    [{"solver_order": 2}, {"solver_order": 2, "solver_type": "heun"}, {"solver_order": 3},
     {"solver_order": 3, "solver_type": "heun"}, {"solver_order": 1},
     {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"},
     {"solver_order": 3, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
     {"solver_order": 3, "final_sigmas_type": "sigma_min"},
     {"solver_order": 2, "final_sigmas_type": "sigma_min", "lower_order_final": True}],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
def test_dpm_solver_singlestep_matches_diffusers(settings: dict, prediction: str, steps: int):
    order = settings["solver_order"]
    final_zero = settings.get("final_sigmas_type", "zero") == "zero"

    def orders(n: int) -> dict[str, Any]:
        return {"orders": dpm_singlestep_orders(n, order, lower_order_final=settings.get("lower_order_final", False),
                                                final_sigma_zero=final_zero)}

    noise, g = compare(diffusers.DPMSolverSinglestepScheduler, {**settings, "prediction_type": prediction}, steps,
                       sample_dpmpp_singlestep, orders, solver_order=order,
                       solver_type=settings.get("solver_type", "midpoint"),
                       sde=settings.get("algorithm_type") == "sde-dpmsolver++",
                       atol=LOOSE_ATOL if settings.get("algorithm_type") and order == 3 else ATOL)
    assert torch.equal(noise(SHAPE), randn_tensor(SHAPE, generator=g))


# --- UniPC ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_bh2_matches_diffusers(order: int, spacing: str, prediction: str, steps: int):
    config = {"solver_order": order, "solver_type": "bh2", "timestep_spacing": spacing, "prediction_type": prediction}
    compare(diffusers.UniPCMultistepScheduler, config, steps, sample_unipc, solver_order=order)


@pytest.mark.parametrize("steps", [1, 4, 10, 20])
@pytest.mark.parametrize(
    "settings",
    [
        {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},  # bh1 landing on sigma 0 is NaN in diffusers
        {"solver_type": "bh1", "final_sigmas_type": "sigma_min", "lower_order_final": False},
        {"solver_type": "bh2", "final_sigmas_type": "sigma_min", "lower_order_final": False},
        {"solver_type": "bh2", "final_sigmas_type": "sigma_min", "predict_x0": False},
        {"solver_type": "bh1", "final_sigmas_type": "sigma_min", "predict_x0": False},
        {"solver_type": "bh2", "disable_corrector": [0, 2]},
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_settings_match_diffusers(order: int, settings: dict, steps: int):
    config = {**settings, "solver_order": order, "timestep_spacing": "linspace", "prediction_type": "v_prediction"}

    def per_step(n: int) -> dict[str, Any]:
        return {"max_orders": unipc_max_orders(n, order, settings.get("lower_order_final", True)),
                "correctors": unipc_correctors(n, settings.get("disable_corrector", ()))}

    compare(diffusers.UniPCMultistepScheduler, config, steps, sample_unipc, per_step, solver_order=order,
            solver_type=settings["solver_type"], predict_x0=settings.get("predict_x0", True))


# --- DEIS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", STEPS + [20])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("order", [2, 3])
def test_deis_matches_diffusers(order: int, spacing: str, prediction: str, steps: int):
    config = {"solver_order": order, "timestep_spacing": spacing, "prediction_type": prediction}
    atol = LOOSE_ATOL if order == 3 else ATOL
    compare(diffusers.DEISMultistepScheduler, config, steps, sample_deis, atol=atol, solver_order=order)


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_deis_matches_diffusers_in_float64(spacing: str, prediction: str, steps: int):
    config = {"solver_order": 3, "timestep_spacing": spacing, "prediction_type": prediction}
    compare(diffusers.DEISMultistepScheduler, config, steps, sample_deis, atol=1e-9, rtol=1e-9,
            dtype=torch.float64, solver_order=3)


# --- img2img: a run that starts mid-schedule (per-step options sliced, warm-up restarted) ----------

IMG2IMG = {  # id -> (diffusers class, settings, our sampler, options, per-step options of the full schedule)
    "dpmpp_3m_sde": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
                     sample_dpmpp_3m_sde, {}, lambda n: {"max_orders": dpm_solver_max_orders(n, 3)}),
    "unipc_3": (diffusers.UniPCMultistepScheduler, {"solver_order": 3, "disable_corrector": [4]}, sample_unipc,
                {"solver_order": 3}, lambda n: {"max_orders": unipc_max_orders(n, 3), "correctors": unipc_correctors(n, [4])}),
    "deis_3": (diffusers.DEISMultistepScheduler, {"solver_order": 3}, sample_deis, {"solver_order": 3},
               lambda n: {"max_orders": dpm_solver_max_orders(n, 3, final_sigma_zero=False)}),
}


@pytest.mark.parametrize("strength", [0.3, 0.6])
@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("variant", list(IMG2IMG))
def test_img2img_slice_matches_diffusers(variant: str, steps: int, strength: float):
    cls, settings, sample, options, per_step = IMG2IMG[variant]
    scheduler = scheduler_for(cls, **settings, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    timesteps, _ = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(
        pipeline_stub(scheduler), steps, strength, "cpu")
    image = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    g, noise = torch.Generator().manual_seed(SEED), SeededNoise(SEED)
    latents = scheduler.add_noise(image, randn_tensor(SHAPE, generator=g), timesteps[:1])
    step_kwargs = {"generator": g} if "generator" in inspect.signature(scheduler.step).parameters else {}
    ref = []
    for t in timesteps:
        out = fake_unet(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(out, t, latents, **step_kwargs).prev_sample
        ref.append(latents)

    sigmas, table = grid(scheduler)
    start = steps - len(timesteps)
    sliced = {k: v[start:] for k, v in per_step(steps).items()}
    x = image + noise(SHAPE) * sigmas[start]
    ours: Trace = []
    sample(denoiser("epsilon", table), x, sigmas[start:], noise,
           lambda i, s, xs: ours.append(xs / math.sqrt(s**2 + 1)), **options, **sliced)
    atol = LOOSE_ATOL if variant == "deis_3" else ATOL
    assert_same_trace(ours, ref, atol=atol)


# --- DPM-Solver++ SDE with Brownian-tree noise -----------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])  # diffusers: "sample" not implemented
@pytest.mark.parametrize("spacing", SPACINGS)
def test_dpmpp_sde_matches_diffusers(spacing: str, prediction: str, steps: int):
    config = {"timestep_spacing": spacing, "prediction_type": prediction, "noise_sampler_seed": 1234}
    g, noise = torch.Generator().manual_seed(SEED), SeededNoise(SEED)
    scheduler = scheduler_for(diffusers.DPMSolverSDEScheduler, **config)
    ref = diffusers_trace(scheduler, steps, g, done=lambda s: s.state_in_first_order)
    all_sigmas = scheduler.sigmas
    sigmas = all_sigmas[0::2].tolist() + [0.0]  # diffusers repeats each inner sigma for its two stages
    timesteps = scheduler.timesteps.tolist()
    table = dict(zip(sigmas, timesteps[0::2])) | dict(zip(dpmpp_sde_midpoints(sigmas), timesteps[1::2]))
    ours = our_trace(sample_dpmpp_sde, sigmas, table, prediction, noise, variance_preserving=False,
                     init_noise_sigma=float(scheduler.init_noise_sigma), seed=1234,
                     sigma_min=float(all_sigmas[all_sigmas > 0].min()), sigma_max=float(all_sigmas.max()))
    assert_same_trace(ours, ref)


def test_dpmpp_sde_without_a_seed_takes_one_from_the_noise_source():
    sigmas, table = [14.6, 3.0, 0.5, 0.0], {14.6: 999.0, 3.0: 700.0, 0.5: 300.0}
    table |= dict.fromkeys(dpmpp_sde_midpoints(sigmas), 500.0)
    runs = [sample_dpmpp_sde(denoiser("epsilon", table), torch.zeros(SHAPE), sigmas, SeededNoise(seed))
            for seed in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_brownian_noise_is_a_seeded_standard_normal():
    draws = [BrownianNoise(seed, 0.03, 14.6)((4, 64, 64), torch.tensor(14.6), torch.tensor(7.0)) for seed in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert abs(float(draws[0].mean())) < 0.05 and abs(float(draws[0].std()) - 1) < 0.05


# --- LCM and TCD ---------------------------------------------------------------------------------


def consistency_grid(scheduler: Any, landing: float) -> tuple[list[float], dict[float, float], list[float]]:
    """sigma(t) at an LCM / TCD scheduler's timesteps then `landing`, the table, and the training sigmas."""
    abar = scheduler.alphas_cumprod
    train_sigmas = ((1 - abar) / abar).sqrt().tolist()
    timesteps = scheduler.timesteps.tolist()
    sigmas = [train_sigmas[t] for t in timesteps]
    return sigmas + [landing], dict(zip(sigmas, timesteps)), train_sigmas


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("original_steps, scaling", [(50, 10.0), (25, 10.0), (50, 1.0)])
def test_lcm_matches_diffusers(original_steps: int, scaling: float, prediction: str, steps: int):
    config = {"original_inference_steps": original_steps, "timestep_scaling": scaling, "prediction_type": prediction}
    g, noise = torch.Generator().manual_seed(SEED), SeededNoise(SEED)
    scheduler = scheduler_for(diffusers.LCMScheduler, **config)
    ref = diffusers_trace(scheduler, steps, g)
    assert lcm_timesteps(steps, original_steps) == scheduler.timesteps.tolist()
    sigmas, table, _ = consistency_grid(scheduler, 0.0)
    ours = our_trace(sample_lcm, sigmas, table, prediction, noise, timesteps=scheduler.timesteps.tolist(),
                     timestep_scaling=scaling)
    assert_same_trace(ours, ref)
    assert torch.equal(noise(SHAPE), randn_tensor(SHAPE, generator=g))


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_tcd_matches_diffusers(eta: float, prediction: str, steps: int):
    g, noise = torch.Generator().manual_seed(SEED), SeededNoise(SEED)
    scheduler = scheduler_for(diffusers.TCDScheduler, prediction_type=prediction)
    ref = diffusers_trace(scheduler, steps, g, eta=eta)
    abar0 = scheduler.alphas_cumprod[0]
    sigmas, table, train_sigmas = consistency_grid(scheduler, float(((1 - abar0) / abar0).sqrt()))
    ours = our_trace(sample_tcd, sigmas, table, prediction, noise, eta=eta, train_sigmas=train_sigmas,
                     prev_timesteps=tcd_prev_timesteps(scheduler.timesteps.tolist()))
    assert_same_trace(ours, ref)
    assert torch.equal(noise(SHAPE), randn_tensor(SHAPE, generator=g))


# --- contract ------------------------------------------------------------------------------------


def test_samplers_leave_the_callers_tensors_alone():
    sigmas = [14.6, 5.0, 1.5, 0.3, 0.0]
    table = {s: 900.0 - 200 * i for i, s in enumerate(sigmas)}
    table |= dict.fromkeys(dpmpp_sde_midpoints(sigmas), 500.0)
    train_sigmas = [0.01 * (t + 1) for t in range(1000)]
    runs = [
        (sample_dpmpp_2m_sde, {}), (sample_dpmpp_3m_sde, {}), (sample_dpmpp_3m, {}), (sample_unipc, {}),
        (sample_dpmpp_singlestep, {"solver_order": 3, "sde": True}),
        (sample_dpmpp_sde, {}), (sample_lcm, {"timesteps": [900.0, 700.0, 500.0, 300.0]}),
        (sample_tcd, {"eta": 0.3, "prev_timesteps": (700.0, 500.0, 300.0, 0.0), "train_sigmas": train_sigmas}),
    ]
    noise = SeededNoise(SEED)
    x = noise(SHAPE)
    kept = x.clone()
    for sample, options in runs:
        sample(denoiser("epsilon", table), x, sigmas, noise, **options)
    sample_deis(denoiser("epsilon", table), x, sigmas[:-1] + [0.03], noise)
    assert torch.equal(x, kept)


def test_stochastic_samplers_need_a_noise_source():
    sigmas, table = [3.0, 1.0, 0.0], {3.0: 700.0, 1.0: 400.0}
    x = torch.zeros(SHAPE)
    for sample in (sample_dpmpp_2m_sde, sample_dpmpp_3m_sde, sample_dpmpp_sde):  # dpmpp_sde: no seed either
        with pytest.raises(ValueError):
            sample(denoiser("epsilon", table), x, sigmas)


# --- through the adapter: a scheduler_config.json dict -> plan, vs <Class>.from_config(dict) -----------

ADAPTER_CASES = {  # id -> (class name, config settings, diffusers step kwargs, plan eta, atol)
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}, 0.0, ATOL),
    "dpmpp_2m_sde_heun_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                 "solver_type": "heun", "use_karras_sigmas": True}, {}, 0.0, ATOL),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, {},
                     0.0, ATOL),
    "dpmpp_3m_sigma_min": ("DPMSolverMultistepScheduler", {"solver_order": 3, "final_sigmas_type": "sigma_min",
                           "euler_at_final": True}, {}, 0.0, ATOL),
    "dpmpp_2m_thresholding": ("DPMSolverMultistepScheduler", {"thresholding": True, "sample_max_value": 1.5}, {},
                              0.0, ATOL),
    "unipc": ("UniPCMultistepScheduler", {}, {}, 0.0, ATOL),
    "unipc_bh1_3_sigma_min": ("UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3,
                              "final_sigmas_type": "sigma_min", "disable_corrector": [1]}, {}, 0.0, ATOL),
    "unipc_eps_karras": ("UniPCMultistepScheduler", {"predict_x0": False, "final_sigmas_type": "sigma_min"}, {},
                         0.0, ATOL),
    "unipc_karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}, {}, 0.0, ATOL),
    "deis": ("DEISMultistepScheduler", {}, {}, 0.0, ATOL),
    "deis_3": ("DEISMultistepScheduler", {"solver_order": 3}, {}, 0.0, LOOSE_ATOL),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 1234}, {}, 0.0, ATOL),
    "dpmpp_sde_karras": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 99, "use_karras_sigmas": True}, {}, 0.0,
                         ATOL),
    "dpmpp_2s": ("DPMSolverSinglestepScheduler", {}, {}, 0.0, ATOL),
    "dpmpp_3s_sde_karras": ("DPMSolverSinglestepScheduler", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++",
                            "use_karras_sigmas": True}, {}, 0.0, ATOL),
    "dpmpp_3s_sigma_min": ("DPMSolverSinglestepScheduler", {"solver_order": 3, "final_sigmas_type": "sigma_min",
                           "solver_type": "heun"}, {}, 0.0, ATOL),
    "lcm": ("LCMScheduler", {}, {}, 0.0, ATOL),
    "lcm_clip": ("LCMScheduler", {"clip_sample": True, "clip_sample_range": 1.5}, {}, 0.0, ATOL),
    "tcd": ("TCDScheduler", {}, {"eta": 0.3}, 0.3, ATOL),
    "tcd_deterministic": ("TCDScheduler", {}, {"eta": 0.0}, 0.0, ATOL),
}


def adapter_config(class_name: str, settings: dict, spacing: str, prediction: str) -> dict:
    return {**SD_CONFIG, "_class_name": class_name, "timestep_spacing": spacing, "prediction_type": prediction,
            **settings}


def plan_trace(plan: Any, x: torch.Tensor, noise: SeededNoise) -> Trace:
    trace: Trace = []
    final = plan.run(fake_unet, x, noise, callback=lambda i, t, latents: trace.append(latents))
    assert torch.equal(final, trace[-1])
    return trace


def first_order_done(scheduler: Any) -> bool:
    """Whether the last step() completed a step (DPMSolverSDEScheduler takes two calls per step)."""
    return getattr(scheduler, "state_in_first_order", True)


@pytest.mark.parametrize("steps", [1, 4, 10])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_scheduler_config_default_sampler_matches_diffusers(case: str, spacing: str, prediction: str, steps: int):
    from latentrt.runtime.plan import plan_from_scheduler_config

    class_name, settings, step_kwargs, eta, atol = ADAPTER_CASES[case]
    config = adapter_config(class_name, settings, spacing, prediction)
    scheduler = getattr(diffusers, class_name).from_config(config)
    g, noise = torch.Generator().manual_seed(SEED), SeededNoise(SEED)
    ref = diffusers_trace(scheduler, steps, g, first_order_done, **step_kwargs)
    plan = plan_from_scheduler_config(config, None, steps, eta=eta)
    assert plan.init_noise_sigma == float(scheduler.init_noise_sigma)
    assert_same_trace(plan_trace(plan, plan.initial_latents(noise(SHAPE)), noise), ref, atol=atol)
    if "generator" in inspect.signature(scheduler.step).parameters:
        assert torch.equal(noise(SHAPE), randn_tensor(SHAPE, generator=g))  # both consumed the same draws


@pytest.mark.parametrize(
    "sampler, class_name, overrides",
    [
        ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
        ("dpmpp_3m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
        ("unipc", "UniPCMultistepScheduler", {}),
        ("dpmpp_2s", "DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        ("deis", "DEISMultistepScheduler", {}),
        ("lcm", "LCMScheduler", {}),
        ("tcd", "TCDScheduler", {}),
    ],
)
def test_sampler_on_an_sd_pndm_config_matches_from_config(sampler: str, class_name: str, overrides: dict):
    from latentrt.runtime.plan import plan_from_scheduler_config

    config = {**SD_CONFIG, "_class_name": "PNDMScheduler", "skip_prk_steps": True, "clip_sample": False,
              "set_alpha_to_one": False}  # SD 1.5's scheduler_config.json
    scheduler = getattr(diffusers, class_name).from_config(config, **overrides)
    g, noise = torch.Generator().manual_seed(SEED), SeededNoise(SEED)
    extra: dict[str, Any] = {"eta": 0.0} if sampler == "tcd" else {}  # pipelines pass eta=0 to TCD's step
    ref = diffusers_trace(scheduler, 4, g, **extra)
    plan = plan_from_scheduler_config(config, sampler, 4)
    assert plan.sampler.value == sampler
    atol = LOOSE_ATOL if sampler == "deis" else ATOL
    assert_same_trace(plan_trace(plan, plan.initial_latents(noise(SHAPE)), noise), ref, atol=atol)


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("case", ["dpmpp_3m_sde", "unipc_bh1_3_sigma_min", "deis", "dpmpp_sde", "lcm", "dpmpp_2s",
                                  "dpmpp_3s_sigma_min"])
def test_scheduler_config_img2img_matches_diffusers(case: str, strength: float):
    from latentrt.runtime.plan import plan_from_scheduler_config

    class_name, settings, step_kwargs, eta, atol = ADAPTER_CASES[case]
    config = adapter_config(class_name, settings, "leading", "epsilon")
    steps = 10
    scheduler = getattr(diffusers, class_name).from_config(config)
    scheduler.set_timesteps(steps)
    timesteps, _ = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(
        pipeline_stub(scheduler), steps, strength, "cpu")
    image = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
    g, noise = torch.Generator().manual_seed(SEED), SeededNoise(SEED)
    latents = start_ref = scheduler.add_noise(image, randn_tensor(SHAPE, generator=g), timesteps[:1])
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs = {**step_kwargs, "generator": g}
    ref = []
    for t in timesteps:
        out = fake_unet(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(out, t, latents, **step_kwargs).prev_sample
        if first_order_done(scheduler):
            ref.append(latents)

    plan = plan_from_scheduler_config(config, None, steps, strength=strength, eta=eta)
    start = plan.noised(image, noise(SHAPE))
    torch.testing.assert_close(start, start_ref, rtol=RTOL, atol=ATOL)
    assert_same_trace(plan_trace(plan, start, noise), ref, atol=atol)


def test_dpmpp_sde_config_without_a_seed_is_reproducible_from_the_request_seed():
    from latentrt.runtime.plan import plan_from_scheduler_config

    plan = plan_from_scheduler_config({**SD_CONFIG, "_class_name": "DPMSolverSDEScheduler"}, None, 4)
    runs = [plan.run(fake_unet, plan.initial_latents(n(SHAPE)), n) for n in (SeededNoise(5), SeededNoise(5))]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(
    "settings",
    [
        {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver"},
        {"_class_name": "DPMSolverMultistepScheduler", "solver_order": 4},
        {"_class_name": "UniPCMultistepScheduler", "predict_x0": False},  # lands on 0: NaN in diffusers
        {"_class_name": "UniPCMultistepScheduler", "disable_corrector": "all"},
        {"_class_name": "DEISMultistepScheduler", "use_karras_sigmas": True},
        {"_class_name": "DPMSolverSDEScheduler", "noise_sampler_seed": "x"},
        {"_class_name": "LCMScheduler", "original_inference_steps": 2},  # fewer than the 4 steps asked
        {"_class_name": "TCDScheduler", "rescale_betas_zero_snr": True},
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
def test_unsupported_multistep_configs_raise_invalid_request(settings: dict):
    from latentrt.errors import InvalidRequest
    from latentrt.runtime.plan import plan_from_scheduler_config

    with pytest.raises(InvalidRequest):
        plan_from_scheduler_config({**SD_CONFIG, **settings}, None, 4)


@pytest.mark.parametrize("class_name", ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                                        "UniPCMultistepScheduler",
                                        "DEISMultistepScheduler", "DPMSolverSDEScheduler", "LCMScheduler",
                                        "TCDScheduler"])
def test_adapter_defaults_are_the_diffusers_class_defaults(class_name: str):
    from latentrt.runtime.scheduler_config import SCHEDULER_CLASSES

    params = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    for key, value in SCHEDULER_CLASSES[class_name].defaults.items():
        assert key in params and params[key].default == value, key
