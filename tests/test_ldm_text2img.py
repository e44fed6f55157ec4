"""Text-to-image latent diffusion (LDM-KL-8-G): LDM-BERT context, KL f=8 autoencoder, DDIM with guidance.

The tiny checkpoint is diffusers' own layout of CompVis/ldm-text2im-large-256, saved through
`LDMTextToImagePipeline` (parts `bert`: an `LDMBertModel`, `tokenizer`: a `BertTokenizer` of a small
generated WordPiece vocabulary, `unet`, `vqvae`: an `AutoencoderKL`, `scheduler`); it is detected,
exported (parity checked), built for ONNX Runtime and sampled from the CLI and the API.

Tolerances:
- the built LDM-BERT engine against diffusers' `LDMBertModel` on the pipeline's own tokenization
  (77 tokens, [CLS] ... [SEP] [PAD]...): rtol = atol = 1e-4 (the export's parity check uses the same).
- sampling: our pipeline against diffusers' `LDMTextToImagePipeline` loaded from the same folder with a
  `DDIMScheduler` it saves (as the released checkpoint ships: no x0 clipping), eta 0, the same seed
  through a CPU `torch.Generator`, [0, 1] images max |diff| per pixel: ONNX Runtime engines 1e-3, torch
  backend 2e-5 (the bounds of tests/test_pipeline.py).
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from latentrt.cli import main
from latentrt.families import FAMILIES, FamilyId, TextTower
from latentrt.manifest import ONNX_KIND, read_manifest
from latentrt.runtime.images import read_png_metadata

RTOL = ATOL = 1e-4
IMAGE_TOL = {"onnxruntime": 1e-3, "torch": 2e-5}
SIZE = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from latentrt.reference.tiny import make_tiny

    return make_tiny(FamilyId.LDM_TEXT2IMG.value, tmp_path_factory.mktemp("ldm-text2img") / "ckpt")


@pytest.fixture(scope="module")
def engines(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every component exported (parity checked in ONNX Runtime) and built for ONNX Runtime."""
    from latentrt.engines.build import build_engines
    from latentrt.export.onnx import export_model

    out = tmp_path_factory.mktemp("ldm-text2img-engines")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_dir = export_model(checkpoint, out / "onnx")
    m = read_manifest(onnx_dir, ONNX_KIND)
    assert m["family"] == "ldm-text2img" and list(m["components"]) == ["text_encoder", "unet", "vae_encoder",
                                                                       "vae_decoder"]
    assert all(len(c["parity"]["checks"]) >= 2 for c in m["components"].values())
    return build_engines(onnx_dir, out / "engines", backend="onnxruntime")


def test_saved_in_the_ldm_pipeline_layout_and_detected(checkpoint: Path) -> None:
    from latentrt.reference.models import detect_family, load_checkpoint

    index = json.loads((checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "LDMTextToImagePipeline"
    assert index["bert"] == ["latent_diffusion", "LDMBertModel"] and index["vqvae"] == ["diffusers", "AutoencoderKL"]
    assert index["tokenizer"][1] == "BertTokenizer" and not (checkpoint / "vae").exists()
    spec = detect_family(checkpoint)
    assert spec is FAMILIES["ldm-text2img"] and spec.text_encoders[0].tower is TextTower.LDM_BERT
    loaded = load_checkpoint(checkpoint)
    assert {k: type(v).__name__ for k, v in loaded.modules.items()} == {
        "text_encoder": "LDMBertModel", "unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}
    tok = loaded.tokenizers["tokenizer"]
    assert type(tok).__name__ == "BertTokenizer" and tok.model_max_length == 77
    assert loaded.dims.text_hidden == (32,) and loaded.dims.context_dim == 32 and loaded.dims.text_vocab == (len(tok),)
    ids = loaded.ios()["text_encoder"].input("input_ids")
    assert ids.high == len(tok)  # the export's example token ids stay inside LDM-BERT's vocabulary


def test_text_encoder_engine_matches_ldm_bert(checkpoint: Path, engines: Path) -> None:
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
    from transformers import BertTokenizer

    built = read_manifest(engines)
    session = ort.InferenceSession(str(engines / built["components"]["text_encoder"]["path"]),
                                   providers=["CPUExecutionProvider"])
    bert: Any = LDMBertModel.from_pretrained(str(checkpoint / "bert")).eval()
    tok = BertTokenizer.from_pretrained(str(checkpoint / "tokenizer"))
    ids = tok(["a painting of a squirrel eating a burger", ""], padding="max_length", max_length=77,
              truncation=True, return_tensors="pt").input_ids  # as LDMTextToImagePipeline tokenizes
    with torch.no_grad():
        ref = bert(ids)[0]
    got = session.run(None, {"input_ids": ids.numpy()})[0]
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=RTOL, atol=ATOL)


def test_runtime_tokenizes_as_the_pipeline(engines: Path) -> None:
    """[CLS] prompt [SEP], then [PAD] to 77: the windows of the runtime are the pipeline's `max_length` padding."""
    from transformers import BertTokenizer

    from latentrt.runtime.engine_set import load_tokenizers
    from latentrt.runtime.prompts import batch_windows, prompt_tokens

    tok = load_tokenizers(engines, FAMILIES["ldm-text2img"])["tokenizer"]
    assert isinstance(tok, BertTokenizer)
    for text in ("a red castle on a mountain", ""):
        ids, _ = batch_windows(tok, [prompt_tokens(tok, text)], 1)
        want = tok(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids[0].tolist() == want


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> Callable[[tuple[str, ...], int, float], np.ndarray]:
    """[0, 1] images (N, H, W, 3) from diffusers' LDMTextToImagePipeline as saved (DDIM, as the released one),
    seed 11; each (prompts, steps, guidance) computed once for both backends."""
    from diffusers import DDIMScheduler, LDMTextToImagePipeline

    pipe: Any = LDMTextToImagePipeline.from_pretrained(str(checkpoint))
    assert isinstance(pipe.scheduler, DDIMScheduler)
    pipe.set_progress_bar_config(disable=True)

    @functools.cache
    def images(prompts: tuple[str, ...], steps: int, guidance: float) -> np.ndarray:
        out = pipe(list(prompts), height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=guidance,
                   eta=0.0, generator=torch.Generator("cpu").manual_seed(11), output_type="np")
        return np.asarray(out.images)

    return images


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


CASES = [  # (id, prompts, steps, guidance)
    ("two-prompts", ["a painting of a squirrel eating a burger", "a blue house"], 3, 1.0),
    ("cfg", ["an astronaut on a horse"], 3, 4.0),
]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize(("case", "prompts", "steps", "guidance"), CASES, ids=[c[0] for c in CASES])
def test_sampled_like_the_diffusers_pipeline(checkpoint: Path, engines: Path, reference: Any, backend: str,
                                             case: str, prompts: list[str], steps: int, guidance: float) -> None:
    from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

    pipe = load_pipeline(engines if backend == "onnxruntime" else checkpoint, backend=backend)
    try:
        ours = pipe.generate(GenerationRequest(prompt=prompts, steps=steps, guidance=guidance,
                                               seed=11, width=SIZE, height=SIZE))
    finally:
        pipe.close()
    ref = reference(tuple(prompts), steps, guidance)
    assert ours.array is not None and ours.array.shape == ref.shape == (len(prompts), SIZE, SIZE, 3)
    diff = max_diff(ours.array, ref)
    print(f"{case} {backend}: images max |diff| {diff:.2e}")
    assert diff <= IMAGE_TOL[backend]
    other = reference(tuple(p + " tree" for p in prompts), steps, guidance)
    # the prompt reaches the UNet: another prompt moves the image 10x further than ours is from diffusers' (tiny
    # random cross-attention moves it little: ~3e-4)
    assert max_diff(other, ref) > 10 * diff


def test_generate_from_the_cli(engines: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

    out = tmp_path / "squirrel.png"
    argv = ["generate", str(engines), "-p", "a squirrel", "--guidance", "3", "--steps", "2",
            "--width", str(SIZE), "--height", str(SIZE), "--seed", "5", "--no-progress", "-o", str(out)]
    assert main(argv) == 0
    assert f"wrote {out} ({SIZE}x{SIZE}, seed 5)" in capsys.readouterr().out
    settings = json.loads(read_png_metadata(out)["latentrt"])
    assert settings["family"] == "ldm-text2img" and settings["prompts"] == ["a squirrel"]
    assert settings["sampler"] == "ddim"  # the checkpoint's own scheduler
    pipe = load_pipeline(engines)
    try:
        api = pipe.generate(GenerationRequest(prompt="a squirrel", guidance=3.0, steps=2, seed=5,
                                              width=SIZE, height=SIZE))
    finally:
        pipe.close()
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api.images[0]))
