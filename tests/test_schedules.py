"""Schedules, spacings and sigmas against diffusers' schedulers: exact equality (same float32 values)."""

from __future__ import annotations

from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from latentrt.families import NoiseSchedule, Spacing
from latentrt.runtime.schedules import (
    alphas_cumprod,
    beta_sigmas,
    betas,
    ddim_timesteps,
    discrete_timesteps,
    dpm_solver_timesteps,
    exponential_sigmas,
    karras_sigmas,
    sigma_to_timestep,
    sigmas_for,
    train_sigmas,
    turbo_timesteps,
)

SD = NoiseSchedule()  # scaled_linear 0.00085 .. 0.012, T = 1000
LINEAR = NoiseSchedule(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)
STEPS = [1, 2, 3, 4, 7, 10, 25, 50, 1000]


def scheduler_config(schedule: NoiseSchedule, spacing: Spacing, steps_offset: int = 1) -> dict:
    return {"beta_start": schedule.beta_start, "beta_end": schedule.beta_end, "beta_schedule": schedule.beta_schedule,
            "num_train_timesteps": schedule.num_train_timesteps, "timestep_spacing": spacing.value,
            "steps_offset": steps_offset}


def from_config(cls: type, cfg: dict) -> Any:
    """A diffusers scheduler built from a config dict (untyped: diffusers annotates from_config loosely)."""
    return cls.from_config(cfg)


@pytest.mark.parametrize("schedule", [SD, LINEAR], ids=["scaled_linear", "linear"])
def test_betas_and_alphas_cumprod_equal_diffusers(schedule: NoiseSchedule):
    ref = from_config(diffusers.DDPMScheduler, scheduler_config(schedule, Spacing.LEADING))
    assert betas(schedule).dtype == torch.float32
    assert torch.equal(betas(schedule), ref.betas)
    assert torch.equal(alphas_cumprod(schedule), ref.alphas_cumprod)


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", list(Spacing), ids=[s.value for s in Spacing])
def test_timesteps_equal_each_diffusers_scheduler(spacing: Spacing, steps: int, offset: int):
    cfg = scheduler_config(SD, spacing, offset)
    for ours, cls in [
        (discrete_timesteps, diffusers.EulerDiscreteScheduler),
        (discrete_timesteps, diffusers.EulerAncestralDiscreteScheduler),
        (ddim_timesteps, diffusers.DDIMScheduler),
        (dpm_solver_timesteps, diffusers.DPMSolverMultistepScheduler),
    ]:
        ref = from_config(cls, cfg)
        ref.set_timesteps(steps)
        assert ours(steps, spacing, SD, offset) == ref.timesteps.tolist(), cls.__name__


@pytest.mark.parametrize("steps", [1, 3, 10, 25])
@pytest.mark.parametrize("spacing", list(Spacing), ids=[s.value for s in Spacing])
def test_sigmas_for_equal_euler_sigmas(spacing: Spacing, steps: int):
    ref = from_config(diffusers.EulerDiscreteScheduler, scheduler_config(SD, spacing))
    ref.set_timesteps(steps)
    assert sigmas_for(discrete_timesteps(steps, spacing, SD), SD) + [0.0] == ref.sigmas.tolist()


def test_train_sigmas_are_the_scheduler_table():
    ref = from_config(diffusers.EulerDiscreteScheduler, scheduler_config(SD, Spacing.LEADING))
    assert train_sigmas(SD)[::-1] + [0.0] == ref.sigmas.tolist()  # before set_timesteps: all 1000, descending
    assert train_sigmas(SD)[-1] == pytest.approx(14.6146, abs=1e-4)


@pytest.mark.parametrize("steps", [1, 2, 10, 25])
def test_karras_sigmas_equal_diffusers(steps: int):
    ref = from_config(diffusers.DPMSolverMultistepScheduler, scheduler_config(SD, Spacing.LEADING))
    table = train_sigmas(SD)
    expected = ref._convert_to_karras(np.flip(np.array(table, dtype=np.float32)).copy(), steps)
    assert karras_sigmas(table[0], table[-1], steps) == expected.tolist() + [0.0]


def test_sigma_to_timestep_equals_diffusers_log_sigma_interpolation():
    ref = from_config(diffusers.EulerDiscreteScheduler, scheduler_config(SD, Spacing.LEADING))
    log_sigmas = np.log(np.array(train_sigmas(SD), dtype=np.float32))
    probes = [0.001, 0.0292, 0.05, 0.5, 1.0, 3.3, 14.6, 20.0] + karras_sigmas(0.0292, 14.61, 9)[:-1]
    for sigma in probes:
        assert sigma_to_timestep(sigma, SD) == float(ref._sigma_to_t(np.float64(sigma), log_sigmas)), sigma
    assert sigma_to_timestep(train_sigmas(SD)[500], SD) == pytest.approx(500.0, abs=1e-5)  # float32 log table


def test_turbo_timesteps_are_diffusers_trailing_spacing():
    assert [turbo_timesteps(n) for n in (1, 2, 3, 4)] == [
        [999.0],
        [999.0, 499.0],
        [999.0, 666.0, 332.0],  # trailing rounds 1000 - 2000/3 = 333.3 to 333, minus 1: not 333
        [999.0, 749.0, 499.0, 249.0],
    ]
    ref = from_config(diffusers.EulerAncestralDiscreteScheduler, scheduler_config(SD, Spacing.TRAILING))
    for n in (1, 2, 3, 4):
        ref.set_timesteps(n)
        assert turbo_timesteps(n) == ref.timesteps.tolist()


COSINE = NoiseSchedule(beta_start=0.0001, beta_end=0.02, beta_schedule="squaredcos_cap_v2")
ZERO_SNR = NoiseSchedule(rescale_zero_snr=True)
TRAINED = NoiseSchedule(trained_betas=tuple(torch.linspace(0.0002, 0.03, 1000).tolist()))


@pytest.mark.parametrize("schedule", [COSINE, ZERO_SNR, TRAINED], ids=["squaredcos_cap_v2", "zero_snr", "trained"])
def test_other_beta_schedules_equal_diffusers(schedule: NoiseSchedule):
    cfg = scheduler_config(schedule, Spacing.LEADING) | {"rescale_betas_zero_snr": schedule.rescale_zero_snr,
                                                         "trained_betas": schedule.trained_betas}
    ref = from_config(diffusers.DDIMScheduler, cfg)
    assert torch.equal(betas(schedule), ref.betas)
    assert torch.equal(alphas_cumprod(schedule), ref.alphas_cumprod)
    if schedule.rescale_zero_snr:
        assert float(alphas_cumprod(schedule)[-1]) == 0.0


@pytest.mark.parametrize("steps", [1, 2, 10, 25])
def test_exponential_and_beta_sigmas_equal_diffusers(steps: int):
    ref = from_config(diffusers.EulerDiscreteScheduler, scheduler_config(SD, Spacing.LEADING))
    table = np.flip(np.array(train_sigmas(SD), dtype=np.float32)).copy()
    lo, hi = float(table[-1]), float(table[0])
    assert exponential_sigmas(lo, hi, steps)[:-1] == ref._convert_to_exponential(torch.from_numpy(table), steps).tolist()
    assert beta_sigmas(lo, hi, steps)[:-1] == ref._convert_to_beta(torch.from_numpy(table), steps).tolist()
