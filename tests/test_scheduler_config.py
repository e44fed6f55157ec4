"""The scheduler_config.json adapter against diffusers: class defaults, from_config semantics, pipeline fixes.

Every registered class's defaults must equal its diffusers `__init__` defaults (absent keys are read
as diffusers reads them); a config's own class picks the sampler that reproduces it, and `--sampler`
builds the requested class from the checkpoint config as `<Class>.from_config(config)` does, with
the timesteps diffusers then uses (exact equality). Step-for-step parity of every sampler is in
tests/test_samplers.py and tests/test_samplers_multistep.py.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import diffusers
import pytest

from latentrt.errors import InvalidRequest
from latentrt.families import SamplerId
from latentrt.runtime.plan import plan_from_scheduler_config
from latentrt.runtime.scheduler_config import (
    SAMPLER_CLASSES,
    SCHEDULER_CLASSES,
    available_samplers,
    pipeline_fixes,
    recipe_for,
)

# SD 1.5's scheduler/scheduler_config.json (PNDMScheduler), as released.
SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None}


def diffusers_class(name: str) -> Any:
    return getattr(diffusers, name)


@pytest.mark.parametrize("name", sorted(SCHEDULER_CLASSES))
def test_class_defaults_are_diffusers_init_defaults(name: str):
    params = inspect.signature(diffusers_class(name).__init__).parameters
    for key, ours in SCHEDULER_CLASSES[name].defaults.items():
        assert key in params, f"{name} has no config key {key}"
        theirs = params[key].default
        same = (ours == theirs or (isinstance(ours, float) and isinstance(theirs, float)
                                   and math.isinf(ours) and ours == theirs))
        assert same or (ours is None and theirs == []), f"{name}.{key}: ours {ours!r}, diffusers {theirs!r}"


def whole_steps(scheduler: Any) -> list[float]:
    ts = scheduler.timesteps.float().tolist()
    return ts[::2] if scheduler.order == 2 else ts


@pytest.mark.parametrize("sampler", available_samplers())
def test_explicit_sampler_builds_its_class_from_the_checkpoint_config(sampler: str):
    """--sampler X on SD 1.5's PNDM config = <X's class>.from_config(config, **overrides), timestep for timestep."""
    cls, overrides = SAMPLER_CLASSES[SamplerId(sampler)]
    if sampler in ("lcm", "tcd"):
        pytest.skip("consistency samplers keep their own timestep grid: tests/test_samplers_multistep.py")
    for steps in (4, 10):
        scheduler = diffusers_class(cls.name).from_config(SD15, **overrides)
        scheduler.set_timesteps(steps)
        plan = plan_from_scheduler_config(SD15, sampler, steps)
        assert plan.sampler.value == sampler
        assert list(plan.timesteps) == whole_steps(scheduler)


@pytest.mark.parametrize("name", sorted(SCHEDULER_CLASSES))
def test_config_class_picks_its_own_sampler(name: str):
    """No --sampler: a config saved from class C runs C's sampler on C's timesteps."""
    scheduler = diffusers_class(name).from_config(SD15)
    config = dict(scheduler.config) | {"_class_name": name}
    recipe = recipe_for(config, None, 10)
    assert recipe.sampler in SCHEDULER_CLASSES[name].samplers
    scheduler.set_timesteps(10)
    assert list(recipe.grid.timesteps) == whole_steps(scheduler)


def test_sd15_default_is_pndm():
    plan = plan_from_scheduler_config(SD15, None, 20)
    assert plan.sampler == SamplerId.PNDM and plan.steps == 21  # PLMS repeats the second timestep


@pytest.mark.parametrize(
    "config, fixed, notes",
    [
        (SD15, {}, 0),
        ({"_class_name": "EulerDiscreteScheduler"}, {"steps_offset": 1}, 1),  # Euler's default steps_offset is 0
        ({"_class_name": "DDIMScheduler", "steps_offset": 1}, {"clip_sample": False}, 1),  # DDIM clips by default
        ({"_class_name": "DDIMScheduler", "steps_offset": 0, "clip_sample": True},
         {"steps_offset": 1, "clip_sample": False}, 2),
        ({"_class_name": "LMSDiscreteScheduler", "steps_offset": 1, "clip_sample": True}, {}, 0),  # LMS has no clip
    ],
)
def test_pipeline_fixes_follow_stable_diffusion_pipeline(config: dict, fixed: dict, notes: int):
    """StableDiffusionPipeline.__init__ on the scheduler the config builds: the same rewrite, and a note per key."""
    out, said = pipeline_fixes(config)
    assert out == {**config, **fixed} and len(said) == notes
    scheduler = diffusers_class(config["_class_name"]).from_config(config)
    for key, value in fixed.items():
        assert scheduler.config[key] != value  # diffusers' pipeline would rewrite exactly these


def test_pipeline_fixes_match_a_real_stable_diffusion_pipeline(tiny_checkpoint: Any):
    """Load a StableDiffusionPipeline with a legacy DDIM config: its scheduler config is what pipeline_fixes gives."""
    folder = tiny_checkpoint("sd1")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder))
    legacy: Any = diffusers_class("DDIMScheduler").from_config({**dict(pipe.scheduler.config), "steps_offset": 0,
                                                                "clip_sample": True})
    fixed = diffusers.StableDiffusionPipeline(**{**pipe.components, "scheduler": legacy})
    ours, _ = pipeline_fixes(dict(legacy.config) | {"_class_name": "DDIMScheduler"})
    assert {k: ours[k] for k in ("steps_offset", "clip_sample")} == \
        {k: fixed.scheduler.config[k] for k in ("steps_offset", "clip_sample")} == {"steps_offset": 1,
                                                                                    "clip_sample": False}


def test_unknown_sampler_lists_the_available_ones():
    with pytest.raises(InvalidRequest, match="euler_a"):
        plan_from_scheduler_config(SD15, "k_euler", 10)


def test_unknown_scheduler_class_says_choose_a_sampler():
    with pytest.raises(InvalidRequest, match="FlowMatchEulerDiscreteScheduler"):
        plan_from_scheduler_config({**SD15, "_class_name": "FlowMatchEulerDiscreteScheduler"}, None, 10)
