"""Optimization-profile planning and routing (pure Python, every family)."""

from __future__ import annotations

import math

import pytest

from latentrt.buckets import SDXL_BUCKETS, parse_sizes
from latentrt.engines.profiles import (
    format_plan,
    group_by_aspect,
    log_aspect,
    plan_profiles,
    route,
    select_profile,
)
from latentrt.errors import UnsupportedShape
from latentrt.families import FAMILIES, FamilyId, get_family
from latentrt.tensors import ModelDims, component_ios, profile, shapes

FAMILY_IDS = [f.value for f in FamilyId]
STRATEGIES = ["dynamic", "per-bucket", "grouped"]


def ios_for(family: str) -> dict:
    spec = get_family(family)
    hidden = tuple(12 if te.pooled else 8 for te in spec.text_encoders)
    dims = ModelDims(hidden, 6 if spec.has_pooled else 0, sum(hidden), spec.unet_in_channels, 4, 8,
                     time_ids=spec.time_ids.width)
    return component_ios(spec, dims)


def request(io, size: tuple[int, int], batch: int, factor: int = 8) -> dict[str, int]:
    """Concrete dim sizes of one request, for every dim the component has."""
    values = {"latent_height": size[0] // factor, "latent_width": size[1] // factor, "batch": batch,
              "unet_batch": batch, "tokens": 77, "sequence": 77}
    return {k: v for k, v in values.items() if k in io.dims}


@pytest.mark.parametrize("family", FAMILY_IDS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_bucket_is_covered_and_opt_lies_inside(family: str, strategy: str) -> None:
    spec = get_family(family)
    ios = ios_for(family)
    plan = plan_profiles(spec, ios, strategy=strategy)
    assert plan.sizes == spec.buckets
    planned = [s for p in plan.profiles for s in p.sizes]
    assert sorted(planned) == sorted(spec.buckets)  # each size planned exactly once
    for p in plan.profiles:
        for c, io in ios.items():
            for dim, (lo, opt, hi) in p.bounds[c].items():
                assert lo <= opt <= hi, (c, dim)
            for name, (smin, sopt, smax) in p.shapes[c].items():
                assert all(a <= b <= d for a, b, d in zip(smin, sopt, smax)), (c, name)
            # the profile's shapes are the IO's shapes at the bounds (one description, derived)
            lo_sizes = {d: b[0] for d, b in p.bounds[c].items()}
            assert {n: s[0] for n, s in p.shapes[c].items()} == {n: shapes(io, lo_sizes)[n] for n in io.input_names}
    for size in spec.buckets:
        for c, io in ios.items():
            for b in (1, 4):
                idx = route(plan, c, request(io, size, b))
                assert plan.profiles[idx].covers(c, request(io, size, b))


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_cfg_doubles_the_unet_batch_range_and_turbo_does_not(family: str) -> None:
    spec = get_family(family)
    plan = plan_profiles(spec, ios_for(family), batch=(1, 3), opt_batch=2, strategy="dynamic")
    unet = plan.profiles[0].bounds["unet"]["unet_batch"]
    vae = plan.profiles[0].bounds["vae_decoder"]["batch"]
    assert vae == (1, 2, 3)
    if not spec.uses_cfg:  # Turbo, and the LDM families sampled without guidance
        assert not plan.cfg
        assert unet == (1, 2, 3)
    else:
        assert plan.cfg
        assert unet == (1, 4, 6)  # opt and max doubled; min stays 1 so guidance-free calls also fit
    assert plan_profiles(spec, ios_for(family), batch=(1, 3), cfg=False).profiles[0].bounds["unet"]["unet_batch"] == (1, 1, 3)


def test_per_bucket_profiles_are_static_in_the_latent_dims() -> None:
    spec = get_family("sdxl")
    plan = plan_profiles(spec, ios_for("sdxl"), sizes=parse_sizes("768x1344,1024x1024"), strategy="per-bucket")
    assert [p.name for p in plan.profiles] == ["768x1344", "1024x1024"]
    assert plan.profiles[0].bounds["unet"]["latent_height"] == (96, 96, 96)
    assert plan.profiles[0].bounds["unet"]["latent_width"] == (168, 168, 168)
    assert plan.profiles[0].shapes["vae_decoder"]["latent"][1] == (1, 4, 96, 168)


def test_grouped_profiles_split_by_aspect_ratio() -> None:
    spec = get_family("sdxl")
    plan = plan_profiles(spec, ios_for("sdxl"), strategy="grouped", groups=3)
    assert [p.name for p in plan.profiles] == ["landscape", "square", "portrait"]
    ranges = [(min(map(log_aspect, p.sizes)), max(map(log_aspect, p.sizes))) for p in plan.profiles]
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))  # groups do not interleave
    square = plan.profiles[1]
    assert square.opt_size == (1024, 1024)  # the native size when a group holds it
    for p in plan.profiles:  # every other group's opt is one of its own members, central in log aspect
        assert p.opt_size in p.sizes
        lo, hi = min(map(log_aspect, p.sizes)), max(map(log_aspect, p.sizes))
        assert lo <= log_aspect(p.opt_size) <= hi


def test_group_by_aspect_finds_clusters() -> None:
    sizes = [(512, 1024), (512, 960), (768, 768), (704, 704), (1024, 512), (960, 512)]
    groups = group_by_aspect(sizes, 3)
    assert [set(g) for g in groups] == [{(512, 1024), (512, 960)}, {(768, 768), (704, 704)},
                                        {(1024, 512), (960, 512)}]
    assert len(group_by_aspect([(512, 512), (768, 768)], 3)) == 1  # one aspect ratio: one group


def test_dynamic_plan_opt_is_native_size() -> None:
    plan = plan_profiles(get_family("sd2-v"), ios_for("sd2-v"), strategy="dynamic")
    assert plan.profiles[0].opt_size == (768, 768)
    assert plan.profiles[0].bounds["unet"]["latent_height"][1] == 96
    assert plan.union_bounds("unet") == dict(plan.profiles[0].bounds["unet"])


def test_union_io_covers_all_profiles() -> None:
    spec = get_family("sdxl")
    plan = plan_profiles(spec, ios_for("sdxl"), strategy="grouped")
    io = plan.io("unet")
    lh = io.dims["latent_height"]
    assert (lh.min, lh.max) == (64, 256)
    assert profile(io)["sample"][0] == (1, 4, 64, 64)


def test_route_picks_nearest_opt_among_covering_profiles() -> None:
    entries = [{"name": "a", "sizes": ["512x512"], "bounds": {"latent_height": [64, 64, 128], "batch": [1, 1, 4]}},
               {"name": "b", "sizes": ["1024x1024"], "bounds": {"latent_height": [64, 120, 128], "batch": [1, 1, 4]}},
               {"name": "c", "sizes": ["2048x2048"], "bounds": {"latent_height": [200, 256, 256], "batch": [1, 1, 4]}}]
    assert select_profile("unet", entries, {"latent_height": 70, "batch": 1}) == 0
    assert select_profile("unet", entries, {"latent_height": 112, "batch": 1}) == 1
    assert select_profile("unet", entries, {"latent_height": 210, "batch": 2}) == 2


def test_route_on_real_plan() -> None:
    spec = get_family("sdxl")
    ios = ios_for("sdxl")
    plan = plan_profiles(spec, ios, strategy="grouped")
    assert plan.profiles[route(plan, "unet", request(ios["unet"], (1024, 1024), 2))].name == "square"
    assert plan.profiles[route(plan, "unet", request(ios["unet"], (2048, 512), 2))].name == "portrait"
    assert plan.profiles[route(plan, "vae_decoder", request(ios["vae_decoder"], (512, 2048), 1))].name == "landscape"


def test_uncovered_request_names_the_profiles_and_a_covering_size() -> None:
    spec = get_family("sdxl")
    ios = ios_for("sdxl")
    plan = plan_profiles(spec, ios, sizes=parse_sizes("1024x1024,768x1344"), strategy="per-bucket")
    with pytest.raises(UnsupportedShape) as e:
        route(plan, "unet", request(ios["unet"], (512, 512), 2))
    text = str(e.value)
    assert "512x512 px" in text
    assert "profile 0 '1024x1024'" in text and "profile 1 '768x1344'" in text
    assert "nearest planned size: 1024x1024 (profile 0)" in text
    assert "--sizes including 512x512" in text
    with pytest.raises(UnsupportedShape, match="unet_batch"):
        route(plan, "unet", request(ios["unet"], (1024, 1024), 9))


@pytest.mark.parametrize("kwargs, message", [
    ({"sizes": [(500, 512)]}, "multiples of the VAE factor"),
    ({"sizes": [(4096, 512)]}, "outside what the export supports"),
    ({"batch": (3, 2)}, "invalid"),
    ({"batch": (1, 9)}, "exceeds what the export supports"),
    ({"batch": (1, 4), "opt_batch": 5}, "outside the batch range"),
    ({"strategy": "fastest"}, "unknown profile strategy"),
    ({"sizes": []}, "no sizes"),
])
def test_invalid_requests_raise_unsupported_shape(kwargs: dict, message: str) -> None:
    with pytest.raises(UnsupportedShape, match=message):
        plan_profiles(get_family("sd1"), ios_for("sd1"), **kwargs)


def test_format_plan_lists_every_profile_and_component() -> None:
    spec = get_family("sdxl")
    plan = plan_profiles(spec, ios_for("sdxl"), sizes=parse_sizes("512x512,768x1344"), strategy="per-bucket")
    text = format_plan(plan)
    assert "family sdxl: 2 profile(s), strategy per-bucket" in text
    assert "CFG on" in text
    assert text.count("text_encoder_2 ") == 2
    assert "latent_height 96/96/96" in text


def test_all_families_plan_quickly_with_sdxl_buckets() -> None:
    """SDXL's 40 buckets under every strategy; the grouped DP stays cheap."""
    for family in FAMILIES:
        plan = plan_profiles(get_family(family), ios_for(family.value), sizes=SDXL_BUCKETS, strategy="grouped",
                             groups=5)
        assert len(plan.profiles) == 5
        assert math.isclose(sum(len(p.sizes) for p in plan.profiles), len(SDXL_BUCKETS))
