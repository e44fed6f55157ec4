"""Export stage: tiny checkpoints of every family -> ONNX, checked in ONNX Runtime against diffusers."""

from __future__ import annotations

import json
import os
import shutil
import stat
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from latentrt.cli import main
from latentrt.errors import CheckpointError, OutputConflict, UnknownFamily
from latentrt.families import FAMILIES, FamilyId, get_family
from latentrt.manifest import MANIFEST, ONNX_KIND, read_manifest, sha256_tree, verify_files
from latentrt.tensors import ModelDims, component_ios, io_from_json

FAMILY_IDS = [f.value for f in FamilyId]
MANIFEST_KEYS = {"kind", "schema", "family", "source", "model", "opset", "exporter", "tools", "components", "files",
                 "written", "seal"}  # issue 10: the files LatentRT wrote (--overwrite rule), the edit seal
COMPONENT_KEYS = {"path", "io", "sha256", "size_mb", "export_s", "parity"}


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def quiet_export(*args: object, **kwargs: object) -> Path:
    from latentrt.export.onnx import export_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_model(*args, **kwargs)  # type: ignore[arg-type]


def manifest_dims(manifest: dict) -> ModelDims:
    d = dict(manifest["model"]["dims"])
    return ModelDims(**{**d, "text_hidden": tuple(d["text_hidden"])})


# ---------------------------------------------------------------------------- every family


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_export_every_family(family: str, onnx_export_dir: Callable[[str], Path]) -> None:
    out = onnx_export_dir(family)
    spec = get_family(family)
    m = read_manifest(out, ONNX_KIND)
    assert set(m) == MANIFEST_KEYS
    assert m["family"] == family and m["exporter"] == "torchscript" and m["opset"] == 17
    assert m["source"]["model"] == f"tiny:{family}" and len(m["source"]["sha256"]) == 64
    image = {spec.image_encoder.processor} if spec.image_encoder is not None else set()  # issue 12: unCLIP's processor
    assert set(m["files"]) == {te.tokenizer for te in spec.text_encoders} | {"scheduler"} | image
    verify_files(out, m["files"])
    assert m["model"]["vae_scaling_factor"] == spec.vae_scaling_factor
    assert m["model"]["prediction_type"] == spec.prediction.value
    assert m["model"]["timestep_spacing"] == spec.sampling.spacing.value
    assert m["model"]["requires_aesthetics_score"] == (family == "sdxl-refiner")
    ios = component_ios(spec, manifest_dims(m))
    assert list(m["components"]) == list(spec.components)
    for name, entry in m["components"].items():
        assert set(entry) == COMPONENT_KEYS
        assert io_from_json(entry["io"]) == ios[name]
        assert sha256_tree((out / entry["path"]).parent) == entry["sha256"]
        checks = entry["parity"]["checks"]
        assert len({json.dumps(c["sizes"], sort_keys=True) for c in checks}) >= 2
        tol = entry["parity"]["tolerance"]
        for c in checks:
            assert set(c["max_abs_diff"]) == set(ios[name].output_names)
            assert all(0 <= d <= tol["atol"] * 100 for d in c["max_abs_diff"].values())
        s = session(out / entry["path"])
        assert [i.name for i in s.get_inputs()] == ios[name].input_names
        assert [o.name for o in s.get_outputs()] == ios[name].output_names
    assert not list(out.parent.glob(f".{out.name}.*"))  # no staging leftovers


@pytest.mark.parametrize("family", ["sd1-inpaint", "sdxl", "sdxl-refiner", "sd2-v"])
def test_exported_unet_and_vae_match_diffusers_at_new_shapes(family: str,
                                                             onnx_export_dir: Callable[[str], Path]) -> None:
    """The ONNX UNet / VAE run at batch 1 and 3 and two aspect ratios and equal the diffusers modules there."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out = onnx_export_dir(family)
    m = read_manifest(out, ONNX_KIND)
    folder = _tiny_folder(family)
    unet: Any = UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
    vae: Any = AutoencoderKL.from_pretrained(str(folder / "vae")).eval()
    dims = manifest_dims(m)
    g = torch.Generator().manual_seed(0)
    unet_s, dec_s, enc_s = (session(out / f"{c}/model.onnx") for c in ("unet", "vae_decoder", "vae_encoder"))
    for batch, (lh, lw) in [(1, (8, 24)), (3, (24, 16))]:
        sample = torch.randn(batch, dims.unet_in_channels, lh, lw, generator=g)
        t = torch.tensor([999.0, 500.5, 1.0][:batch])
        ctx = torch.randn(batch, 77, dims.context_dim, generator=g)
        feed = {"sample": sample, "timestep": t, "encoder_hidden_states": ctx}
        added = None
        if dims.pooled_dim:
            feed["text_embeds"] = torch.randn(batch, dims.pooled_dim, generator=g)
            feed["time_ids"] = torch.tensor([[lh * 8.0, lw * 8.0, 0.0, 0.0, lh * 8.0, lw * 8.0][: dims.time_ids]] * batch)
            added = {"text_embeds": feed["text_embeds"], "time_ids": feed["time_ids"]}
        with torch.no_grad():
            ref = unet(sample, t, ctx, added_cond_kwargs=added).sample
            latent = torch.randn(batch, 4, lh, lw, generator=g)
            images = vae.decode(latent).sample
            params = vae.encode(images).latent_dist.parameters
        got = np.asarray(unet_s.run(None, {k: v.numpy() for k, v in feed.items()})[0])
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-4, rtol=1e-4)
        decoded = np.asarray(dec_s.run(None, {"latent": latent.numpy()})[0])
        np.testing.assert_allclose(decoded, images.numpy(), atol=2e-4, rtol=1e-4)
        moments = np.asarray(enc_s.run(None, {"images": images.numpy()})[0])
        np.testing.assert_allclose(moments, params.numpy(), atol=2e-4, rtol=1e-4)
        assert images.shape == (batch, 3, 8 * lh, 8 * lw)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl-refiner"])
def test_exported_text_encoders_match_diffusers_encode_prompt(family: str,
                                                              onnx_export_dir: Callable[[str], Path]) -> None:
    """Tokenizers copied into the export + ONNX text encoders reproduce the diffusers pipeline's prompt embeds."""
    from diffusers import DiffusionPipeline
    from transformers import CLIPTokenizer

    out = onnx_export_dir(family)
    spec = get_family(family)
    pipe = DiffusionPipeline.from_pretrained(str(_tiny_folder(family)))
    prompts = ["a photo of an astronaut riding a horse on mars", "a cat"]
    hidden, pooled = [], None
    for te in spec.text_encoders:
        tok = CLIPTokenizer.from_pretrained(str(out / te.tokenizer))
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        outs = session(out / te.component / "model.onnx").run(None, {"input_ids": ids.astype(np.int64)})
        hidden.append(outs[0])
        pooled = outs[1] if te.pooled else pooled
    with torch.no_grad():
        ref = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    np.testing.assert_allclose(np.concatenate(hidden, axis=-1), ref[0].numpy(), atol=1e-4, rtol=1e-4)
    if spec.has_pooled:
        np.testing.assert_allclose(pooled, ref[2].numpy(), atol=1e-4, rtol=1e-4)  # type: ignore[arg-type]


def _tiny_folder(family: str) -> Path:
    from latentrt.reference.tiny import tiny_folder

    return tiny_folder(family)


# ---------------------------------------------------------------------------- loading and detection


def test_tiny_models_are_deterministic_and_detected(tmp_path: Path) -> None:
    from latentrt.reference.models import detect_family
    from latentrt.reference.tiny import make_tiny

    for family in FAMILY_IDS:
        assert detect_family(_tiny_folder(family)).id.value == family
    again = make_tiny("sdxl-refiner", tmp_path / "refiner")
    assert sha256_tree(again) == sha256_tree(_tiny_folder("sdxl-refiner"))


def test_loaded_model_facts() -> None:
    from latentrt.reference.models import load_checkpoint

    xl = load_checkpoint("tiny:sdxl")
    assert set(xl.modules) == {"text_encoder", "text_encoder_2", "unet", "vae"}
    assert set(xl.tokenizers) == {"tokenizer", "tokenizer_2"}
    assert xl.tokenizers["tokenizer_2"].pad_token == "!" and xl.tokenizers["tokenizer"].pad_token == "<|endoftext|>"
    assert xl.info["force_zeros_for_empty_prompt"] is True and xl.info["vae_shift_factor"] is None
    assert xl.dims.context_dim == sum(xl.dims.text_hidden) and xl.dims.time_ids == 6
    assert xl.modules["unet"].config.projection_class_embeddings_input_dim == xl.dims.pooled_dim + 6 * 8
    te = xl.modules["text_encoder_2"]
    assert te.config.num_hidden_layers >= 2 and te.config.hidden_act == "gelu"
    assert xl.modules["text_encoder"].config.hidden_act == "quick_gelu"
    assert all(not m.training and next(m.parameters()).dtype == torch.float32 for m in xl.modules.values())
    assert xl.scheduler_config["beta_schedule"] == "scaled_linear" and xl.scheduler_config["steps_offset"] == 1
    assert list(xl.ios()) == list(get_family("sdxl").components)
    v = load_checkpoint("tiny:sd2-v")
    assert v.info["prediction_type"] == "v_prediction" and v.modules["unet"].config.in_channels == 4
    assert load_checkpoint("tiny:sd2-inpaint").dims.unet_in_channels == 9


def test_family_override_and_mismatch() -> None:
    from latentrt.reference.models import load_checkpoint

    assert load_checkpoint("tiny:sd2", family="sd2-v").spec.id is FamilyId.SD2_V  # same structure: allowed
    with pytest.raises(CheckpointError, match="in_channels"):
        load_checkpoint("tiny:sd2", family="sd2-inpaint")
    with pytest.raises(CheckpointError, match="text_encoder_2"):
        load_checkpoint("tiny:sd1", family="sdxl")


def test_export_of_a_diffusers_save_pretrained_folder(tmp_path: Path) -> None:
    """A pipeline built and saved by diffusers itself (DDIM, v-prediction, OpenCLIP-style encoder) -> sd2-v."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet_cfg: dict[str, Any] = dict(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True)
    vae_cfg: dict[str, Any] = dict(
        block_out_channels=(32, 32, 64, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1,
                                        vocab_size=49408, hidden_act="gelu"))
    tokenizer = CLIPTokenizer.from_pretrained(str(_tiny_folder("sd2") / "tokenizer"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False)
    parts: dict[str, Any] = dict(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                 safety_checker=None, feature_extractor=None)
    pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    pipe.save_pretrained(str(tmp_path / "ckpt"))
    out = quiet_export(tmp_path / "ckpt", tmp_path / "onnx")
    m = read_manifest(out, ONNX_KIND)
    assert m["family"] == "sd2-v" and m["model"]["pipeline_class"] == "StableDiffusionPipeline"
    assert list(m["components"]) == list(FAMILIES[FamilyId.SD2_V].components)
    assert all(len(c["parity"]["checks"]) >= 2 for c in m["components"].values())
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"


# ---------------------------------------------------------------------------- exporter variants


def test_dynamo_exporter_on_the_smallest_component(tmp_path: Path) -> None:
    out = quiet_export("tiny:sd1", tmp_path / "dyn", dynamo=True, components=["text_encoder"])
    m = read_manifest(out, ONNX_KIND)
    assert m["exporter"] == "dynamo" and m["opset"] >= 18 and list(m["components"]) == ["text_encoder"]
    s = session(out / "text_encoder" / "model.onnx")
    for batch in (1, 3):
        hidden = np.asarray(s.run(None, {"input_ids": np.full((batch, 77), 49407, dtype=np.int64)})[0])
        assert hidden.shape == (batch, 77, 32)


def test_external_data_and_partial_reexport(tmp_path: Path) -> None:
    out = quiet_export("tiny:sd1", tmp_path / "ext", components=["vae_decoder"], external_data_mb=0.1)
    files = sorted(p.name for p in (out / "vae_decoder").iterdir())
    assert files == ["model.onnx", "model.onnx.data"]
    assert (out / "vae_decoder" / "model.onnx").stat().st_size < 200_000  # weights live in the data file
    m = read_manifest(out, ONNX_KIND)
    assert len(m["components"]["vae_decoder"]["parity"]["checks"]) >= 2  # ORT read the external data
    # same model, another component: allowed, and the manifest keeps the first one
    quiet_export("tiny:sd1", out, components=["vae_encoder"], verify=False)
    m = read_manifest(out, ONNX_KIND)
    assert list(m["components"]) == ["vae_encoder", "vae_decoder"]
    assert m["components"]["vae_encoder"]["parity"]["checks"] == []


# ---------------------------------------------------------------------------- errors


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_missing_and_malformed_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        quiet_export(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model_index.json"):
        quiet_export(tmp_path / "empty", tmp_path / "out")
    bad = tmp_path / "bad"
    shutil.copytree(_tiny_folder("sd1"), bad)
    (bad / "model_index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        quiet_export(bad, tmp_path / "out")
    code, line = _cli(["export", str(bad), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and line.startswith("latentrt export: error:") and "model_index.json" in line
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_unknown_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UnknownFamily, match="known families"):
        quiet_export("tiny:sd9", tmp_path / "out")
    with pytest.raises(UnknownFamily):
        quiet_export("tiny:sd1", tmp_path / "out", family="sd4")
    odd = tmp_path / "odd"
    shutil.copytree(_tiny_folder("sd1"), odd)
    cfg = json.loads((odd / "text_encoder" / "config.json").read_text())
    (odd / "text_encoder" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(UnknownFamily, match="--family"):
        quiet_export(odd, tmp_path / "out")
    code, line = _cli(["export", str(odd), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "matches no supported family" in line


def test_output_conflicts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = quiet_export("tiny:sd1", tmp_path / "out", components=["vae_encoder"], verify=False)
    with pytest.raises(OutputConflict, match="already holds the export of 'tiny:sd1'"):
        quiet_export("tiny:sd2", out, components=["vae_encoder"], verify=False)
    code, line = _cli(["export", "tiny:sd2", "-o", str(out), "--components", "vae_encoder"], capsys)
    assert code == 2 and "--overwrite" in line
    assert read_manifest(out)["family"] == "sd1"  # untouched
    quiet_export("tiny:sd2", out, components=["vae_encoder"], verify=False, overwrite=True)
    assert read_manifest(out)["family"] == "sd2"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputConflict, match="cannot write"):
        quiet_export("tiny:sd1", tmp_path / "a-file" / "out", components=["vae_encoder"])
    code, line = _cli(["export", "tiny:sd1", "-o", str(tmp_path / "a-file" / "out")], capsys)
    assert code == 2 and "cannot write" in line
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(OutputConflict, match="holds no LatentRT export"):
        quiet_export("tiny:sd1", tmp_path / "foreign", components=["vae_encoder"])


class Killed(Exception):
    pass


def test_interrupted_export_leaves_nothing_complete_looking(tmp_path: Path) -> None:
    def kill_at_second(line: str) -> None:
        if line.startswith("[2/"):
            raise Killed(line)

    with pytest.raises(Killed):
        quiet_export("tiny:sd1", tmp_path / "out", progress=kill_at_second, verify=False)
    assert not (tmp_path / "out" / MANIFEST).exists()
    assert not [p for p in tmp_path.rglob("*.onnx")]  # nothing moved into place, staging removed
    # an interrupted re-export keeps the previous complete export intact
    out = quiet_export("tiny:sd1", tmp_path / "out", components=["vae_encoder"], verify=False)
    before = read_manifest(out)
    with pytest.raises(Killed):
        quiet_export("tiny:sd1", out, components=["vae_encoder", "vae_decoder"], progress=kill_at_second)
    assert read_manifest(out) == before
    verify_files(out, {c["path"].split("/")[0]: c["sha256"] for c in before["components"].values()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------- tokenizer


def _open_clip_tokenizer() -> object:
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        pytest.skip("open_clip is not installed")
    path = Path(spec.origin).parent / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    try:  # load the tokenizer module alone: open_clip's package import needs torchvision
        mod_spec.loader.exec_module(module)
    except ImportError as e:
        pytest.skip(f"open_clip's tokenizer cannot be imported: {e}")
    return module.SimpleTokenizer()


def test_tiny_tokenizers_reproduce_open_clip_ids() -> None:
    from transformers import CLIPTokenizer

    reference = _open_clip_tokenizer()
    prompts = ["a photo of an astronaut riding a horse on mars",
               "A cinematic shot of a baby racoon wearing an intricate Italian priest robe.",
               "portrait, 4k, highly detailed!! (masterpiece) 1girl",
               " ".join(["word"] * 90)]  # truncated at 77 tokens
    expected = reference(prompts, context_length=77).numpy()  # type: ignore[attr-defined]
    tok1 = CLIPTokenizer.from_pretrained(str(_tiny_folder("sd1") / "tokenizer"))  # pads with <|endoftext|>
    got1 = tok1(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(got1, np.where(expected == 0, 49407, expected))
    tok2 = CLIPTokenizer.from_pretrained(str(_tiny_folder("sdxl") / "tokenizer_2"))  # pads with "!" = 0, like open_clip
    no_bang = [p for p in prompts if "!" not in p]
    got2 = tok2(no_bang, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(got2, reference(no_bang, context_length=77).numpy())  # type: ignore[attr-defined]


def test_sdxl_tokenizer_2_splits_exclamation_marks_like_diffusers() -> None:
    """SDXL's tokenizer_2 registers its pad token "!" as a special token, so "!!" becomes "!", "!" (diffusers#4153)."""
    from transformers import CLIPTokenizer

    tok2 = CLIPTokenizer.from_pretrained(str(_tiny_folder("sdxl") / "tokenizer_2"))
    ids = tok2("! !! !!!", padding="max_length", max_length=77).input_ids
    assert ids[:8] == [49406, 0, 0, 0, 0, 0, 0, 49407] and set(ids[8:]) == {0}
    tok1 = CLIPTokenizer.from_pretrained(str(_tiny_folder("sdxl") / "tokenizer"))
    assert tok1("! !! !!!").input_ids == [49406, 256, 748, 995, 49407]  # open_clip's ids


def test_hub_ids_take_the_hub_path_and_fail_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = "latentrt-tests/no-such-pipeline-0"  # offline here; a 404 where the hub is reachable
    with pytest.raises(CheckpointError, match="cannot fetch 'latentrt-tests/no-such-pipeline-0'"):
        quiet_export(missing, tmp_path / "out")
    code, line = _cli(["export", missing, "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "download it and pass the folder" in line


def test_info_describes_checkpoints_and_exports(onnx_export_dir: Callable[[str], Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = onnx_export_dir("sdxl-refiner")
    assert main(["info", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("ONNX export of tiny:sdxl-refiner (sdxl-refiner), opset 17, torchscript")
    assert [ln.split()[0] for ln in lines[1:]] == list(get_family("sdxl-refiner").components)
    assert all("parity max|diff|" in ln for ln in lines[1:])
    assert main(["info", str(_tiny_folder("sd2-inpaint"))]) == 0
    assert "family sd2-inpaint" in capsys.readouterr().out
    code, line = _cli(["info", str(tmp_path)], capsys)
    assert code == 2 and "holds no diffusers checkpoint" in line


def test_published_export_files_get_public_modes(tmp_path: Path) -> None:
    from latentrt.export.onnx import _publish

    stage = tmp_path / "stage"
    (stage / "tokenizer").mkdir(parents=True)
    (stage / "tokenizer" / "vocab.json").write_text("{}")
    (stage / "tokenizer" / "vocab.json").chmod(0o600)  # copytree keeps a private source file private
    (stage / "tokenizer").chmod(0o700)
    _publish(stage, tmp_path / "out", {"kind": "test"})  # issue 10: the whole staged folder is swapped in
    assert stat.S_IMODE((tmp_path / "out" / "tokenizer").stat().st_mode) == 0o755 & ~_umask()
    assert stat.S_IMODE((tmp_path / "out" / "tokenizer" / "vocab.json").stat().st_mode) == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
