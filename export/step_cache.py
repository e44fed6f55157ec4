"""Step caching at export (DeepCache, arXiv:2312.00858): the UNet exported with its deep feature, plus `unet_shallow`.

`latentrt export ... --step-cache` replaces the plain `unet` by the whole UNet that also returns the
feature entering its last up block (`deep_feature`; its noise output is the plain UNet's) and adds the
`unet_shallow` component, and records `{"depth", "channels"}` under the manifest's `step_cache`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from latentrt.errors import InvalidRequest
from latentrt.reference.models import LoadedModel
from latentrt.reference.step_cache import step_cache_modules, step_cache_spec, unet_step_cache_keywords
from latentrt.step_cache import MANIFEST_KEY, SHALLOW, UNET, StepCacheSpec, check_depth, full_io, shallow_io
from latentrt.tensors import ComponentIO

Part = tuple[torch.nn.Module, ComponentIO]


def check_components(depth: int | None, components: Sequence[str]) -> None:
    """InvalidRequest when step caching is asked for without exporting the UNet it splits."""
    if depth is not None and UNET not in components:
        raise InvalidRequest(f"--step-cache splits the {UNET}: include {UNET} in --components "
                             f"(asked for {', '.join(components)})")


def step_cache_parts(loaded: LoadedModel, depth: int) -> tuple[StepCacheSpec, dict[str, Part]]:
    """(the split, {"unet": (full module, full IO), "unet_shallow": (shallow module, shallow IO)})."""
    check_depth(depth)
    unet = loaded.modules[UNET]
    spec = step_cache_spec(unet, depth)
    full, shallow = step_cache_modules(unet, unet_step_cache_keywords(loaded), depth)
    plain = loaded.ios()[UNET]
    return spec, {UNET: (full, full_io(plain, spec)), SHALLOW: (shallow, shallow_io(plain, spec))}


def manifest_record(spec: StepCacheSpec | None, entries: Mapping[str, Any],
                    previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """The manifest's `step_cache` entry: this run's when it exported the UNet, else the kept UNet's; {} for none."""
    if UNET in entries:
        return {MANIFEST_KEY: spec.to_json()} if spec is not None else {}
    kept = (previous or {}).get(MANIFEST_KEY)
    return {MANIFEST_KEY: kept} if kept is not None else {}
