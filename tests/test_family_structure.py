"""A family is its structure: a class-conditional UNet family defined here alone is detected, exported and built.

The worked example of docs/adding-a-family.md (export half): `CLASS_COND` declares no text encoder, one
conditioning input (`CLASS_LABEL`, 10 classes), a KL autoencoder and eps prediction. Nothing in
latentrt/ knows it: its tiny checkpoint comes from `reference/tiny.make_tiny` (the config follows the
structure), detection, IO, the export wrapper and the ONNX Runtime build derive from the spec.

Tolerances: the built ONNX Runtime UNet engine against diffusers' `UNet2DConditionModel` called with
`class_labels` (same weights, fp32, CPU): rtol = atol = 1e-4 (the export's own parity check uses the same).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from latentrt.errors import CheckpointError, UnknownFamily
from latentrt.families import (
    CLASS_LABEL,
    FAMILIES,
    AutoencoderKind,
    AutoencoderSpec,
    DenoiserSpec,
    FamilySpec,
    Prediction,
    SamplerId,
    SamplingDefaults,
    Spacing,
    register_family,
)
from latentrt.manifest import ONNX_KIND, read_manifest
from latentrt.tensors import ModelDims, component_ios, describe_shape, dummy_inputs, io_from_json, io_to_json

CLASSES = 10
CLASS_COND = FamilySpec(
    id="tiny-class-cond", title="Class-conditional latent diffusion (test family)", text_encoders=(),
    denoiser=DenoiserSpec(Prediction.EPS, (replace(CLASS_LABEL, high=CLASSES),)),
    native_size=(64, 64), buckets=((64, 64),), sampling=SamplingDefaults(SamplerId.DDIM, 10, 1.0, Spacing.LEADING),
    autoencoder=AutoencoderSpec(AutoencoderKind.KL, factor=8, latent_channels=4), pipeline_class="DiffusionPipeline",
)
RTOL = ATOL = 1e-4


@pytest.fixture(scope="module")
def family() -> Iterator[FamilySpec]:
    """CLASS_COND in the registry for this module only (other modules iterate over the built-in families)."""
    spec = register_family(CLASS_COND)
    yield spec
    FAMILIES.pop(spec.id)


@pytest.fixture(scope="module")
def checkpoint(family: FamilySpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from latentrt.reference.tiny import make_tiny

    return make_tiny(family.name, tmp_path_factory.mktemp("class-cond") / "ckpt")


def edited(folder: Path, dest: Path, part: str, **changes: Any) -> Path:
    """A copy of `folder` whose `part` config has `changes`."""
    shutil.copytree(folder, dest)
    path = dest / part / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return dest


# ---------------------------------------------------------------------------- structure -> IO


def test_component_ios_follow_the_declared_structure(family: FamilySpec) -> None:
    dims = ModelDims(text_hidden=(), pooled_dim=0, context_dim=0, unet_in_channels=4, latent_channels=4,
                     vae_scale_factor=8, num_class_embeds=CLASSES)
    ios = component_ios(family, dims)
    assert tuple(ios) == family.components == ("unet", "vae_encoder", "vae_decoder")
    unet = ios["unet"]
    assert unet.input_names == ["sample", "timestep", "class_labels"]
    labels = unet.input("class_labels")
    assert labels.dtype == "int64" and labels.high == CLASSES and describe_shape(labels) == "(unet_batch)"
    assert "sequence" not in unet.dims
    feed = dummy_inputs(unet, {"unet_batch": 64})
    assert feed["class_labels"].shape == (64,) and 0 <= feed["class_labels"].min() <= feed["class_labels"].max() < CLASSES
    assert io_from_json(json.loads(json.dumps(io_to_json(unet)))) == unet


# ---------------------------------------------------------------------------- detection


def test_detected_from_its_folder(checkpoint: Path, family: FamilySpec) -> None:
    from latentrt.reference.models import detect_family, load_checkpoint

    assert detect_family(checkpoint) is family
    loaded = load_checkpoint(checkpoint)
    assert loaded.spec is family and set(loaded.modules) == {"unet", "vae"} and not loaded.tokenizers
    assert loaded.dims.num_class_embeds == CLASSES and loaded.dims.context_dim == 0 and loaded.dims.text_hidden == ()
    unet: Any = loaded.modules["unet"]
    assert unet.config.num_class_embeds == CLASSES


@pytest.mark.parametrize(("part", "changes", "needle"), [
    ("unet", {"num_class_embeds": 12}, "nearest: tiny-class-cond (unet num_class_embeds 12 != 10 classes)"),
    ("unet", {"in_channels": 9}, "unet in_channels 9 != 4 (4 latent)"),
    ("unet", {"num_class_embeds": None}, "unet has no class embedding (num_class_embeds), but the family takes class"),
])
def test_detection_names_the_mismatch(checkpoint: Path, family: FamilySpec, tmp_path: Path, part: str,
                                      changes: dict[str, Any], needle: str) -> None:
    from latentrt.reference.models import detect_family

    with pytest.raises(UnknownFamily, match="matches no supported family") as e:
        detect_family(edited(checkpoint, tmp_path / "edited", part, **changes))
    assert needle in str(e.value) and "--family" in str(e.value)


def test_a_forced_family_that_does_not_fit_is_refused(checkpoint: Path, family: FamilySpec,
                                                      tiny_checkpoint: Any) -> None:
    from latentrt.reference.models import load_checkpoint

    with pytest.raises(CheckpointError, match="does not fit family tiny-class-cond: text encoders text_encoder "
                                              r"\(family tiny-class-cond has none\); unet has cross-attention"):
        load_checkpoint(tiny_checkpoint("sd1"), family=family.name)
    with pytest.raises(CheckpointError, match="no 'text_encoder'/'tokenizer', which family sd1 needs"):
        load_checkpoint(checkpoint, family="sd1")


# ---------------------------------------------------------------------------- export and build


def test_exported_and_built_unet_matches_diffusers_with_class_labels(checkpoint: Path, family: FamilySpec,
                                                                     tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    from latentrt.engines.build import build_engines
    from latentrt.export.onnx import export_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_dir = export_model(checkpoint, tmp_path / "onnx")  # parity checked in ONNX Runtime at 2 shapes
    m = read_manifest(onnx_dir, ONNX_KIND)
    assert m["family"] == family.name and list(m["components"]) == list(family.components)
    assert all(len(c["parity"]["checks"]) >= 2 for c in m["components"].values())
    engines = build_engines(onnx_dir, tmp_path / "engines", backend="onnxruntime")
    built = read_manifest(engines)
    session = ort.InferenceSession(str(engines / built["components"]["unet"]["path"]),
                                   providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["sample", "timestep", "class_labels"]
    unet: Any = UNet2DConditionModel.from_pretrained(str(checkpoint / "unet")).eval()
    g = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        sample = torch.randn(batch, 4, 8, 8, generator=g)
        t = torch.tensor([999.0, 500.5, 1.0][:batch])
        labels = torch.tensor([0, 7, CLASSES - 1][:batch])
        with torch.no_grad():
            ref = unet(sample, t, encoder_hidden_states=None, class_labels=labels).sample
        got = session.run(None, {"sample": sample.numpy(), "timestep": t.numpy(), "class_labels": labels.numpy()})[0]
        np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=RTOL, atol=ATOL)
    with torch.no_grad():  # the labels matter: another class gives another prediction
        other = unet(sample, t, encoder_hidden_states=None, class_labels=(labels + 1) % CLASSES).sample
    assert float((other - ref).abs().max()) > 1e-3


def test_a_vq_autoencoder_decodes_through_the_codebook(family: FamilySpec) -> None:
    """The structure says VQ: the IO has no posterior parameters and the decoder wrapper quantizes first."""
    from latentrt.reference.tiny import make_vae
    from latentrt.reference.wrappers import VqDecoderWrapper

    vq = replace(family, id="tiny-class-cond-vq", autoencoder=AutoencoderSpec(AutoencoderKind.VQ, factor=4,
                                                                              latent_channels=3))
    dims = ModelDims(text_hidden=(), pooled_dim=0, context_dim=0, unet_in_channels=3, latent_channels=3,
                     vae_scale_factor=4, num_class_embeds=CLASSES)
    ios = component_ios(vq, dims)
    assert ios["vae_encoder"].output_names == ["latent"] and ios["unet"].input("sample").shape[1] == 3
    vae: Any = make_vae(vq, seed=0)
    assert type(vae).__name__ == "VQModel" and len(vae.config.block_out_channels) == 3  # factor 4
    latent = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = VqDecoderWrapper(vae)(latent)[0]
        quantized = vae.decode(vae.quantize(latent)[0], force_not_quantize=True).sample
    assert got.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(got.numpy(), quantized.numpy(), rtol=RTOL, atol=ATOL)
