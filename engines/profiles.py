"""Bucket-aware optimization-profile planning for TensorRT engines (pure Python).

A plan turns a family's aspect-ratio buckets (pixel sizes) and a per-prompt batch range into
one or more optimization profiles. Each profile gives every component (min, opt, max) bounds per
symbolic dim (`batch`, `unet_batch`, `latent_height`, ...) and the concrete per-input shapes
derived from the component's IO description (`ComponentIO.with_ranges` + `tensors.profile`).

Strategies:
  dynamic     one profile covering every size (smallest engine, opt at the checkpoint's native size)
  per-bucket  one profile per size (min = opt = max for the latent dims: best kernels, most memory)
  grouped     k profiles, sizes grouped by log aspect ratio; each opt is the medoid of its group
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from latentrt.buckets import Size, buckets_for, format_size
from latentrt.errors import UnsupportedShape
from latentrt.families import FamilySpec
from latentrt.names import DIM_BATCH, DIM_LATENT_HEIGHT, DIM_LATENT_WIDTH, DIM_SEQUENCE, DIM_UNET_BATCH
from latentrt.profile_routing import LATENT_DIMS, covers, select_profile, short_sizes
from latentrt.tensors import PROMPT_WINDOWS, TIMESTEP_COND, Bounds, ComponentIO, Scaled, profile

Strategy = Literal["dynamic", "per-bucket", "grouped"]
STRATEGIES: tuple[str, ...] = ("dynamic", "per-bucket", "grouped")
Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: bounds and input shapes for every component."""

    name: str
    sizes: tuple[Size, ...]  # the (height, width) pixel sizes it was planned for
    opt_size: Size  # the size its opt shapes are tuned for
    bounds: Mapping[str, Bounds]  # component -> dim -> (min, opt, max)
    shapes: Mapping[str, Mapping[str, ShapeRange]]  # component -> input -> (min, opt, max) shape

    def covers(self, component: str, sizes: Mapping[str, int]) -> bool:
        return covers(self.bounds[component], sizes)


@dataclass(frozen=True)
class ProfilePlan:
    """The profiles of an engine set, with what they were planned from."""

    family: str
    strategy: str
    sizes: tuple[Size, ...]
    batch: tuple[int, int]  # per-prompt batch range
    opt_batch: int
    cfg: bool  # UNet batch doubled for classifier-free guidance
    vae_scale_factor: int
    ios: Mapping[str, ComponentIO]  # the components' IO as exported (full ranges)
    profiles: tuple[Profile, ...]
    prompt_windows: int = PROMPT_WINDOWS  # most 75-token prompt windows the UNet context covers

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.ios)

    def union_bounds(self, component: str) -> dict[str, tuple[int, int, int]]:
        """The smallest range per dim that covers every profile (opt from the first profile)."""
        first = self.profiles[0].bounds[component]
        out = {}
        for dim, (_, opt, _) in first.items():
            lo = min(p.bounds[component][dim][0] for p in self.profiles)
            hi = max(p.bounds[component][dim][2] for p in self.profiles)
            out[dim] = (lo, opt, hi)
        return out

    def io(self, component: str) -> ComponentIO:
        """The component's IO narrowed to what the plan covers (for the engine manifest)."""
        return self.ios[component].with_ranges(self.union_bounds(component))

    def entries(self, component: str) -> list[dict[str, Any]]:
        """The component's profiles as manifest entries (name, sizes, opt size, bounds)."""
        return [profile_entry(p, component) for p in self.profiles]


def profile_entry(p: Profile, component: str) -> dict[str, Any]:
    return {"name": p.name, "sizes": [format_size(s) for s in p.sizes], "opt_size": format_size(p.opt_size),
            "bounds": {dim: list(r) for dim, r in p.bounds[component].items()}}


# ---------------------------------------------------------------------------- planning


def plan_profiles(spec: FamilySpec, ios: Mapping[str, ComponentIO], *, sizes: Sequence[Size] | None = None,
                  batch: tuple[int, int] = (1, 4), cfg: bool | None = None, strategy: str = "grouped",
                  groups: int = 3, opt_batch: int | None = None,
                  prompt_windows: int = PROMPT_WINDOWS, native: Size | None = None) -> ProfilePlan:
    """Plan optimization profiles covering `sizes` (default: the buckets of the native size) and `batch`.

    Args:
        spec: the model family.
        ios: component -> IO description (from the ONNX manifest).
        sizes: (height, width) pixel sizes the engines must cover.
        batch: (min, max) images per prompt.
        cfg: double the UNet batch range for classifier-free guidance (default: `spec.uses_cfg`, off for
            UNets that take the guidance scale as an input (LCM); the UNet range still starts at the
            per-prompt minimum so guidance-free calls fit).
        strategy: "dynamic", "per-bucket" or "grouped".
        groups: number of aspect-ratio groups for "grouped".
        opt_batch: per-prompt batch the kernels are tuned for (default: the minimum).
        prompt_windows: the most prompt windows (75 tokens each, 77 with BOS/EOS) the UNet's context
            (`sequence`, 77 x windows) covers; opt is one window.
        native: the checkpoint's native (height, width) (`buckets.native_size`; default: the family's): the
            opt size of a profile planned for it, and the size its default buckets are scaled to.
    """
    if strategy not in STRATEGIES:
        raise UnsupportedShape(f"unknown profile strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    factor = vae_scale_factor(ios, spec.vae_scale_factor)
    native = spec.native_size if native is None else (int(native[0]), int(native[1]))
    chosen = _unique(tuple(sizes) if sizes is not None else buckets_for(spec, native))
    if not chosen:
        raise UnsupportedShape("no sizes to plan for: pass at least one HEIGHTxWIDTH size")
    cfg = spec.uses_cfg and not _guidance_embedded(ios) if cfg is None else cfg
    opt_b = batch[0] if opt_batch is None else opt_batch
    _check_batch(batch, opt_b)
    if prompt_windows < 1:
        raise UnsupportedShape(f"prompt windows must be at least 1, got {prompt_windows}")
    for s in chosen:
        _check_size(s, factor)
        _check_latents_in_io(s, factor, ios)
    groups_of_sizes = _split(chosen, strategy, groups)
    profiles = []
    for members in groups_of_sizes:
        opt = _opt_size(members, native)
        bounds = {c: _component_bounds(io, members, opt, factor, batch, opt_b, cfg, prompt_windows)
                  for c, io in ios.items()}
        shapes = {c: profile(ios[c].with_ranges(b)) for c, b in bounds.items()}
        profiles.append(Profile("", members, opt, bounds, shapes))
    named = tuple(_with_name(p, i, strategy, profiles) for i, p in enumerate(profiles))
    return ProfilePlan(spec.name, strategy, chosen, batch, opt_b, cfg, factor, dict(ios), named, prompt_windows)


def _guidance_embedded(ios: Mapping[str, ComponentIO]) -> bool:
    """Whether the UNet takes the guidance scale as an input (LCM `timestep_cond`): no CFG batch to plan for."""
    return "unet" in ios and TIMESTEP_COND in ios["unet"].input_names


def vae_scale_factor(ios: Mapping[str, ComponentIO], default: int) -> int:
    """Pixels per latent, read from the VAE's image axes (`Scaled` over `latent_height`)."""
    for io in ios.values():
        for t in io.inputs + io.outputs:
            for axis in t.shape:
                if isinstance(axis, Scaled) and axis.base.name in LATENT_DIMS:
                    return axis.factor
    return default


def _unique(sizes: Sequence[Size]) -> tuple[Size, ...]:
    return tuple(dict.fromkeys((int(h), int(w)) for h, w in sizes))


def _check_batch(batch: tuple[int, int], opt_batch: int) -> None:
    lo, hi = batch
    if not 1 <= lo <= hi:
        raise UnsupportedShape(f"batch range {lo}:{hi} is invalid: need 1 <= min <= max")
    if not lo <= opt_batch <= hi:
        raise UnsupportedShape(f"opt batch {opt_batch} is outside the batch range {lo}:{hi}")


def _check_size(size: Size, factor: int) -> None:
    h, w = size
    if h <= 0 or w <= 0 or h % factor or w % factor:
        raise UnsupportedShape(f"size {format_size(size)} (HxW) must have sides that are positive multiples "
                               f"of the VAE factor {factor}")


def _check_latents_in_io(size: Size, factor: int, ios: Mapping[str, ComponentIO]) -> None:
    latents = {DIM_LATENT_HEIGHT: size[0] // factor, DIM_LATENT_WIDTH: size[1] // factor}
    for io in ios.values():
        for name, value in latents.items():
            d = io.dims.get(name)
            if d is not None and not d.min <= value <= d.max:
                raise UnsupportedShape(f"size {format_size(size)} is outside what the export supports: {name} "
                                       f"{value} not in [{d.min}, {d.max}] ({d.min * factor}..{d.max * factor} px)")


def _split(sizes: tuple[Size, ...], strategy: str, groups: int) -> list[tuple[Size, ...]]:
    if strategy == "dynamic":
        return [sizes]
    if strategy == "per-bucket":
        return [(s,) for s in sizes]
    return group_by_aspect(sizes, groups)


def log_aspect(size: Size) -> float:
    """log(height / width): negative for landscape, 0 for square, positive for portrait."""
    return math.log(size[0] / size[1])


def group_by_aspect(sizes: Sequence[Size], k: int) -> list[tuple[Size, ...]]:
    """Split sizes into at most k contiguous groups by log aspect ratio, minimising within-group variance."""
    if k < 1:
        raise UnsupportedShape(f"the number of profile groups must be at least 1, got {k}")
    ordered = sorted(sizes, key=lambda s: (log_aspect(s), s[0] * s[1]))
    values = [log_aspect(s) for s in ordered]
    k = min(k, len(set(round(v, 9) for v in values)))
    cuts = _optimal_cuts(values, k)
    bounds = [0, *cuts, len(ordered)]
    return [tuple(ordered[a:b]) for a, b in zip(bounds, bounds[1:])]


def _optimal_cuts(values: list[float], k: int) -> list[int]:
    """1-D k-segmentation by dynamic programming (sum of squared deviations); returns cut indices."""
    n = len(values)
    pre = [0.0]
    pre2 = [0.0]
    for v in values:
        pre.append(pre[-1] + v)
        pre2.append(pre2[-1] + v * v)

    def sse(a: int, b: int) -> float:
        s, s2, m = pre[b] - pre[a], pre2[b] - pre2[a], b - a
        return s2 - s * s / m

    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(k + 1)]
    back = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0.0
    for g in range(1, k + 1):
        for b in range(g, n + 1):
            for a in range(g - 1, b):
                c = cost[g - 1][a] + sse(a, b)
                if c < cost[g][b] - 1e-12:
                    cost[g][b], back[g][b] = c, a
    cuts, b = [], n
    for g in range(k, 0, -1):
        b = back[g][b]
        cuts.append(b)
    return sorted(cuts)[1:]


def _opt_size(members: tuple[Size, ...], native: Size) -> Size:
    """The native size when planned for, else the medoid in (log h, log w)."""
    if native in members:
        return native

    def spread(c: Size) -> float:
        return sum(abs(math.log(c[0] / s[0])) + abs(math.log(c[1] / s[1])) for s in members)

    return min(members, key=lambda c: (round(spread(c), 9), c))


def _component_bounds(io: ComponentIO, members: tuple[Size, ...], opt: Size, factor: int, batch: tuple[int, int],
                      opt_batch: int, cfg: bool, windows: int) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) for every dim of a component; dims the plan does not decide keep the IO's range."""
    mult = 2 if cfg else 1
    heights = [s[0] // factor for s in members]
    widths = [s[1] // factor for s in members]
    planned = {
        DIM_LATENT_HEIGHT: (min(heights), opt[0] // factor, max(heights)),
        DIM_LATENT_WIDTH: (min(widths), opt[1] // factor, max(widths)),
        DIM_UNET_BATCH: (batch[0], mult * opt_batch, mult * batch[1]),
        # text encoders may run the negative prompt in the same batch; VAEs see per-prompt batches
        DIM_BATCH: (batch[0], opt_batch, (mult if _is_text(io) else 1) * batch[1]),
    }
    if DIM_SEQUENCE in io.dims:  # the export's minimum is one window (77 tokens)
        window = io.dims[DIM_SEQUENCE].min
        planned[DIM_SEQUENCE] = (window, window, windows * window)
    out = {}
    for name, d in io.dims.items():
        lo, opt_v, hi = planned.get(name, (d.min, d.opt, d.max))
        if hi > d.max or lo < d.min:
            hint = "lower --prompt-windows" if name == DIM_SEQUENCE else "lower --batch or choose smaller sizes"
            raise UnsupportedShape(f"{io.component}: {name} range {lo}..{hi} exceeds what the export supports "
                                   f"({d.min}..{d.max}); {hint}")
        out[name] = (lo, opt_v, hi)
    return out


def _is_text(io: ComponentIO) -> bool:
    return any(t.name == "input_ids" for t in io.inputs)


def _with_name(p: Profile, index: int, strategy: str, all_profiles: Sequence[Profile]) -> Profile:
    if strategy == "dynamic":
        name = "all"
    elif strategy == "per-bucket":
        name = format_size(p.sizes[0])
    else:
        name = _aspect_name(p.sizes)
        if sum(_aspect_name(q.sizes) == name for q in all_profiles) > 1:
            name = f"{name}-{index}"
    return Profile(name, p.sizes, p.opt_size, p.bounds, p.shapes)


def _aspect_name(sizes: Sequence[Size]) -> str:
    mean = sum(log_aspect(s) for s in sizes) / len(sizes)
    return "portrait" if mean > 0.15 else "landscape" if mean < -0.15 else "square"


# ---------------------------------------------------------------------------- routing


def route(plan: ProfilePlan, component: str, sizes: Mapping[str, int]) -> int:
    """The profile that serves a request: covers it, opt nearest (see `select_profile`)."""
    return select_profile(component, plan.entries(component), sizes, plan.vae_scale_factor)


# ---------------------------------------------------------------------------- display


def format_plan(plan: ProfilePlan) -> str:
    """A readable table of the plan (for `latentrt build --plan`)."""
    head = (f"family {plan.family}: {len(plan.profiles)} profile(s), strategy {plan.strategy}, "
            f"{len(plan.sizes)} size(s), batch {plan.batch[0]}..{plan.batch[1]} per prompt (opt {plan.opt_batch}), "
            f"CFG {'on: UNet batch x2' if plan.cfg else 'off'}, prompts up to {plan.prompt_windows} window(s) "
            f"of 75 tokens")
    lines = [head]
    for i, p in enumerate(plan.profiles):
        hs = [s[0] for s in p.sizes]
        ws = [s[1] for s in p.sizes]
        lines.append(f"profile {i} '{p.name}': {len(p.sizes)} size(s) {short_sizes([format_size(s) for s in p.sizes])}"
                     f"; pixels H {min(hs)}..{max(hs)} x W {min(ws)}..{max(ws)}; opt {format_size(p.opt_size)}")
        for c in plan.components:
            dims = "  ".join(f"{k} {lo}/{opt}/{hi}" for k, (lo, opt, hi) in p.bounds[c].items())
            lines.append(f"    {c:<15} {dims}")
    lines.append("(ranges are min/opt/max per symbolic dim; latent dims are pixels / "
                 f"{plan.vae_scale_factor})")
    return "\n".join(lines)
