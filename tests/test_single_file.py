"""Single original-layout `.safetensors` files: converted by diffusers' `from_single_file`, checked against diffusers.

The files are made from the tiny diffusers folders with our own reverse key map
(tests/_original_layout.py); the config folders hold configs and tokenizers only, so every weight
must come from the file.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _original_layout import config_only_copy, original_state_dict, save_original_layout
from safetensors import safe_open
from safetensors.torch import save_file

from latentrt.cli import main
from latentrt.errors import CheckpointError, UnknownFamily
from latentrt.export.onnx import check_parity
from latentrt.families import FamilyId
from latentrt.manifest import read_manifest, sha256_file
from latentrt.reference.models import LoadedModel, load_checkpoint
from latentrt.reference.single_file import MARKER, choose_family, load_single_file, read_single_file
from latentrt.reference.wrappers import wrap
from latentrt.runtime.engine_set import load_engines

FAMILIES = ["sd1", "sdxl", "sd2", "sdxl-refiner", "sd1-inpaint"]
SingleFiles = Callable[[str], tuple[Path, Path]]


@pytest.fixture(scope="module")
def single_file(tiny_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> SingleFiles:
    """Factory: family -> (original-layout file of the tiny checkpoint, config-only copy of its folder)."""
    root = tmp_path_factory.mktemp("single-file")
    made: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            folder = tiny_checkpoint(family)
            made[family] = (save_original_layout(folder, root / f"{family}.safetensors"),
                            config_only_copy(folder, root / f"{family}-config"))
        return made[family]

    return get


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Callable[[str], Path]) -> Callable[[str], LoadedModel]:
    """Factory: family -> the tiny diffusers folder loaded the ordinary way (the reference)."""
    loaded: dict[str, LoadedModel] = {}

    def get(family: str) -> LoadedModel:
        if family not in loaded:
            loaded[family] = load_checkpoint(tiny_checkpoint(family))
        return loaded[family]

    return get


def assert_same_weights(got: LoadedModel, ref: LoadedModel, cast: torch.dtype | None = None) -> None:
    assert got.modules.keys() == ref.modules.keys()
    for part, module in ref.modules.items():
        want, have = module.state_dict(), got.modules[part].state_dict()
        assert have.keys() == want.keys(), part
        for name, w in want.items():
            w = w.to(cast).float() if cast is not None and w.is_floating_point() else w
            assert have[name].dtype == w.dtype and torch.equal(have[name], w), f"{part}.{name}"


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


# ---------------------------------------------------------------------------- loading


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_loads_the_same_weights_as_the_diffusers_folder(
        family: str, single_file: SingleFiles, reference: Callable[[str], LoadedModel]) -> None:
    file, config = single_file(family)
    got, ref = load_single_file(file, config=config), reference(family)
    assert_same_weights(got, ref)
    assert got.spec is ref.spec and got.dims == ref.dims and got.info == ref.info
    assert {k: v for k, v in got.scheduler_config.items() if not k.startswith("_")} == \
           {k: v for k, v in ref.scheduler_config.items() if not k.startswith("_")}
    for name, tok in ref.tokenizers.items():
        assert got.tokenizers[name]("a photo of a cat").input_ids == tok("a photo of a cat").input_ids
    assert got.source == str(file.resolve()) and got.source_sha256 == sha256_file(file)
    marker = json.loads((got.folder / MARKER).read_text())
    assert marker["sha256"] == sha256_file(file) and marker["source"] == str(file)
    assert got.folder.name.startswith(marker["sha256"][:16])


def test_single_file_models_compute_what_diffusers_computes(single_file: SingleFiles,
                                                            reference: Callable[[str], LoadedModel]) -> None:
    file, config = single_file("sdxl")
    got, ref = load_checkpoint(str(file), config=config), reference("sdxl")  # the generic entry point
    g = torch.Generator().manual_seed(0)
    sample, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, ref.dims.context_dim, generator=g)
    added = {"text_embeds": torch.randn(2, ref.dims.pooled_dim, generator=g),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    ids = ref.tokenizers["tokenizer"](["a red fox", "snow"], padding="max_length", max_length=77,
                                      return_tensors="pt").input_ids
    with torch.no_grad():
        for m in (got, ref):
            m.modules["unet"].set_default_attn_processor()
        outs = [(m.modules["unet"](sample, 500.0, ctx, added_cond_kwargs=added).sample,
                 m.modules["vae"].decode(sample).sample,
                 m.modules["text_encoder"](ids, output_hidden_states=True).hidden_states[-2],
                 m.modules["text_encoder_2"](ids).text_embeds) for m in (got, ref)]
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_fp16_file_is_converted_in_fp16(single_file: SingleFiles, reference: Callable[[str], LoadedModel],
                                        tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    _, config = single_file("sd1")
    file = save_original_layout(tiny_checkpoint("sd1"), tmp_path / "sd1-fp16.safetensors", dtype=torch.float16)
    got = load_single_file(file, config=config)
    assert_same_weights(got, reference("sd1"), cast=torch.float16)
    with safe_open(str(got.folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # no fp32 blow-up in the cache


def test_conversions_are_cached_by_content(single_file: SingleFiles, tmp_path: Path) -> None:
    file, config = single_file("sd1")
    first = load_single_file(file, config=config).folder
    stamp = (first / MARKER).stat().st_mtime_ns
    copy = tmp_path / "renamed.safetensors"
    shutil.copyfile(file, copy)
    again = load_single_file(copy, config=config)
    assert again.folder == first and (first / MARKER).stat().st_mtime_ns == stamp
    assert again.source == str(copy.resolve())
    # without --config (e.g. the torch backend reloading an export's source), an earlier conversion is reused
    assert load_checkpoint(str(copy)).folder == first
    other_config = config_only_copy(config, tmp_path / "cfg")
    sched = other_config / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "steps_offset": 0}))
    assert load_single_file(file, config=other_config).folder != first  # another config, another conversion
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_family_is_read_from_the_keys(single_file: SingleFiles) -> None:
    def choose(family: str, override: str | None = None) -> str:
        return choose_family(read_single_file(single_file(family)[0]), None, override).spec.id.value

    assert [choose(f) for f in FAMILIES] == FAMILIES  # sd2 only provisionally: see the next lines
    sd2 = choose_family(read_single_file(single_file("sd2")[0]), None, None)
    # sd2-unclip too: an original-layout file's keys do not say whether an image encoder comes with it
    assert sd2.ambiguous and sd2.fits == (FamilyId.SD2, FamilyId.SD2_V, FamilyId.SD_TURBO, FamilyId.SD2_UNCLIP)
    assert not choose_family(read_single_file(single_file("sdxl")[0]), None, None).ambiguous
    assert choose("sdxl", "sdxl-turbo") == "sdxl-turbo" and choose("sd2", "sd2-v") == "sd2-v"
    with pytest.raises(CheckpointError, match="SD 1.x.*--family sdxl does not fit"):
        choose("sd1", "sdxl")
    with pytest.raises(CheckpointError, match="--family sd1-inpaint does not fit; expected one of sd1"):
        choose("sd1", "sd1-inpaint")


def test_the_config_decides_among_look_alikes(single_file: SingleFiles,
                                              tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    file, _ = single_file("sd2")  # SD 2 eps, SD 2 v and SD-Turbo files hold the same keys
    v_config = config_only_copy(tiny_checkpoint("sd2-v"), tmp_path / "sd2-v-config")
    got = load_single_file(file, config=v_config)
    assert got.spec.id is FamilyId.SD2_V and got.info["prediction_type"] == "v_prediction"
    assert got.modules["unet"].config["upcast_attention"] is True  # the config's, not the weights'


# ---------------------------------------------------------------------------- export


def test_cli_exports_a_single_file(single_file: SingleFiles, reference: Callable[[str], LoadedModel],
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file, config = single_file("sd1")
    out = tmp_path / "onnx"
    code, _ = cli(["export", str(file), "--config", str(config), "-o", str(out)], capsys)
    assert code == 0
    manifest = read_manifest(out)
    assert manifest["family"] == "sd1" and list(manifest["components"]) == list(reference("sd1").spec.components)
    assert manifest["source"] == {"model": str(file.resolve()), "sha256": sha256_file(file)}
    for entry in manifest["components"].values():  # parity against the file's own PyTorch modules
        assert entry["parity"]["checks"] and all(
            d <= 1e-4 for c in entry["parity"]["checks"] for d in c["max_abs_diff"].values())
    ref = reference("sd1")  # and against the diffusers folder's modules: same numbers from either source
    ios = ref.ios()
    for name in ("text_encoder", "unet", "vae_decoder"):
        checks = check_parity(wrap(name, ref), ios[name], out / name / "model.onnx")
        assert all(d <= 1e-4 for c in checks for d in c["max_abs_diff"].values())
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "scheduler").is_dir()
    torch_set = load_engines(out, backend="torch")  # reloads the export's source file (cached conversion)
    assert torch_set.source == manifest["source"] and torch_set.spec.id is FamilyId.SD1
    code, _ = cli(["export", str(file), "--config", str(config), "-o", str(out), "--components", "vae_encoder",
                   "--no-verify"], capsys)
    assert code == 0  # same file, same folder: a partial re-export is accepted


# ---------------------------------------------------------------------------- errors


def test_bad_files_fail_clearly(tmp_path: Path, single_file: SingleFiles, capsys: pytest.CaptureFixture[str]) -> None:
    _, config = single_file("sd1")
    out = str(tmp_path / "out")
    code, line = cli(["export", str(tmp_path / "missing.safetensors"), "--config", str(config), "-o", out], capsys)
    assert code == 2 and "single-file checkpoint" in line and "does not exist" in line
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(64))
    code, line = cli(["export", str(junk), "--config", str(config), "-o", out], capsys)
    assert code == 2 and "is not a safetensors file" in line
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04junk")
    with pytest.raises(CheckpointError, match="pickle checkpoint.*convert it to safetensors"):
        load_checkpoint(pickle, config=config)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.ones(1)}, str(lora))
    with pytest.raises(CheckpointError, match="no 'model.diffusion_model.\\*' tensors"):
        load_checkpoint(lora, config=config)
    assert not (tmp_path / "out").exists()


def test_incomplete_files_fail_clearly(tmp_path: Path, single_file: SingleFiles,
                                       tiny_checkpoint: Callable[[str], Path]) -> None:
    _, config = single_file("sd1")
    state = original_state_dict(tiny_checkpoint("sd1"))
    no_text = tmp_path / "no-text.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}, str(no_text))
    with pytest.raises(CheckpointError, match="no text_encoder weights"):
        load_single_file(no_text, config=config, family="sd1")
    no_vae = tmp_path / "no-vae.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("first_stage_model.")}, str(no_vae))
    with pytest.raises(CheckpointError, match="no vae weights"):
        load_single_file(no_vae, config=config)
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if ".output_blocks.2." not in k}, str(partial))
    with pytest.raises(CheckpointError, match="weights are missing"):
        load_single_file(partial, config=config)


def test_config_problems_fail_clearly(tmp_path: Path, single_file: SingleFiles,
                                      tiny_checkpoint: Callable[[str], Path], capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    file, config = single_file("sd1")
    _, xl_config = single_file("sdxl")
    with pytest.raises(CheckpointError, match="--config .*a sdxl pipeline.* does not fit"):
        load_single_file(file, config=xl_config)
    wide = config_only_copy(config, tmp_path / "wide")
    unet_cfg = wide / "unet" / "config.json"
    unet_cfg.write_text(json.dumps({**json.loads(unet_cfg.read_text()), "block_out_channels": [32, 48]}))
    with pytest.raises(CheckpointError, match="same family and size"):
        load_single_file(file, config=wide)
    with pytest.raises(CheckpointError, match="is not a diffusers folder"):
        load_single_file(file, config=tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="--config applies to single-file checkpoints"):
        load_checkpoint(tiny_checkpoint("sd1"), config=config)
    # no --config, no earlier conversion, no hub: say what to pass
    import huggingface_hub.constants

    monkeypatch.setenv("LATENTRT_CACHE", str(tmp_path / "fresh-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    code, line = cli(["export", str(file), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "cannot fetch the diffusers configs of 'stable-diffusion-v1-5/stable-diffusion-v1-5'" in line
    assert "--config <diffusers folder>" in line
    with pytest.raises(UnknownFamily, match="sd2, sd2-v, sd-turbo cannot be told apart.*--config"):
        load_single_file(single_file("sd2")[0])
    code, line = cli(["export", str(single_file("sd2")[0]), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "cannot be told apart" in line and "--config" in line
