"""`latentrt import-onnx`: an ONNX folder in Hugging Face Optimum's layout becomes a LatentRT export.

Optimum itself cannot be installed beside this project's pins (optimum 2.1 / optimum-onnx 0.1 pull
transformers 4.x and huggingface_hub 0.x, with which diffusers 0.42 does not import), so the Optimum folders
here are written by `optimum_folder`: the tiny checkpoints' PyTorch parts exported with torch.onnx under the
names, dtypes and layout Optimum's ONNX configs declare (optimum/exporters/onnx/model_configs.py:
CLIPTextOnnxConfig, CLIPTextWithProjectionOnnxConfig, UNetOnnxConfig, VaeEncoderOnnxConfig,
VaeDecoderOnnxConfig; optimum/exporters/utils.py `_get_submodels_for_export_diffusion`): every text-encoder
output (`last_hidden_state`, `pooler_output` / `text_embeds`, `hidden_states.N` for SDXL), an int64 UNet
`timestep`, `sample` -> `latent_parameters`, `latent_sample` -> `sample`, one `config.json` per part and
the pipeline's own model_index.json (which still lists `vae`).

Tolerance: the import's parity check is the export's (fp32 ONNX Runtime vs fp32 PyTorch,
|diff| <= 1e-4 + 1e-4 * max|ref| per output, `latentrt.export.onnx.TOLERANCE`), not loosened.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from latentrt.cli import main
from latentrt.manifest import read_manifest
from latentrt.reference.models import load_checkpoint

AXES_TEXT = {0: "batch_size", 1: "sequence_length"}


class _Text(torch.nn.Module):
    """Optimum's text encoder graph: every output transformers gives (hidden states only for SDXL)."""

    def __init__(self, encoder: Any, all_hidden: bool):
        super().__init__()
        self.encoder, self.all_hidden = encoder, all_hidden

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(input_ids, output_hidden_states=self.all_hidden, return_dict=True)
        first = (out.text_embeds, out.last_hidden_state) if hasattr(out, "text_embeds") else \
            (out.last_hidden_state, out.pooler_output)
        return (*first, *(out.hidden_states if self.all_hidden else ()))


class _Unet(torch.nn.Module):
    def __init__(self, unet: Any, sdxl: bool):
        super().__init__()
        self.unet, self.sdxl = unet, sdxl

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *added: torch.Tensor) -> torch.Tensor:
        extra = {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if self.sdxl else {}
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **extra)[0]


class _VaeEncoder(torch.nn.Module):
    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(sample).latent_dist.parameters


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


def _export(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, ins: list[str], outs: list[str],
            axes: dict[str, dict[int, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), input_names=ins, output_names=outs, dynamic_axes=axes,
                          opset_version=17, dynamo=False)


def optimum_folder(family: str, root: Path, *, vae_encoder: bool = True) -> Path:
    """The tiny `family` checkpoint written in Optimum's ONNX layout under `root` (see the module docstring)."""
    loaded = load_checkpoint(f"tiny:{family}")
    sdxl = all_hidden = family == "sdxl"
    out = root / f"optimum-{family}"
    shutil.copyfile(loaded.folder / "model_index.json", out.mkdir(parents=True) or out / "model_index.json")
    for part in ("scheduler", *(te.tokenizer for te in loaded.spec.text_encoders)):
        shutil.copytree(loaded.folder / part, out / part)
    ids = torch.randint(0, 1000, (2, 77))
    for te in loaded.spec.text_encoders:
        enc: Any = loaded.modules[te.component]
        n_layers = enc.config.num_hidden_layers
        first = ["text_embeds", "last_hidden_state"] if te.pooled else ["last_hidden_state", "pooler_output"]
        outs = first + ([f"hidden_states.{i}" for i in range(n_layers + 1)] if all_hidden else [])
        _export(_Text(enc, all_hidden), (ids,), out / te.component / "model.onnx", ["input_ids"], outs,
                {n: AXES_TEXT for n in ["input_ids", *outs]})
        enc.config.save_pretrained(out / te.component)
    unet: Any = loaded.modules["unet"]
    ctx = unet.config.cross_attention_dim
    args = [torch.randn(2, unet.config.in_channels, 8, 8), torch.tensor([10, 10]), torch.randn(2, 77, ctx)]
    ins = ["sample", "timestep", "encoder_hidden_states"]
    if sdxl:
        args += [torch.randn(2, loaded.dims.pooled_dim), torch.randn(2, loaded.dims.time_ids)]
        ins += ["text_embeds", "time_ids"]
    axes = {"sample": {0: "batch_size", 2: "height", 3: "width"}, "timestep": {0: "steps"},
            "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"}, "text_embeds": {0: "batch_size"},
            "time_ids": {0: "batch_size"}, "out_sample": {0: "batch_size", 2: "height", 3: "width"}}
    _export(_Unet(unet, sdxl), tuple(args), out / "unet" / "model.onnx", ins, ["out_sample"],
            {k: v for k, v in axes.items() if k in ins or k == "out_sample"})
    unet.save_config(out / "unet")
    vae: Any = loaded.modules["vae"]
    image_axes = {0: "batch_size", 2: "height", 3: "width"}
    if vae_encoder:
        _export(_VaeEncoder(vae), (torch.randn(1, 3, 32, 32),), out / "vae_encoder" / "model.onnx", ["sample"],
                ["latent_parameters"], {"sample": image_axes, "latent_parameters": image_axes})
    _export(_VaeDecoder(vae), (torch.randn(1, 4, 8, 8),), out / "vae_decoder" / "model.onnx", ["latent_sample"],
            ["sample"], {"latent_sample": image_axes, "sample": image_axes})
    for part in ("vae_encoder", "vae_decoder")[0 if vae_encoder else 1:]:
        vae.save_config(out / part)
    return out


@pytest.fixture(scope="module")
def sd1_optimum(tmp_path_factory: pytest.TempPathFactory, latentrt_cache: Path) -> Path:
    return optimum_folder("sd1", tmp_path_factory.mktemp("opt"))


def test_sd1_import_with_checkpoint_builds_and_generates(sd1_optimum: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "onnx"
    assert main(["import-onnx", str(sd1_optimum), "-o", str(out), "--checkpoint", "tiny:sd1"]) == 0
    m = read_manifest(out)
    assert m["family"] == "sd1" and m["exporter"] == "optimum" and set(m["components"]) == {
        "text_encoder", "unet", "vae_encoder", "vae_decoder"}
    for name, entry in m["components"].items():
        checks = entry["parity"]["checks"]
        assert len(checks) >= 2, name  # compared with PyTorch at every parity shape, within TOLERANCE
    assert m["components"]["vae_decoder"]["optimum_names"] == {"latent": "latent_sample", "images": "sample"}
    assert m["components"]["text_encoder"]["optimum_names"]["hidden_states"] == "last_hidden_state"
    import onnx

    unet = onnx.load(str(out / "unet" / "model.onnx"), load_external_data=False)
    assert [i.name for i in unet.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # int64 inside, cast in-graph
    engines, png = tmp_path / "eng", tmp_path / "a.png"
    assert main(["build", str(out), "-o", str(engines), "--backend", "onnxruntime"]) == 0
    assert main(["generate", str(engines), "-p", "a cat", "-o", str(png), "--width", "64", "--height", "64",
                 "--steps", "2", "--seed", "3", "--no-progress"]) == 0
    assert png.is_file()
    capsys.readouterr()


def test_sdxl_penultimate_and_pooled_mapped(tmp_path: Path, latentrt_cache: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    folder = optimum_folder("sdxl", tmp_path, vae_encoder=False)
    out = tmp_path / "onnx"
    assert main(["import-onnx", str(folder), "-o", str(out), "--checkpoint", "tiny:sdxl",
                 "--components", "text_encoder,text_encoder_2,unet"]) == 0
    m = read_manifest(out)
    assert m["family"] == "sdxl"
    encoder: Any = load_checkpoint("tiny:sdxl").modules["text_encoder_2"]
    layers = encoder.config.num_hidden_layers
    names = m["components"]["text_encoder_2"]["optimum_names"]
    assert names == {"input_ids": "input_ids", "hidden_states": f"hidden_states.{layers - 1}",
                     "text_embeds": "text_embeds"}
    assert all(m["components"][c]["parity"]["checks"] for c in m["components"])
    # an SDXL text encoder exported without its hidden states (not what Optimum writes for SDXL) is refused
    path = folder / "text_encoder" / "model.onnx"
    model = onnx.load(str(path))
    kept = [o for o in model.graph.output if not o.name.startswith("hidden_states.")]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(path))
    capsys.readouterr()
    assert main(["import-onnx", str(folder), "-o", str(tmp_path / "o"), "--components", "text_encoder"]) == 2
    err = capsys.readouterr().err
    assert "penultimate" in err and "text_encoder" in err


def test_family_detected_without_checkpoint(sd1_optimum: Path, tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    assert main(["import-onnx", str(sd1_optimum), "-o", str(out)]) == 0
    m = read_manifest(out)
    assert m["family"] == "sd1" and m["imported"]["parity"] is False
    assert all(not e["parity"]["checks"] for e in m["components"].values())


def test_what_cannot_be_mapped_is_refused(sd1_optimum: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    old = tmp_path / "old-vae"
    shutil.copytree(sd1_optimum, old)
    model = onnx.load(str(old / "vae_encoder" / "model.onnx"))
    for v in [*model.graph.output, *model.graph.node]:  # an older Optimum: a sampled latent, not the parameters
        if hasattr(v, "output"):
            v.output[:] = ["latent_sample" if o == "latent_parameters" else o for o in v.output]
        elif v.name == "latent_parameters":
            v.name = "latent_sample"
    onnx.save(model, str(old / "vae_encoder" / "model.onnx"))
    assert main(["import-onnx", str(old), "-o", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "vae_encoder" in err and "latent_sample" in err and "latent_parameters" in err
    assert not (tmp_path / "o1").exists()
    assert main(["import-onnx", str(old), "-o", str(tmp_path / "o2"), "--components",
                 "text_encoder,unet,vae_decoder"]) == 0


def test_export_and_generate_point_to_import(sd1_optimum: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    index = json.loads((sd1_optimum / "model_index.json").read_text())
    assert "vae" in index  # Optimum keeps the pipeline's model_index.json; there is no vae/ folder
    assert main(["export", str(sd1_optimum), "-o", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err
    assert "Optimum ONNX export" in err and "import-onnx" in err and "has no 'vae'" not in err
