"""Step caching at sampling time (DeepCache, Ma, Fang & Wang 2023, arXiv:2312.00858, uniform schedule).

With an interval N > 1, UNet evaluation i runs the full UNet when i % N == 0 (keeping the deep
feature it returns) and the shallow part on that cached feature otherwise; N = 1 is the plain UNet.
The cache holds the whole UNet batch, so with classifier-free guidance it is per CFG half (the
doubled batch is one call). Second-order samplers are refused: they evaluate the UNet twice per step
at different noise levels, so a schedule counted in UNet calls would not be one counted in steps.

Engines: an export made with `latentrt export --step-cache` (its `unet` returns `deep_feature`, and
`unet_shallow`), or the PyTorch reference backend, which splits the checkpoint's UNet itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from latentrt.errors import InvalidRequest
from latentrt.step_cache import DEEP_FEATURE, SHALLOW, UNET, full_io, shallow_io
from latentrt.tensors import OUT_SAMPLE

from .backends.base import Engine
from .plan import MIDSTEP_EDIT_SAMPLERS, SamplingPlan
from .timing import StageTimer

if TYPE_CHECKING:
    from .engine_set import EngineSet

OFF = 1  # an interval of 1: a full UNet pass every step (no caching)


def check_interval(value: Any) -> int:
    """The step-cache interval N (a full UNet pass every N steps) as an int >= 1; InvalidRequest otherwise."""
    whole = isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or int(value) < OFF:
        raise InvalidRequest(f"step_cache must be a whole number >= 1 (a full UNet pass every N steps; 1: off), "
                             f"got {value!r}")
    return int(value)


def check_step_cache(interval: int, plan: SamplingPlan, engines: EngineSet) -> None:
    """InvalidRequest before any work when step caching cannot run with this sampler or these engines."""
    if interval == OFF:
        return
    if plan.sampler in MIDSTEP_EDIT_SAMPLERS:
        raise InvalidRequest(f"step caching (--step-cache {interval}) does not work with the second-order sampler "
                             f"{plan.sampler.value}: it evaluates the UNet twice per step at different noise levels, "
                             "so the deep feature would be reused across them; choose a one-evaluation sampler "
                             "(e.g. euler, ddim, dpmpp_2m)")
    step_cache_engines(engines)


def step_cache_engines(engines: EngineSet) -> tuple[Engine, Engine]:
    """(full UNet returning `deep_feature`, shallow part) of an engine set; InvalidRequest when it has none."""
    unet = engines[UNET]
    if SHALLOW in engines and DEEP_FEATURE in unet.io.output_names:
        return unet, engines[SHALLOW]
    if engines.backend == "torch":
        return _torch_engines(unet)
    raise InvalidRequest(f"{engines.folder} has no step-cache engines (no {SHALLOW} component); re-export with "
                         f"`latentrt export ... --step-cache` (and rebuild), or use --backend torch, or drop "
                         "--step-cache")


def _torch_engines(unet: Engine) -> tuple[Engine, Engine]:
    """The PyTorch reference's full and shallow parts, sharing the loaded UNet's weights."""
    from latentrt.reference.step_cache import step_cache_modules, step_cache_spec

    from .backends.torch import TorchEngine

    assert isinstance(unet, TorchEngine), "the torch backend's unet is a TorchEngine"
    wrapper: Any = unet.module  # latentrt.reference.wrappers.UNetWrapper
    spec = step_cache_spec(wrapper.unet)
    full, shallow = step_cache_modules(wrapper.unet, wrapper.keywords, spec.depth)
    return (TorchEngine(full, full_io(unet.io, spec), unet.device, unet.dtype),
            TorchEngine(shallow, shallow_io(unet.io, spec), unet.device, unet.dtype))


class CachedUNet:
    """Runs UNet feeds with a DeepCache uniform schedule: full every `interval`-th call, shallow in between."""

    def __init__(self, full: Engine, shallow: Engine, interval: int, timer: StageTimer | None = None):
        self.full, self.shallow, self.interval, self.timer = full, shallow, interval, timer
        self.calls = 0
        self.feature: torch.Tensor | None = None  # (unet_batch, C, h, w) from the last full pass

    def __call__(self, feed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The noise prediction for one UNet feed (sample, timestep, conditioning)."""
        full_step = self.calls % self.interval == 0
        self.calls += 1
        if full_step:
            out = self.full.run(feed, self.timer)
            self.feature = out[DEEP_FEATURE]
            return out[OUT_SAMPLE]
        assert self.feature is not None, "call 0 is a full pass"
        return self.shallow.run({**feed, DEEP_FEATURE: self.feature}, self.timer)[OUT_SAMPLE]
