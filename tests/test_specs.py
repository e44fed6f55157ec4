"""Every derivation from a ComponentIO (dynamic axes, dummy inputs, profiles, shapes) agrees, for every family."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from latentrt.buckets import SDXL_BUCKETS
from latentrt.families import FAMILIES, FamilyId, FamilySpec, TextTower
from latentrt.tensors import (
    ComponentIO,
    Dim,
    ModelDims,
    Scaled,
    component_ios,
    dummy_inputs,
    dynamic_axes,
    infer_sizes,
    io_from_json,
    io_to_json,
    profile,
    shape_of,
    shapes,
)

# Widths of the real checkpoints (CLIP-L 768, OpenCLIP-H 1024, OpenCLIP-bigG 1280 with a 1280 projection).
REAL_WIDTHS = {
    FamilyId.SD1: ((768,), 0), FamilyId.SD1_INPAINT: ((768,), 0), FamilyId.SD2: ((1024,), 0),
    FamilyId.SD2_V: ((1024,), 0), FamilyId.SD2_INPAINT: ((1024,), 0), FamilyId.SD_TURBO: ((1024,), 0),
    FamilyId.SDXL: ((768, 1280), 1280), FamilyId.SDXL_TURBO: ((768, 1280), 1280),
    FamilyId.SDXL_REFINER: ((1280,), 1280),
    FamilyId.LDM: ((), 0), FamilyId.LDM_CLASS_COND: ((), 0), FamilyId.LDM_SUPER_RES: ((), 0),  # issue 12: no text
    FamilyId.LDM_TEXT2IMG: ((1280,), 0),  # issue 12 (H2): LDM-BERT d_model 1280 (ldm-text2im-large-256)
    FamilyId.SD2_DEPTH: ((1024,), 0), FamilyId.SD_X4_UPSCALER: ((1024,), 0),  # issue 12 (H3)
    FamilyId.SD2_UNCLIP: ((1024,), 0),  # issue 12: Stable unCLIP-H
    FamilyId.DEMO: ((32,), 0), FamilyId.DEMO_TURBO: ((32,), 0),  # the shipped demo models (a 32-wide CLIP)
}
REAL_UNET_CONFIG: dict[FamilyId | str, dict[str, int]] = {FamilyId.SD_X4_UPSCALER: {"num_class_embeds": 1000}}  # noise levels (issue 12)


def real_dims(spec: FamilySpec) -> ModelDims:
    hidden, pooled = REAL_WIDTHS[spec.id]
    classes = 1001 if spec.denoiser.takes("class_labels") else 0  # ImageNet's 1000 and the null class
    return ModelDims(text_hidden=hidden, pooled_dim=pooled, context_dim=sum(hidden),
                     unet_in_channels=spec.unet_in_channels, latent_channels=spec.latent_channels,
                     vae_scale_factor=spec.vae_scale_factor, time_ids=spec.time_ids.width,
                     num_class_embeds=REAL_UNET_CONFIG.get(spec.id, {}).get("num_class_embeds", classes),
                     unet_config=REAL_UNET_CONFIG.get(spec.id, {}), **real_image_dims(spec))


def real_image_dims(spec: FamilySpec) -> dict[str, Any]:
    """issue 12: unCLIP-H's image side (ViT-H/14 at 224 px, 1024-wide embeddings, 1000 noise levels)."""
    return {"image_size": 224, "image_embed_dim": 1024, "image_noise_levels": 1000} if spec.image_encoder else {}


def all_ios() -> list[tuple[str, ComponentIO]]:
    return [(f"{fid.value}/{name}", io) for fid, spec in FAMILIES.items()
            for name, io in component_ios(spec, real_dims(spec)).items()]


IOS = all_ios()
IO_IDS = [name for name, _ in IOS]


def bound_sizes(io: ComponentIO) -> list[dict[str, int]]:
    dims = io.dims.values()
    return [{d.name: d.min for d in dims}, {d.name: d.opt for d in dims}]


def test_every_family_has_its_components() -> None:
    for fid, spec in FAMILIES.items():
        ios = component_ios(spec, real_dims(spec))
        assert tuple(ios) == spec.components, fid
        unet = ios["unet"]
        assert shape_of(unet.input("sample"), {"unet_batch": 1, "latent_height": 8, "latent_width": 8})[1] == \
            spec.unet_in_channels
        assert ("text_embeds" in unet.input_names) == spec.has_pooled
        assert ("time_ids" in unet.input_names) == (spec.time_ids.width > 0)
        if spec.time_ids.width:
            assert unet.input("time_ids").shape[1] == spec.time_ids.width
        if not spec.text_encoders:  # issue 12: the original LDM families attend to no context
            assert "encoder_hidden_states" not in unet.input_names
            continue
        context = unet.input("encoder_hidden_states").shape[2]
        assert context == sum(ios[te.component].outputs[0].shape[2] for te in spec.text_encoders)  # type: ignore


@pytest.mark.parametrize("io", [io for _, io in IOS], ids=IO_IDS)
def test_dynamic_axes_follow_the_symbolic_dims(io: ComponentIO) -> None:
    axes = dynamic_axes(io)
    for t in io.inputs + io.outputs:
        expected = {i: a.name for i, a in enumerate(t.shape) if isinstance(a, (Dim, Scaled))}
        assert axes.get(t.name, {}) == expected


@pytest.mark.parametrize("io", [io for _, io in IOS], ids=IO_IDS)
def test_dummy_inputs_profile_and_shapes_agree(io: ComponentIO) -> None:
    prof = profile(io)
    assert list(prof) == io.input_names
    lo, opt, hi = ({d.name: getattr(d, k) for d in io.dims.values()} for k in ("min", "opt", "max"))
    for t in io.inputs:
        assert prof[t.name] == (shape_of(t, lo), shape_of(t, opt), shape_of(t, hi))
        assert all(a <= b <= c for a, b, c in zip(*prof[t.name]))
    for sizes in bound_sizes(io):
        feed = dummy_inputs(io, sizes)
        concrete = shapes(io, sizes)
        assert {n: a.shape for n, a in feed.items()} == {t.name: concrete[t.name] for t in io.inputs}
        assert {n: str(a.dtype) for n, a in feed.items()} == {t.name: t.dtype for t in io.inputs}
        assert infer_sizes(io, feed) == {k: v for k, v in sizes.items() if k in _input_dims(io)}
        for t in io.outputs:
            assert len(concrete[t.name]) == len(t.shape)


def _input_dims(io: ComponentIO) -> set[str]:
    return {d.name for t in io.inputs for d in t.dims}


@pytest.mark.parametrize("io", [io for _, io in IOS], ids=IO_IDS)
def test_io_round_trips_through_json(io: ComponentIO) -> None:
    text = json.dumps(io_to_json(io))
    assert io_from_json(json.loads(text)) == io


def test_image_sides_are_the_vae_factor_times_latent_sides() -> None:
    for fid, spec in FAMILIES.items():
        io = component_ios(spec, real_dims(spec))["vae_decoder"]
        sizes = {"batch": 2, "latent_height": 16, "latent_width": 24}
        c, f = spec.latent_channels, spec.vae_scale_factor  # 4 and 8 for SD, 3 and 4 for the VQ-f4 LDM families
        assert shapes(io, sizes) == {"latent": (2, c, 16, 24), "images": (2, 3, 16 * f, 24 * f)}, fid


def test_buckets() -> None:
    for spec in FAMILIES.values():
        assert spec.buckets and all(h % 64 == 0 and w % 64 == 0 for h, w in spec.buckets), spec.id
    assert len(SDXL_BUCKETS) == 40
    assert (704, 1344) in SDXL_BUCKETS and (1344, 704) not in SDXL_BUCKETS
    assert (1024, 1024) in SDXL_BUCKETS


def test_family_facts_are_data() -> None:
    towers = {f: tuple(te.tower for te in s.text_encoders) for f, s in FAMILIES.items()}
    assert towers[FamilyId.SD1] == towers[FamilyId.SD1_INPAINT] == (TextTower.CLIP_L,)
    assert towers[FamilyId.SD2] == towers[FamilyId.SD_TURBO] == (TextTower.OPENCLIP_H,)
    assert towers[FamilyId.SDXL] == towers[FamilyId.SDXL_TURBO] == (TextTower.CLIP_L, TextTower.OPENCLIP_BIGG)
    assert towers[FamilyId.SDXL_REFINER] == (TextTower.OPENCLIP_BIGG,)
    assert towers[FamilyId.LDM_TEXT2IMG] == (TextTower.LDM_BERT,)  # issue 12 (H2)
    assert {f for f, s in FAMILIES.items() if s.fp16_vae_overflows} == {
        FamilyId.SDXL, FamilyId.SDXL_REFINER, FamilyId.SDXL_TURBO}
    assert {f for f, s in FAMILIES.items() if s.fp32_attention} == {
        FamilyId.SD2, FamilyId.SD2_V, FamilyId.SD2_INPAINT, FamilyId.SD_TURBO, FamilyId.SD2_DEPTH,
        FamilyId.SD_X4_UPSCALER, FamilyId.SD2_UNCLIP}  # issue 12: SD 2 UNets
    # every family with a diffusers pipeline has a reference checkpoint (class-conditional LDM has neither)
    repos = [s.reference_repo for s in FAMILIES.values() if s.pipeline_class != "DiffusionPipeline"
             and s.id not in (FamilyId.DEMO, FamilyId.DEMO_TURBO)]  # the demo models ship in the package
    assert all(r and r.count("/") == 1 for r in repos) and len(set(repos)) == len(repos)


def test_tiny_recipes_follow_the_spec_towers() -> None:
    from latentrt.reference.tiny import CLIP_L, OPENCLIP, text_recipes, unet_config

    sd1 = FAMILIES[FamilyId.SD1]
    assert text_recipes(sd1) == [CLIP_L] and not unet_config(sd1, 32, 0)["use_linear_projection"]
    openclip_sd1 = replace(sd1, text_encoders=(replace(sd1.text_encoders[0], tower=TextTower.OPENCLIP_H),))
    assert text_recipes(openclip_sd1) == [OPENCLIP] and unet_config(openclip_sd1, 48, 0)["use_linear_projection"]
    assert text_recipes(FAMILIES[FamilyId.SDXL]) == [CLIP_L, OPENCLIP]


def test_single_file_configs_come_from_the_spec(tmp_path: Path) -> None:
    from latentrt.errors import CheckpointError
    from latentrt.reference.single_file import config_folder

    with pytest.raises(CheckpointError, match="sd1 names no reference checkpoint.*--config"):
        config_folder(None, replace(FAMILIES[FamilyId.SD1], reference_repo=None))


def test_tree_hash_filters_and_checkpoint_hash(tmp_path: Path) -> None:
    from latentrt.manifest import sha256_tree
    from latentrt.reference.models import checkpoint_sha256

    for rel, text in [("model_index.json", "{}"), ("unet/config.json", "{}"), ("unet/w.safetensors", "w"),
                      ("README.md", "hi"), ("safety_checker/w.bin", "s")]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    other = tmp_path.parent / f"{tmp_path.name}-kept"
    for rel in ("model_index.json", "unet/config.json"):
        (other / rel).parent.mkdir(parents=True, exist_ok=True)
        (other / rel).write_text("{}")
    assert sha256_tree(tmp_path, include=lambda rel: rel.suffix == ".json") == sha256_tree(other)
    before = checkpoint_sha256(tmp_path)
    (tmp_path / "README.md").write_text("changed")
    (tmp_path / "safety_checker" / "w.bin").write_text("changed")
    assert checkpoint_sha256(tmp_path) == before
    (tmp_path / "unet" / "w.safetensors").write_text("changed")
    assert checkpoint_sha256(tmp_path) != before
