"""A family is its structure: a class-conditional family with its own conditioning kind, defined in the tests alone.

The worked example of docs/adding-a-family.md. What the contributor wrote, and nothing else:
1. the spec entry (tests/_families.py): `LABEL`, a conditioning kind nothing in latentrt/ knows (a class
   index per row under the diffusers keyword `class_labels`, its bound read from the UNet config,
   "unet:num_class_embeds", and its UNet config data: `unet_config=(("num_class_embeds", 10),
   ("class_embed_type", None))`), and `CLASS_COND`: no text encoder, a KL autoencoder, eps prediction,
   `LABEL`;
2. tiny-model config data: the same `unet_config` pairs (a tiny UNet gets them; detection compares them);
3. one provider, `tiny_class_label` (this module, `register_provider`; the null class for
   classifier-free guidance comes from the request, `conditioning["negative_class_labels"]`).
No file under latentrt/, reference/, export/, engines/ or runtime/ names this kind: the tiny checkpoint
comes from `reference/tiny.make_tiny`, detection compares the declared config keys, and IO, the export
wrapper, the ONNX Runtime build and the runtime's UNet feed derive from the spec.

Tolerances:
- the built ONNX Runtime UNet engine against diffusers' `UNet2DConditionModel` called with `class_labels`
  (same weights, fp32, CPU): rtol = atol = 1e-4 (the export's own parity check uses the same).
- sampling: our pipeline against a plain diffusers loop we did not write (the scheduler class built with
  `from_config` from the checkpoint's scheduler_config.json, `set_timesteps`, `scale_model_input`, the
  diffusers UNet with `class_labels`, `scheduler.step`, the diffusers VAE decode and `VaeImageProcessor`
  postprocessing; initial latents from `randn_tensor` with `torch.Generator("cpu").manual_seed(seed)`),
  [0, 1] images max |diff| per pixel: ONNX Runtime engines 1e-3, torch backend 2e-5, the bounds
  tests/test_pipeline.py uses for every built-in family (measured: ORT <= 1.3e-6, torch <= 1e-6).
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
from _families import CLASS_COND, CLASSES, LABEL

from latentrt.errors import CheckpointError, InvalidRequest, StaleArtifact, UnknownFamily
from latentrt.families import (
    FAMILIES,
    TIME_IDS_SIZE_CROP_TARGET,
    AutoencoderKind,
    AutoencoderSpec,
    ConditioningInput,
    DenoiserSpec,
    FamilySpec,
    Prediction,
    SamplerId,
    register_family,
)
from latentrt.manifest import ONNX_KIND, read_manifest
from latentrt.runtime.providers import PROVIDERS, FeedContext, register_provider
from latentrt.tensors import ModelDims, component_ios, describe_shape, dummy_inputs, io_from_json, io_to_json

RTOL = ATOL = 1e-4
IMAGE_TOL = {"onnxruntime": 1e-3, "torch": 2e-5}


# 3. the one provider: the UNet-batch rows of the new input for a request
def _labels(ctx: FeedContext, key: str) -> list[int]:
    """conditioning[key]: one class index, or one per prompt slot; InvalidRequest otherwise."""
    value = ctx.request.conditioning.get(key)
    labels: list[Any] = list(value) if isinstance(value, (list, tuple)) else [value] * len(ctx.request.prompts)
    if len(labels) != len(ctx.request.prompts) or not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x < CLASSES for x in labels):
        raise InvalidRequest(f"conditioning['{key}'] must give a class in 0..{CLASSES - 1} (or one per slot), "
                             f"got {value!r}")
    return [int(x) for x in labels]


def check_label(inp: ConditioningInput, ctx: FeedContext) -> None:
    """The request names a class and, with a CFG batch, the null class of the unconditional half."""
    _labels(ctx, inp.name)
    if ctx.cfg:
        _labels(ctx, f"negative_{inp.name}")


def label_rows(inp: ConditioningInput, ctx: FeedContext) -> torch.Tensor:
    """(rows,) int64: each slot's class repeated per image, the null class rows first with CFG."""
    def rows(key: str) -> torch.Tensor:
        return torch.tensor(_labels(ctx, key)).repeat_interleave(ctx.request.num_images_per_prompt)

    return ctx.rows(rows(inp.name), rows(f"negative_{inp.name}") if ctx.cfg else None)


@pytest.fixture(scope="module")
def family() -> Iterator[FamilySpec]:
    """CLASS_COND and its provider registered for this module only (other modules iterate over the families)."""
    spec = register_family(CLASS_COND)
    register_provider(LABEL.provider, label_rows, check=check_label, request_keys=("{name}", "negative_{name}"))
    yield spec
    FAMILIES.pop(spec.id)
    PROVIDERS.pop(LABEL.provider)


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
                     vae_scale_factor=8, unet_config={"num_class_embeds": CLASSES})
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
    assert loaded.dims.unet_config == {"num_class_embeds": CLASSES} and loaded.dims.context_dim == 0
    assert loaded.dims.text_hidden == () and loaded.ios()["unet"].input("class_labels").high == CLASSES
    unet: Any = loaded.modules["unet"]
    assert unet.config.num_class_embeds == CLASSES and unet.config.class_embed_type is None


def test_structure_follows_the_declared_config_data_not_the_input_name(checkpoint: Path, family: FamilySpec) -> None:
    """The UNet config keys come from the input's data: another name, the same data, the same checkpoint."""
    from latentrt.manifest_checks import structure_problems
    from latentrt.reference.models import folder_facts, model_dims, model_index
    from latentrt.reference.structure import mismatches
    from latentrt.reference.tiny import unet_config

    renamed = replace(family, id="tiny-class-cond-y", denoiser=DenoiserSpec(Prediction.EPS, (replace(LABEL, name="y"),)))
    assert LABEL.config_keys == ("num_class_embeds",) and LABEL.unet_keys == ("num_class_embeds", "class_embed_type")
    config = unet_config(renamed, 0, 0)
    assert config["num_class_embeds"] == CLASSES and config["class_embed_type"] is None
    facts = folder_facts(checkpoint, model_index(checkpoint))
    assert mismatches(renamed, facts) == []
    assert structure_problems(renamed, model_dims(family, checkpoint)) == []
    assert component_ios(renamed, model_dims(family, checkpoint))["unet"].input_names == ["sample", "timestep", "y"]
    twenty = replace(renamed, denoiser=DenoiserSpec(Prediction.EPS, (replace(LABEL, unet_config=(
        ("num_class_embeds", 20),)),)))  # other data, other structure
    assert mismatches(twenty, facts) == ["unet num_class_embeds 10 != 20 (input class_labels)"]
    assert unet_config(twenty, 0, 0)["num_class_embeds"] == 20


@pytest.mark.parametrize(("part", "changes", "needle"), [
    ("unet", {"num_class_embeds": 12}, "nearest: tiny-class-cond (unet num_class_embeds 12 != 10 (input class_labels))"),
    ("unet", {"in_channels": 9}, "unet in_channels 9 != 4 (4 latent)"),
    ("unet", {"num_class_embeds": None}, "unet has no num_class_embeds, which input class_labels reads"),
    ("unet", {"class_embed_type": "timestep"}, "unet class_embed_type 'timestep' != None (input class_labels)"),
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


@pytest.fixture(scope="module")
def engines(checkpoint: Path, family: FamilySpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The family exported (parity checked in ONNX Runtime at 2 shapes) and built for ONNX Runtime."""
    from latentrt.engines.build import build_engines
    from latentrt.export.onnx import export_model

    out = tmp_path_factory.mktemp("class-cond-engines")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_dir = export_model(checkpoint, out / "onnx")
    m = read_manifest(onnx_dir, ONNX_KIND)
    assert m["family"] == family.name and list(m["components"]) == list(family.components)
    assert all(len(c["parity"]["checks"]) >= 2 for c in m["components"].values())
    return build_engines(onnx_dir, out / "engines", backend="onnxruntime")


def test_exported_and_built_unet_matches_diffusers_with_class_labels(checkpoint: Path, engines: Path) -> None:
    from diffusers import UNet2DConditionModel

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


# ---------------------------------------------------------------------------- sampling


def diffusers_images(checkpoint: Path, sampler: str, labels: list[int], steps: int, seed: int,
                     guidance: float = 1.0, null_class: int | None = None, size: int = 64) -> np.ndarray:
    """[0, 1] images (N, H, W, 3) from a plain diffusers loop: the checkpoint's modules, scheduler and postprocessing.

    With guidance > 1 the UNet batch is [null class, class] (uncond first) and the guided prediction
    is uncond + guidance * (cond - uncond), as classifier-free guidance (Ho & Salimans 2022).
    """
    import diffusers
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils.torch_utils import randn_tensor

    from latentrt.runtime.scheduler_config import SAMPLER_CLASSES

    cls, overrides = SAMPLER_CLASSES[SamplerId(sampler)]
    config = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, cls.name).from_config(config, **overrides)
    unet: Any = diffusers.UNet2DConditionModel.from_pretrained(str(checkpoint / "unet")).eval()
    vae: Any = diffusers.AutoencoderKL.from_pretrained(str(checkpoint / "vae")).eval()
    scheduler.set_timesteps(steps)  # before the latents: init_noise_sigma is the first sigma of the schedule
    g = torch.Generator("cpu").manual_seed(seed)
    shape = (len(labels), unet.config.in_channels, size // 8, size // 8)
    latents = randn_tensor(shape, generator=g, dtype=torch.float32) * scheduler.init_noise_sigma
    cond = torch.tensor(labels)
    cfg = guidance > 1
    class_labels = torch.cat([torch.full_like(cond, int(null_class or 0)), cond]) if cfg else cond
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
            eps = unet(x, t, encoder_hidden_states=None, class_labels=class_labels).sample
            if cfg:
                uncond, text = eps.chunk(2)
                eps = uncond + guidance * (text - uncond)
            latents = scheduler.step(eps, t, latents, generator=g).prev_sample
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    return np.asarray(VaeImageProcessor(vae_scale_factor=8).postprocess(decoded, output_type="np"))


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


CASES = [  # (id, sampler, labels, steps, guidance, null class)
    ("ddim", "ddim", [3, 7], 3, 1.0, None),
    ("euler-cfg", "euler", [5], 3, 4.0, 0),
]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize(("case", "sampler", "labels", "steps", "guidance", "null"), CASES, ids=[c[0] for c in CASES])
def test_sampled_like_a_plain_diffusers_loop(checkpoint: Path, engines: Path, backend: str, case: str, sampler: str,
                                             labels: list[int], steps: int, guidance: float,
                                             null: int | None) -> None:
    from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

    conditioning: dict[str, Any] = {"class_labels": labels}
    if null is not None:
        conditioning["negative_class_labels"] = null
    pipe = load_pipeline(engines if backend == "onnxruntime" else checkpoint, backend=backend)
    try:
        ours = pipe.generate(GenerationRequest(conditioning=conditioning, sampler=sampler, steps=steps,
                                               guidance=guidance, seed=11, width=64, height=64))
    finally:
        pipe.close()
    ref = diffusers_images(checkpoint, sampler, labels, steps, 11, guidance, null)
    assert ours.array is not None and ours.array.shape == ref.shape == (len(labels), 64, 64, 3)
    diff = max_diff(ours.array, ref)
    print(f"{case} {backend}: images max |diff| {diff:.2e}")
    assert diff <= IMAGE_TOL[backend]
    other = diffusers_images(checkpoint, sampler, [(x + 1) % CLASSES for x in labels], steps, 11, guidance, null)
    assert max_diff(other, ref) > 10 * IMAGE_TOL[backend]  # the class decides the image


def test_the_provider_checks_the_request(engines: Path) -> None:
    from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

    pipe = load_pipeline(engines)
    try:
        with pytest.raises(InvalidRequest, match=r"conditioning\['class_labels'\] must give a class in 0..9"):
            pipe.generate(GenerationRequest(conditioning={"class_labels": CLASSES}, steps=1, seed=0))
        with pytest.raises(InvalidRequest, match=r"conditioning\['negative_class_labels'\] must give a class"):
            pipe.generate(GenerationRequest(conditioning={"class_labels": 1}, guidance=3.0, steps=1, seed=0))
        with pytest.raises(InvalidRequest, match="takes no conditioning value 'labels'; it takes class_labels, "
                                                 "negative_class_labels"):
            pipe.generate(GenerationRequest(conditioning={"labels": 1}, steps=1, seed=0))
    finally:
        pipe.close()


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


# ---------------------------------------------------------------------------- structure, not names


def test_a_class_embedding_no_input_declares_does_not_fit_a_text_family(checkpoint: Path, family: FamilySpec,
                                                                        tiny_checkpoint: Any, tmp_path: Path) -> None:
    """The config keys any known input declares give a UNet input: a family that declares none does not fit."""
    from latentrt.reference.models import folder_facts, model_index
    from latentrt.reference.structure import mismatches

    sd1 = FAMILIES["sd1"]
    labelled = edited(tiny_checkpoint("sd1"), tmp_path / "sd1", "unet", num_class_embeds=4)
    assert mismatches(sd1, folder_facts(labelled, model_index(labelled))) == [
        "unet num_class_embeds=4 gives a UNet input that family sd1 does not declare"]


def test_time_ids_kind_is_read_by_provider_key() -> None:
    custom = replace(TIME_IDS_SIZE_CROP_TARGET, provider="my_time_ids")
    spec = replace(FAMILIES["sdxl"], id="sdxl-custom-ids", denoiser=DenoiserSpec(Prediction.EPS, (custom,)))
    assert FAMILIES["sdxl"].time_ids.width == 6 and CLASS_COND.time_ids.width == 0
    with pytest.raises(ValueError, match="provider 'my_time_ids'\\) is not a built-in TimeIds kind"):
        _ = spec.time_ids


def test_unet_wrapper_refuses_inputs_the_family_does_not_declare(family: FamilySpec) -> None:
    from latentrt.reference.wrappers import unet_keywords

    assert unet_keywords(family.denoiser, ["sample", "timestep", "class_labels"]) == ("class_labels",)
    with pytest.raises(StaleArtifact, match="UNet input 'y' is not a conditioning input the family declares"):
        unet_keywords(family.denoiser, ["sample", "timestep", "y"])
    with pytest.raises(StaleArtifact, match="UNet inputs start with timestep, sample"):
        unet_keywords(family.denoiser, ["timestep", "sample"])


def test_memory_reference_widths_are_family_data(family: FamilySpec) -> None:
    from latentrt.memory import architecture

    assert architecture(FAMILIES["sdxl-refiner"], None).attention_factor == 2
    assert architecture(FAMILIES["sd-turbo"], None).attention_heads == 5
    assert architecture(family, {"unet_channels": 32}).unet_channels == 32
    assert architecture(family, None) == FAMILIES["sd1"].reference_widths
