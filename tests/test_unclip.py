"""Stable unCLIP 2.1 (issue 12, sd2-unclip): image variations on ONNX Runtime and PyTorch against diffusers.

The tiny sd2-unclip checkpoint (`make_tiny`: a CLIPVisionModelWithProjection at 32 px with its
CLIPImageProcessor, a StableUnCLIPImageNormalizer with random mean / std, the release's DDPM image
noising schedule, an OpenCLIP text tower, a v-prediction UNet with a "projection" class embedding
of 2 x 24 inputs) is detected, exported with parity (every component, the image encoder and the
embedding noising included), built for ONNX Runtime and sampled through the Python API, the CLI
and a real HTTP server. The reference is diffusers' `StableUnCLIPImg2ImgPipeline` loaded from the
same folder, with `generator=torch.Generator("cpu").manual_seed(seed)` (it draws the embedding's
noise, then the initial latents: our runtime draws in that order).

Tolerances (max |diff|), as tests/test_pipeline.py:
- the conditioning the UNet gets (the noised image embedding ++ the noise level's embedding, against
  diffusers' `_encode_image`): torch 1e-5, onnxruntime 1e-4 (measured 0 / <= 2e-6);
- the [0, 1] images: torch 2e-5, onnxruntime 1e-3 (measured <= 3e-6 / <= 4e-6).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from latentrt.cli import main
from latentrt.errors import InvalidRequest
from latentrt.manifest import ONNX_KIND, read_manifest
from latentrt.runtime.images import read_png_metadata
from latentrt.runtime.pipeline import GenerationRequest, Pipeline, load_pipeline
from latentrt.runtime.samplers import SeededNoise
from latentrt.runtime.serve import GenerationServer, serve
from latentrt.runtime.unclip import image_condition

FAMILY = "sd2-unclip"
BACKENDS = ("onnxruntime", "torch")
EMBED_TOL = {"onnxruntime": 1e-4, "torch": 1e-5}
IMAGE_TOL = {"onnxruntime": 1e-3, "torch": 2e-5}
PROMPT = "a photo of a cat"
FAST = ["--steps", "2", "--seed", "3", "--width", "64", "--height", "64", "--no-progress"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny checkpoint, its ONNX export (parity checked by the export) and ONNX Runtime engines."""
    from latentrt.engines.build import build_engines
    from latentrt.export.onnx import export_model
    from latentrt.reference.tiny import make_tiny

    root = tmp_path_factory.mktemp("unclip")
    checkpoint = make_tiny(FAMILY, root / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_dir = export_model(checkpoint, root / "onnx")
    engines = build_engines(onnx_dir, root / "engines", backend="onnxruntime")
    return {"checkpoint": checkpoint, "onnx": onnx_dir, "engines": engines}


@pytest.fixture(scope="module")
def pipes(folders: dict[str, Path]) -> Iterator[dict[str, Pipeline]]:
    out = {"onnxruntime": load_pipeline(folders["engines"]), "torch": load_pipeline(folders["checkpoint"], "torch")}
    yield out
    for p in out.values():
        p.close()


@pytest.fixture(scope="module")
def reference(folders: dict[str, Path]) -> Any:
    from diffusers import StableUnCLIPImg2ImgPipeline

    pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(str(folders["checkpoint"]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40x48 (WxH) noise picture: the processor resizes and center-crops it to 32 px."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("picture") / "in.png"
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_detected_and_exported_with_every_component(folders: dict[str, Path]) -> None:
    from latentrt.reference.models import detect_family

    assert detect_family(folders["checkpoint"]).name == FAMILY
    m = read_manifest(folders["onnx"], ONNX_KIND)
    assert list(m["components"]) == ["text_encoder", "image_encoder", "image_noising", "unet", "vae_encoder",
                                     "vae_decoder"]
    assert set(m["files"]) == {"tokenizer", "scheduler", "feature_extractor"}
    encoder, noising = m["components"]["image_encoder"], m["components"]["image_noising"]
    assert [(t["name"], t["shape"][1:]) for t in encoder["io"]["inputs"]] == [("pixel_values", [3, 32, 32])]
    assert [(t["name"], t["shape"][1:]) for t in encoder["io"]["outputs"]] == [("image_embeds", [24])]
    assert [t["name"] for t in noising["io"]["inputs"]] == ["image_embeds", "noise", "noise_level"]
    assert noising["io"]["inputs"][2]["high"] == 1000
    assert [(t["name"], t["shape"][1:]) for t in noising["io"]["outputs"]] == [("noised_image_embeds", [48])]
    unet = {t["name"]: t["shape"][1:] for t in m["components"]["unet"]["io"]["inputs"]}
    assert unet["noised_image_embeds"] == [48]
    for name in ("image_encoder", "image_noising"):
        checks = m["components"][name]["parity"]["checks"]
        assert len(checks) >= 2 and all(d <= 1e-4 for c in checks for d in c["max_abs_diff"].values())


def test_detection_needs_the_image_encoder_and_the_class_projection(folders: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from latentrt.errors import UnknownFamily
    from latentrt.families import get_family
    from latentrt.reference.models import detect_family, folder_facts, model_index
    from latentrt.reference.structure import mismatches

    facts = folder_facts(folders["checkpoint"], model_index(folders["checkpoint"]))
    assert mismatches(get_family(FAMILY), facts) == []
    assert mismatches(get_family("sd2-v"), facts) == ["unet class_embed_type='projection' gives a UNet input that "
                                                      "family sd2-v does not declare"]
    copy = tmp_path / "no-image-encoder"
    shutil.copytree(folders["checkpoint"], copy)
    shutil.rmtree(copy / "image_encoder")
    assert mismatches(get_family(FAMILY), folder_facts(copy, model_index(copy))) == [
        "no image encoder, which family sd2-unclip needs"]
    with pytest.raises(UnknownFamily, match="matches no supported family"):
        detect_family(copy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", [0, 300])
def test_the_unet_conditioning_matches_diffusers(pipes: dict[str, Pipeline], reference: Any, picture: Path,
                                                  backend: str, level: int) -> None:
    pipe = pipes[backend]
    settings, _ = pipe.resolve(GenerationRequest(prompt=PROMPT, image=picture, seed=5, width=64, height=64,
                                                 conditioning={"noise_level": level}))
    got = image_condition(pipe.engines, settings, SeededNoise(5))["noised_image_embeds"]
    with torch.no_grad():
        want = reference._encode_image(image=Image.open(picture), device="cpu", batch_size=1, num_images_per_prompt=1,
                                       do_classifier_free_guidance=False, noise_level=torch.tensor([level]),
                                       generator=torch.Generator("cpu").manual_seed(5), image_embeds=None)
    assert got.shape == want.shape == (1, 48)
    assert float((got - want).abs().max()) <= EMBED_TOL[backend]


CASES = [  # (prompt, guidance, noise_level, num_images)
    pytest.param(PROMPT, 1.0, 0, 1, id="no-cfg"),
    pytest.param(PROMPT, 6.0, 250, 2, id="cfg-noised-2-images"),
    pytest.param(None, 4.0, 0, 1, id="no-prompt"),  # diffusers encodes "" (its default)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("prompt", "guidance", "level", "images"), CASES)
def test_variations_match_diffusers(pipes: dict[str, Pipeline], reference: Any, picture: Path, backend: str,
                                    prompt: str | None, guidance: float, level: int, images: int) -> None:
    want = reference(image=Image.open(picture), prompt=prompt, height=64, width=64, num_inference_steps=3,
                     guidance_scale=guidance, noise_level=level, num_images_per_prompt=images,
                     generator=torch.Generator("cpu").manual_seed(7), output_type="np").images
    got = pipes[backend].generate(GenerationRequest(prompt=prompt, image=picture, width=64, height=64, steps=3,
                                                    guidance=guidance, seed=7, num_images_per_prompt=images,
                                                    conditioning={"noise_level": level}))
    assert got.array is not None and got.array.shape == want.shape
    assert float(np.abs(got.array - want).max()) <= IMAGE_TOL[backend]
    assert got.settings["mode"] == "txt2img" and got.settings["conditioning"] == {"noise_level": level}


def test_the_image_and_the_noise_level_reach_the_unet(pipes: dict[str, Pipeline], picture: Path) -> None:
    def image(level: int, source: Path | Image.Image = picture) -> np.ndarray:
        result = pipes["onnxruntime"].generate(GenerationRequest(prompt=PROMPT, image=source, width=64, height=64,
                                                                 steps=2, seed=3, conditioning={"noise_level": level}))
        assert result.array is not None
        return result.array

    base = image(0)
    assert np.abs(image(900) - base).max() > 1e-3
    assert np.abs(image(0, Image.new("RGB", (32, 32), (200, 30, 30))) - base).max() > 1e-3


@pytest.mark.parametrize(("request_kwargs", "needle"), [
    ({}, "makes variations of an image: give an image"),
    ({"conditioning": {"noise_level": 1000}}, "must be a whole number in [0, 999]"),
    ({"conditioning": {"noise_level": 2.5}}, "must be a whole number in [0, 999]"),
    ({"conditioning": {"noise_level": [1, 2]}}, "holds different values"),
    ({"conditioning": {"class_labels": 3}}, "sd2-unclip takes no conditioning value 'class_labels'; it takes "
                                            "noise_level"),
    ({"mask": "MASK", "strength": None}, "does not inpaint"),
    ({"strength": 0.5}, "strength applies to img2img"),
])
def test_bad_requests_are_refused_before_any_work(pipes: dict[str, Pipeline], picture: Path,
                                                  request_kwargs: dict[str, Any], needle: str) -> None:
    kwargs: dict[str, Any] = {"prompt": PROMPT, "width": 64, "height": 64, "steps": 2, **request_kwargs}
    if "conditioning" in request_kwargs or "strength" in request_kwargs or "mask" in request_kwargs:
        kwargs["image"] = picture
    if kwargs.get("mask") == "MASK":
        kwargs["mask"] = picture
    with pytest.raises(InvalidRequest) as e:
        pipes["onnxruntime"].check(GenerationRequest(**kwargs))
    assert needle in str(e.value)


# ---------------------------------------------------------------------------- latentrt generate / serve


def test_generate_from_the_cli(folders: dict[str, Path], pipes: dict[str, Pipeline], picture: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "variation.png"
    argv = ["generate", str(folders["engines"]), "--image", str(picture), "-p", PROMPT, "--condition",
            "noise_level=100", "-o", str(out), *FAST]
    assert main(argv) == 0
    assert f"wrote {out} (64x64, seed 3)" in capsys.readouterr().out
    settings = json.loads(read_png_metadata(out)["latentrt"])
    assert settings["family"] == FAMILY and settings["conditioning"] == {"noise_level": 100}
    api = pipes["onnxruntime"].generate(GenerationRequest(prompt=PROMPT, image=picture, width=64, height=64, steps=2,
                                                          seed=3, conditioning={"noise_level": 100}))
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api.images[0]))
    assert main(["generate", str(folders["engines"]), "-p", PROMPT, "-o", str(tmp_path / "x.png"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "makes variations of an image: give an image (--image)" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def server(pipes: dict[str, Pipeline]) -> Iterator[GenerationServer]:
    srv = serve(pipes["onnxruntime"], "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def post(url: str, body: object) -> tuple[int, Any]:
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_server_takes_an_image_and_a_noise_level(server: GenerationServer, pipes: dict[str, Pipeline],
                                                     picture: Path) -> None:
    encoded = base64.b64encode(picture.read_bytes()).decode()
    status, body = post(server.url, {"prompt": PROMPT, "image": encoded, "conditioning": {"noise_level": 100},
                                     "steps": 2, "seed": 3, "width": 64, "height": 64})
    assert status == 200 and body["settings"]["conditioning"] == {"noise_level": 100}
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB")
    api = pipes["onnxruntime"].generate(GenerationRequest(prompt=PROMPT, image=picture, width=64, height=64, steps=2,
                                                          seed=3, conditioning={"noise_level": 100}))
    assert np.array_equal(np.asarray(image), np.asarray(api.images[0]))
    status, body = post(server.url, {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64})
    assert status == 400 and "give an image" in body["error"]
