"""Profile routing: which optimization profile of an engine serves a request (pure Python).

The contract between the builder, which records each profile's bounds in the engine manifest
(`{"name", "sizes", "opt_size", "bounds": {dim: [min, opt, max]}}`), and the runtime, which picks the
covering profile whose opt shapes are nearest and explains, when none covers, what would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .buckets import format_size, nearest_bucket
from .errors import UnsupportedShape
from .names import DIM_LATENT_HEIGHT, DIM_LATENT_WIDTH
from .tensors import Bounds

LATENT_DIMS = (DIM_LATENT_HEIGHT, DIM_LATENT_WIDTH)


def covers(bounds: Bounds, sizes: Mapping[str, int]) -> bool:
    """Whether every dim named in both lies within its (min, max)."""
    return all(bounds[k][0] <= v <= bounds[k][2] for k, v in sizes.items() if k in bounds)


def _distance(bounds: Bounds, sizes: Mapping[str, int]) -> float:
    return sum(abs(math.log(max(v, 1) / max(bounds[k][1], 1))) for k, v in sizes.items() if k in bounds)


def select_profile(component: str, profiles: Sequence[Mapping[str, Any]], sizes: Mapping[str, int],
                   vae_scale_factor: int | None = None) -> int:
    """Index of the covering profile whose opt is nearest; `profiles` are manifest entries (see `Profile`).

    Raises UnsupportedShape naming each profile's ranges and the planned sizes that are covered.
    """
    fits = [i for i, p in enumerate(profiles) if covers(_bounds(p), sizes)]
    if fits:
        return min(fits, key=lambda i: (round(_distance(_bounds(profiles[i]), sizes), 9), i))
    raise UnsupportedShape(_uncovered_message(component, profiles, sizes, vae_scale_factor))


def _bounds(entry: Mapping[str, Any]) -> dict[str, tuple[int, int, int]]:
    return {k: (int(v[0]), int(v[1]), int(v[2])) for k, v in entry["bounds"].items()}


def _uncovered_message(component: str, profiles: Sequence[Mapping[str, Any]], sizes: Mapping[str, int],
                       factor: int | None) -> str:
    request = ", ".join(f"{k}={v}" for k, v in sizes.items())
    lines = [f"{component}: no engine profile covers {request}"]
    if factor and all(k in sizes for k in LATENT_DIMS):
        px = (sizes[DIM_LATENT_HEIGHT] * factor, sizes[DIM_LATENT_WIDTH] * factor)
        lines[0] += f" ({format_size(px)} px)"
    for i, p in enumerate(profiles):
        b = _bounds(p)
        out = [k for k, v in sizes.items() if k in b and not b[k][0] <= v <= b[k][2]]
        ranges = ", ".join(f"{k} {b[k][0]}..{b[k][2]}" for k in sizes if k in b)
        listed = short_sizes(p.get("sizes", []))
        lines.append(f"  profile {i} '{p.get('name', i)}' ({listed}): {ranges}; out of range: {', '.join(out)}")
    hint = _nearest_hint(profiles, sizes, factor)
    if hint:
        lines.append(hint)
    return "\n".join(lines)


def short_sizes(sizes: Sequence[str]) -> str:
    if not sizes:
        return "no sizes recorded"
    return ", ".join(sizes) if len(sizes) <= 4 else f"{len(sizes)} sizes: {sizes[0]} .. {sizes[-1]}"


def _nearest_hint(profiles: Sequence[Mapping[str, Any]], sizes: Mapping[str, int], factor: int | None) -> str:
    if not factor or not all(k in sizes for k in LATENT_DIMS):
        return ""
    planned = {}
    for i, p in enumerate(profiles):
        for text in p.get("sizes", []):
            h, w = (int(x) for x in text.split("x"))
            planned.setdefault((h, w), i)
    if not planned:
        return ""
    px = (sizes[DIM_LATENT_HEIGHT] * factor, sizes[DIM_LATENT_WIDTH] * factor)
    near = nearest_bucket(px, planned)
    return (f"  nearest planned size: {format_size(near)} (profile {planned[near]}); or rebuild the engines with "
            f"--sizes including {format_size(px)} (and a --batch range covering the request)")
