"""SD 2 depth-to-image (issue 12, H3): 5-channel UNet (4 latent + 1 depth), the user's depth map (PNG / NPY).

The tiny `sd2-depth` checkpoint (diffusers `StableDiffusionDepth2ImgPipeline` folder, no depth estimator) is
detected, exported (every component, parity checked in ONNX Runtime at 2 shapes), built for ONNX Runtime,
run from `latentrt generate --image ... --condition depth_map=FILE` and compared with the diffusers pipeline
loaded from the same folder and given the same `depth_map` (its `prepare_depth_map`: bicubic resize to
latent size, per-image normalization to [-1, 1], duplicated for CFG), same seed (CPU generator), settings.

Tolerances (max |diff| per pixel of the [0, 1] images, the bounds tests/test_pipeline.py uses for every
family): ONNX Runtime 1e-3, torch backend 2e-5 (measured: ORT ~1e-6, torch ~4e-6). The CLI image equals
the API's exactly (same engines, seed, process). No depth estimator runs: a request without a map is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from latentrt.cli import main
from latentrt.errors import InvalidRequest, TooLarge
from latentrt.families import SamplerId
from latentrt.manifest import ONNX_KIND, read_manifest
from latentrt.runtime.images import read_png_metadata
from latentrt.runtime.pipeline import GenerationRequest, Pipeline, load_pipeline

IMAGE_TOL = {"onnxruntime": 1e-3, "torch": 2e-5}
PROMPT = "a house by a lake"
SETTINGS: dict[str, Any] = dict(strength=0.75, steps=4, guidance=7.5, seed=5)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Any) -> Path:
    return tiny_checkpoint("sd2-depth")


@pytest.fixture(scope="module")
def engines(onnx_export_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from latentrt.engines.build import build_engines

    onnx_dir = onnx_export_dir("sd2-depth")
    return build_engines(onnx_dir, tmp_path_factory.mktemp("depth") / "engines", backend="onnxruntime")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 64x64 init image, a smooth depth map as a 16-bit PNG and the same values as an NPY file."""
    root = tmp_path_factory.mktemp("depth-inputs")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    image.save(root / "in.png")
    yy, xx = np.mgrid[0:64, 0:64]
    depth = (1000 + 300 * np.sin(xx / 9.0) + 40 * yy).astype(np.uint16)
    Image.fromarray(depth).save(root / "depth.png")  # mode I;16
    np.save(root / "depth.npy", depth.astype(np.float32) / 65535)
    np.save(root / "flipped.npy", depth[::-1].astype(np.float32) / 65535)
    return {"root": root, "image": image, "depth": depth.astype(np.float32) / 65535}


REFERENCE: dict[tuple[str, str, bytes], np.ndarray] = {}  # diffusers' images, computed once per module


def diffusers_images(checkpoint: Path, image: Image.Image, depth: np.ndarray, sampler: str, **kw: Any) -> np.ndarray:
    """StableDiffusionDepth2ImgPipeline from the same folder (no estimator) with `depth_map`, the sampler's class."""
    key = (str(checkpoint), sampler, depth.tobytes())
    if key not in REFERENCE:
        REFERENCE[key] = _diffusers_images(checkpoint, image, depth, sampler, **kw)
    return REFERENCE[key]


def _diffusers_images(checkpoint: Path, image: Image.Image, depth: np.ndarray, sampler: str, **kw: Any) -> np.ndarray:
    import diffusers

    from latentrt.runtime.scheduler_config import SAMPLER_CLASSES

    pipe: Any = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(
        str(checkpoint), depth_estimator=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    cls, overrides = SAMPLER_CLASSES[SamplerId(sampler)]
    pipe.scheduler = getattr(diffusers, cls.name).from_config(pipe.scheduler.config, **overrides)
    out = pipe(prompt=PROMPT, image=image, depth_map=torch.from_numpy(depth)[None], strength=kw["strength"],
               num_inference_steps=kw["steps"], guidance_scale=kw["guidance"],
               generator=torch.Generator("cpu").manual_seed(kw["seed"]), output_type="np")
    return np.asarray(out.images)


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_detected_and_exported_with_a_depth_channel(checkpoint: Path, onnx_export_dir: Any) -> None:
    from latentrt.reference.models import detect_family, load_checkpoint

    assert detect_family(checkpoint).name == "sd2-depth"
    loaded = load_checkpoint(checkpoint)
    unet: Any = loaded.modules["unet"]
    assert unet.config.in_channels == 5 and loaded.info["pipeline_class"] == "StableDiffusionDepth2ImgPipeline"
    m = read_manifest(onnx_export_dir("sd2-depth"), ONNX_KIND)
    assert list(m["components"]) == ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    assert all(len(c["parity"]["checks"]) >= 2 for c in m["components"].values())
    assert m["components"]["unet"]["io"]["inputs"][0]["shape"][1] == 5


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_matches_the_diffusers_depth2img_pipeline(checkpoint: Path, engines: Path, inputs: dict[str, Any],
                                                  backend: str, sampler: str) -> None:
    pipe = load_pipeline(engines if backend == "onnxruntime" else checkpoint, backend=backend)
    try:
        ours = pipe.generate(GenerationRequest(prompt=PROMPT, image=inputs["image"], sampler=sampler,
                                               conditioning={"depth_map": str(inputs["root"] / "depth.npy")},
                                               **SETTINGS))
    finally:
        pipe.close()
    ref = diffusers_images(checkpoint, inputs["image"], inputs["depth"], sampler, **SETTINGS)
    assert ours.array is not None and ours.array.shape == ref.shape == (1, 64, 64, 3)
    diff = max_diff(ours.array, ref)
    print(f"depth2img {sampler} {backend}: max |diff| {diff:.2e}")
    assert diff <= IMAGE_TOL[backend]
    other = diffusers_images(checkpoint, inputs["image"], inputs["depth"][::-1].copy(), sampler, **SETTINGS)
    assert max_diff(other, ref) > 10 * IMAGE_TOL[backend]  # the depth map reaches the UNet


def test_cli_generates_with_a_png_depth_map(engines: Path, inputs: dict[str, Any], tmp_path: Path,
                                            checkpoint: Path) -> None:
    out = tmp_path / "out.png"
    root = inputs["root"]
    assert main(["generate", str(engines), "-p", PROMPT, "--image", str(root / "in.png"), "--condition",
                 f"depth_map={root / 'depth.png'}", "--strength", "0.75", "--steps", "4", "--guidance", "7.5",
                 "--seed", "5", "--sampler", "ddim", "--no-progress", "-o", str(out)]) == 0
    settings = json.loads(read_png_metadata(out)["latentrt"])
    assert settings["family"] == "sd2-depth" and settings["mode"] == "img2img"
    assert settings["conditioning"] == {"depth_map": str(root / "depth.png")}
    got = np.asarray(Image.open(out)).astype(np.float64) / 255
    # the 16-bit PNG holds the NPY's values times 65535: the same map after normalization
    ref = diffusers_images(checkpoint, inputs["image"], inputs["depth"], "ddim", **SETTINGS)[0]
    assert max_diff(got, ref) <= 1 / 255 + IMAGE_TOL["onnxruntime"]  # PNG rounding to 8 bits


@pytest.fixture(scope="module")
def pipe(engines: Path) -> Any:
    pipeline = load_pipeline(engines)
    yield pipeline
    pipeline.close()


def _bad(root: Path, name: str, array: Any) -> str:
    path = root / name
    np.save(path, array, allow_pickle=True)
    return str(path)


def test_untrusted_depth_maps_are_refused(pipe: Pipeline, inputs: dict[str, Any], tmp_path: Path) -> None:
    def check(depth: Any, image: Any = inputs["image"]) -> None:
        pipe.check(GenerationRequest(prompt=PROMPT, image=image, conditioning={"depth_map": depth}, steps=2))

    nan = np.ones((64, 64), np.float32)
    nan[3, 4] = np.nan
    cases: list[tuple[Any, type[Exception], str]] = [
        (_bad(tmp_path, "nan.npy", nan), InvalidRequest, "NaN or infinite"),
        (_bad(tmp_path, "rgb.npy", np.ones((3, 64, 64), np.float32)), InvalidRequest, r"shape \(3, 64, 64\)"),
        (_bad(tmp_path, "flat.npy", np.full((64, 64), 0.5, np.float32)), InvalidRequest, "is constant"),
        (_bad(tmp_path, "obj.npy", np.array([{"a": 1}], dtype=object)), InvalidRequest, "holds object values"),
        (str(_huge(tmp_path)), TooLarge, "more than"),
        (str(tmp_path / "missing.npy"), InvalidRequest, "is not a file"),
        (str(inputs["root"] / "in.png"), InvalidRequest, r"shape \(3, 64, 64\)"),  # an RGB PNG is no depth map
        (str(tmp_path / "depth.txt"), InvalidRequest, "must be a .png or .npy file"),
        (3, InvalidRequest, "must be a .png/.npy path, an array or an image"),
        (np.zeros((64, 64), dtype=np.complex64), InvalidRequest, "complex64 values"),
    ]
    (tmp_path / "junk.npy").write_bytes(b"not an npy file")
    cases.append((str(tmp_path / "junk.npy"), InvalidRequest, "cannot read the depth map"))
    for depth, error, needle in cases:
        with pytest.raises(error, match=needle):
            check(depth)
    with pytest.raises(InvalidRequest, match=r"give conditioning\['depth_map'\]"):
        pipe.check(GenerationRequest(prompt=PROMPT, image=inputs["image"], steps=2))
    with pytest.raises(InvalidRequest, match="give the init image"):
        pipe.check(GenerationRequest(prompt=PROMPT, conditioning={"depth_map": inputs["depth"]}, steps=2))
    check(inputs["depth"])  # an array is fine
    check(torch.from_numpy(inputs["depth"])[None])  # and a (1, H, W) tensor


def _huge(root: Path) -> Path:
    """An NPY whose header declares 1e12 values (the data is never read)."""
    path = root / "huge.npy"
    header = {"descr": "<f4", "fortran_order": False, "shape": (1, 1_000_000, 1_000_000)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)  # type: ignore[no-untyped-call]
    return path


def test_cli_refuses_a_missing_depth_map_in_one_line(engines: Path, inputs: dict[str, Any], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = inputs["root"]
    code = main(["generate", str(engines), "-p", PROMPT, "--image", str(root / "in.png"), "--steps", "2",
                 "--no-progress", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code != 0 and "depth_map" in err and "Traceback" not in err and not (tmp_path / "x.png").exists()
