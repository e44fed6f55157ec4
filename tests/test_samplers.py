"""Our samplers and sampling plans against diffusers' schedulers, step for step, on a fixed denoiser.

The fixed denoiser is a deterministic fake UNet (tanh of its input, scaled by a function of t, plus
a fixed tensor); it is the same function in both loops. The reference loop is diffusers' own:
set_timesteps, scale_model_input, step(generator=g), with pipeline conventions taken from diffusers'
pipeline methods (get_timesteps) where they are methods.

Tolerance: rtol = atol = 1e-5 on float32 latents. diffusers does its scalar maths in float32 tensors
and we do it in Python floats (float64), so results differ by a few float32 ulps; latents reach ~50
in sigma space at sigma_max (ulp ~4e-6 there), hence the relative term.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import diffusers
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor

from latentrt.errors import InvalidRequest
from latentrt.families import NoiseSchedule, Prediction, SamplerId, Spacing
from latentrt.runtime.denoisers import guided, make_denoiser, needs_cfg
from latentrt.runtime.plan import SamplingPlan, plan_from_scheduler_config, plan_sampling
from latentrt.runtime.samplers import SeededNoise, sample_euler

SHAPE = (2, 4, 8, 8)
FIXED = 0.1 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234))
IMAGE_LATENTS = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
SEED = 7
RTOL = ATOL = 1e-5

# SD / SDXL scheduler_config.json settings; spacing and prediction vary per test.
SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}
_DPM = {"algorithm_type": "dpmsolver++", "solver_order": 2}
# The mapping the brief specifies: sampler -> diffusers class and the settings it fixes (everything else: defaults).
REFERENCE = {
    SamplerId.EULER: (diffusers.EulerDiscreteScheduler, {}),
    SamplerId.EULER_ANCESTRAL: (diffusers.EulerAncestralDiscreteScheduler, {}),
    SamplerId.DDIM: (diffusers.DDIMScheduler, {}),
    SamplerId.DPMPP_2M: (diffusers.DPMSolverMultistepScheduler, {**_DPM, "use_karras_sigmas": False}),
    SamplerId.DPMPP_2M_KARRAS: (diffusers.DPMSolverMultistepScheduler, {**_DPM, "use_karras_sigmas": True}),
}
SAMPLERS = list(REFERENCE)
SPACINGS = [s.value for s in Spacing]
PREDICTIONS = [p.value for p in Prediction]
Trace = list[tuple[float, torch.Tensor]]


def fake_unet(x_in: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """The fixed deterministic 'UNet': smooth in its input, depends on t."""
    return torch.tanh(0.3 * x_in) * (0.5 + float(t) / 1000) + FIXED


def config(spacing: str, prediction: str, **extra: object) -> dict:
    return {**SD_CONFIG, "timestep_spacing": spacing, "prediction_type": prediction, **extra}


def from_config(cls: type, cfg: dict, **fixed: object) -> Any:
    """A diffusers scheduler built from a config dict (untyped: diffusers annotates from_config loosely)."""
    return cls.from_config(cfg, **fixed)


def reference_scheduler(sampler: SamplerId, cfg: dict) -> Any:
    cls, fixed = REFERENCE[sampler]
    return from_config(cls, cfg, **fixed)


def _pipe(scheduler: Any) -> Any:
    """Stand-in `self` for diffusers pipeline methods that only read `self.scheduler` (get_timesteps)."""
    return SimpleNamespace(scheduler=scheduler)


def diffusers_loop(scheduler, timesteps, latents: torch.Tensor, g: torch.Generator, **step_kwargs) -> Trace:
    """diffusers' denoising loop, recording (t, latents) after every step."""
    trace = []
    for t in timesteps:
        out = fake_unet(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(out, t, latents, generator=g, **step_kwargs).prev_sample
        trace.append((float(t), latents))
    return trace


def our_run(plan: SamplingPlan, x: torch.Tensor, noise: SeededNoise) -> Trace:
    """plan.run, recording (t, latents) after every step through its callback."""
    trace: Trace = []
    final = plan.run(fake_unet, x, noise, callback=lambda i, t, lat: trace.append((t, lat)))
    assert torch.equal(final, trace[-1][1])
    return trace


def assert_same_trace(ours: Trace, ref: Trace) -> None:
    assert [t for t, _ in ours] == [t for t, _ in ref], "timesteps differ"
    for i, ((_, a), (_, b)) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m, i=i: f"step {i}: {m}")


def diffusers_txt2img(sampler: SamplerId, cfg: dict, steps: int, g: torch.Generator | None = None,
                      **step_kwargs) -> tuple[Any, Trace]:
    scheduler = reference_scheduler(sampler, cfg)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(SEED) if g is None else g
    latents = randn_tensor(SHAPE, generator=g) * scheduler.init_noise_sigma
    return scheduler, diffusers_loop(scheduler, scheduler.timesteps, latents, g, **step_kwargs)


def ours_txt2img(plan: SamplingPlan, noise: SeededNoise | None = None) -> Trace:
    source = SeededNoise(SEED) if noise is None else noise
    return our_run(plan, plan.initial_latents(source(SHAPE)), source)


@pytest.mark.parametrize("steps", [1, 2, 4, 10, 25])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler", SAMPLERS, ids=[s.value for s in SAMPLERS])
def test_txt2img_matches_diffusers_step_for_step(sampler: SamplerId, spacing: str, prediction: str, steps: int):
    cfg = config(spacing, prediction)
    scheduler, ref = diffusers_txt2img(sampler, cfg, steps)
    plan = plan_from_scheduler_config(cfg, sampler, steps)
    assert plan.init_noise_sigma == float(scheduler.init_noise_sigma)
    if sampler != SamplerId.DDIM:  # DDIM has no sigmas in diffusers; its plan lands on t - T // n instead
        assert list(plan.sigmas) == scheduler.sigmas.tolist()
    assert_same_trace(ours_txt2img(plan), ref)


@pytest.mark.parametrize("steps", [1, 4, 10, 25])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_karras_matches_diffusers(spacing: str, steps: int):
    cfg = config(spacing, "epsilon", use_karras_sigmas=True)
    scheduler, ref = diffusers_txt2img(SamplerId.EULER, cfg, steps)
    plan = plan_from_scheduler_config(cfg, SamplerId.EULER, steps)
    assert list(plan.sigmas) == scheduler.sigmas.tolist()
    assert_same_trace(ours_txt2img(plan), ref)


@pytest.mark.parametrize("steps", [3, 10])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_with_eta_matches_diffusers(spacing: str, steps: int):
    cfg = config(spacing, "epsilon")
    _, ref = diffusers_txt2img(SamplerId.DDIM, cfg, steps, eta=0.7)
    assert_same_trace(ours_txt2img(plan_from_scheduler_config(cfg, SamplerId.DDIM, steps, eta=0.7)), ref)


@pytest.mark.parametrize("sampler, eta", [(SamplerId.EULER_ANCESTRAL, None), (SamplerId.DDIM, 0.5)])
def test_noise_stream_stays_in_step_with_diffusers_generator(sampler: SamplerId, eta: float | None):
    cfg, g, noise = config("trailing", "epsilon"), torch.Generator().manual_seed(SEED), SeededNoise(SEED)
    diffusers_txt2img(sampler, cfg, 4, g, **({} if eta is None else {"eta": eta}))
    ours_txt2img(plan_from_scheduler_config(cfg, sampler, 4, eta=eta or 0.0), noise)
    assert torch.equal(noise(SHAPE), randn_tensor(SHAPE, generator=g))  # both consumed the same draws


@pytest.mark.parametrize("strength", [0.3, 0.55, 1.0])
@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("sampler", SAMPLERS, ids=[s.value for s in SAMPLERS])
def test_img2img_strength_matches_diffusers(sampler: SamplerId, spacing: str, steps: int, strength: float):
    cfg = config(spacing, "epsilon")
    scheduler = reference_scheduler(sampler, cfg)
    scheduler.set_timesteps(steps)
    timesteps, _ = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(
        _pipe(scheduler), steps, strength, "cpu"
    )
    g = torch.Generator().manual_seed(SEED)
    start = scheduler.add_noise(IMAGE_LATENTS, randn_tensor(SHAPE, generator=g), timesteps[:1])
    ref = diffusers_loop(scheduler, timesteps, start, g)

    plan = plan_from_scheduler_config(cfg, sampler, steps, strength=strength)
    noise = SeededNoise(SEED)
    ours_start = plan.noised(IMAGE_LATENTS, noise(SHAPE))
    torch.testing.assert_close(ours_start, start, rtol=RTOL, atol=ATOL)
    assert_same_trace(our_run(plan, ours_start, noise), ref)


def diffusers_base_refiner(sampler: SamplerId, cfg: dict, steps: int, split: float) -> tuple[Trace, Trace]:
    """SDXL base with denoising_end=split, then the refiner (img2img) with denoising_start=split."""
    base, g = reference_scheduler(sampler, cfg), torch.Generator().manual_seed(SEED)
    base.set_timesteps(steps)
    # StableDiffusionXLPipeline.__call__, "8.1 Apply denoising_end" (inline there, so restated here):
    cutoff = int(round(base.config.num_train_timesteps - split * base.config.num_train_timesteps))
    kept = len(list(filter(lambda ts: ts >= cutoff, base.timesteps)))
    base_trace = diffusers_loop(base, base.timesteps[:kept], randn_tensor(SHAPE, generator=g) * base.init_noise_sigma, g)
    refiner = reference_scheduler(sampler, cfg)
    refiner.set_timesteps(steps)
    timesteps, _ = diffusers.StableDiffusionXLImg2ImgPipeline.get_timesteps(
        _pipe(refiner), steps, 0.3, "cpu", denoising_start=split
    )
    return base_trace, diffusers_loop(refiner, timesteps, base_trace[-1][1], g)  # no noise added at handoff


@pytest.mark.parametrize("split", [0.8, 0.5])
@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler", SAMPLERS, ids=[s.value for s in SAMPLERS])
def test_base_refiner_split_matches_diffusers(sampler: SamplerId, spacing: str, steps: int, split: float):
    cfg = config(spacing, "epsilon")
    ref_base, ref_refiner = diffusers_base_refiner(sampler, cfg, steps, split)
    base = plan_from_scheduler_config(cfg, sampler, steps, denoising_end=split)
    refiner = plan_from_scheduler_config(cfg, sampler, steps, denoising_start=split)
    full = plan_from_scheduler_config(cfg, sampler, steps)
    assert base.timesteps + refiner.timesteps == full.timesteps
    noise = SeededNoise(SEED)
    ours_base = our_run(base, base.initial_latents(noise(SHAPE)), noise)
    assert_same_trace(ours_base, ref_base)
    assert_same_trace(our_run(refiner, ours_base[-1][1], noise), ref_refiner)


def test_turbo_img2img_needs_steps_times_strength_of_one():
    schedule = NoiseSchedule()
    plan = plan_sampling("euler_a", 2, schedule=schedule, prediction="epsilon", spacing="trailing", strength=0.5)
    assert plan.timesteps == (499.0,)
    with pytest.raises(InvalidRequest, match="steps"):
        plan_sampling("euler_a", 2, schedule=schedule, prediction="epsilon", spacing="trailing", strength=0.4)


def test_cfg_makes_one_doubled_call_and_equals_the_unbatched_formula():
    def uncond_model(x: torch.Tensor, t: float) -> torch.Tensor:
        return torch.sin(x) * t / 1000

    def cond_model(x: torch.Tensor, t: float) -> torch.Tensor:
        return torch.cos(x) + FIXED

    batches: list[int] = []

    def model_2b(x2: torch.Tensor, t: float) -> torch.Tensor:
        batches.append(x2.shape[0])
        uncond, cond = x2.chunk(2)
        return torch.cat([uncond_model(uncond, t), cond_model(cond, t)])

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    out = guided(model_2b, 7.5)(x, 501.0)
    assert batches == [2 * SHAPE[0]]
    expected = uncond_model(x, 501.0) + 7.5 * (cond_model(x, 501.0) - uncond_model(x, 501.0))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    rescaled = guided(model_2b, 7.5, guidance_rescale=0.7)(x, 501.0)
    torch.testing.assert_close(rescaled, rescale_noise_cfg(expected, cond_model(x, 501.0), 0.7), rtol=1e-6, atol=1e-6)


def test_needs_cfg_follows_diffusers_rule():
    assert [needs_cfg(g) for g in (0.0, 1.0, 1.01, 7.5)] == [False, False, True, True]


def test_samplers_leave_the_callers_tensors_alone():
    noise = SeededNoise(SEED)
    x = noise(SHAPE)
    kept = x.clone()
    for sampler in SAMPLERS:
        plan = plan_sampling(sampler, 4, schedule=NoiseSchedule(), prediction="epsilon", spacing="leading")
        plan.run(fake_unet, x, noise)
    denoise = make_denoiser(fake_unet, Prediction.EPS, lambda sigma: 500.0)
    sample_euler(denoise, x, [3.0, 1.0, 0.0])
    assert torch.equal(x, kept)


def test_seeded_noise_is_diffusers_randn_stream():
    noise, g = SeededNoise(11), torch.Generator().manual_seed(11)
    for _ in range(3):
        assert torch.equal(noise(SHAPE), randn_tensor(SHAPE, generator=g))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"steps": -3},
        {"steps": 1001},
        {"steps": 2.5},
        {"strength": 0.0},
        {"strength": 1.5},
        {"strength": -0.2},
        {"steps": 3, "strength": 0.2},  # int(0.6) = 0 steps would run
        {"denoising_start": 1.0},
        {"denoising_end": 0.0},
        {"denoising_start": 0.8, "denoising_end": 0.5},
        {"denoising_start": 0.8, "strength": 0.5},
        {"eta": 0.5},  # eta is DDIM's
        {"karras": True, "sampler": "euler_a"},
        {"spacing": "uniform"},
        {"sampler": "ddim", "steps": 1000},  # leading + offset 1 reaches t = 1000
        {"sampler": "heun"},
    ],
)
def test_bad_requests_raise_invalid_request(kwargs: dict):
    args = {"sampler": "euler", "steps": 10, "schedule": NoiseSchedule(), "prediction": "epsilon",
            "spacing": "leading", **kwargs}
    with pytest.raises(InvalidRequest):
        plan_sampling(args.pop("sampler"), args.pop("steps"), **args)


@pytest.mark.parametrize(
    "cfg, sampler",
    [
        ({**SD_CONFIG, "beta_schedule": "squaredcos_cap_v2"}, "euler"),
        ({**SD_CONFIG, "rescale_betas_zero_snr": True}, "euler"),
        ({**SD_CONFIG, "timestep_spacing": "uniform"}, "euler"),
        ({**SD_CONFIG, "prediction_type": "sample"}, "euler"),
        ({k: v for k, v in SD_CONFIG.items() if k != "clip_sample"}, "ddim"),  # DDIMScheduler clips by default
        ({**SD_CONFIG, "_class_name": "PNDMScheduler"}, None),
        ({**SD_CONFIG, "_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, None),
    ],
)
def test_unsupported_scheduler_configs_raise_invalid_request(cfg: dict, sampler: str | None):
    with pytest.raises(InvalidRequest):
        plan_from_scheduler_config(cfg, sampler, 10)


@pytest.mark.parametrize(
    "class_name, extra, expected",
    [
        ("EulerDiscreteScheduler", {}, SamplerId.EULER),
        ("EulerAncestralDiscreteScheduler", {}, SamplerId.EULER_ANCESTRAL),
        ("DDIMScheduler", {}, SamplerId.DDIM),
        ("DPMSolverMultistepScheduler", {}, SamplerId.DPMPP_2M),
        ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, SamplerId.DPMPP_2M_KARRAS),
    ],
)
def test_config_class_picks_the_sampler(class_name: str, extra: dict, expected: SamplerId):
    cfg = {**SD_CONFIG, "_class_name": class_name, "timestep_spacing": "leading", **extra}
    plan = plan_from_scheduler_config(cfg, None, 10)
    assert plan.sampler == expected
    scheduler = from_config(getattr(diffusers, class_name), cfg)
    scheduler.set_timesteps(10)
    assert list(plan.timesteps) == scheduler.timesteps.tolist()


def test_pndm_config_with_an_explicit_sampler_uses_the_config_schedule():
    cfg = {**SD_CONFIG, "_class_name": "PNDMScheduler", "skip_prk_steps": True}  # SD 1.5's scheduler_config.json
    plan = plan_from_scheduler_config(cfg, "euler", 10)
    scheduler = from_config(diffusers.EulerDiscreteScheduler, cfg)
    scheduler.set_timesteps(10)
    assert list(plan.timesteps) == scheduler.timesteps.tolist()
    assert list(plan.sigmas) == scheduler.sigmas.tolist()
