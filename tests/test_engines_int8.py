"""`latentrt build --backend onnxruntime --precision int8`: tiny SD 1.x export, real ORT sessions, real files."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from latentrt.cli import main
from latentrt.engines.build import build_engines, default_calibration_size
from latentrt.engines.cli import INT8_RECIPES
from latentrt.engines.quantize import RECIPES, op_counts
from latentrt.families import get_family
from latentrt.manifest import read_manifest, sha256_tree

# Loose bound on the tiny random-weight model, 128x128 px, 2 steps: the int8 image is the fp32 image plus
# quantization noise. Measured 34 dB (static, 64x64 calibration) and 49 dB (dynamic).
MIN_PSNR_DB = 20.0
CALIBRATE = ["--calibration-size", "64x64", "--calibration-steps", "2"]


def _image(folder: Path) -> np.ndarray:
    from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

    request = GenerationRequest(prompt="a lighthouse", steps=2, width=128, height=128, seed=3)
    array = load_pipeline(folder).generate(request).array
    assert array is not None
    return np.asarray(array, dtype=np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of images in [0, 1]."""
    mse = float(np.mean((a - b) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-12))


@pytest.fixture(scope="module")
def sd1(onnx_export_dir: Callable[[str], Path]) -> Path:
    return onnx_export_dir("sd1")


@pytest.fixture(scope="module")
def fp32_image(sd1: Path, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = build_engines(sd1, tmp_path_factory.mktemp("fp32") / "engines", backend="onnxruntime")
    return _image(folder)


def _build(sd1: Path, out: Path, *extra: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["build", str(sd1), "-o", str(out), "--backend", "onnxruntime", "--precision", "int8", *extra])


def test_static_int8_build_is_calibrated_and_close_to_fp32(sd1: Path, fp32_image: np.ndarray, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "int8"
    assert _build(sd1, out, *CALIBRATE) == 0
    err = capsys.readouterr().err
    assert "unet: quantizing to int8 (static-qdq-mha, calibrating with fp32 sampling at 64x64, 2 step(s))" in err
    manifest = read_manifest(out)
    unet = manifest["components"]["unet"]
    assert manifest["precision"] == "int8" and unet["precision"] == "int8"
    assert manifest["components"]["text_encoder"]["precision"] == "fp32"
    assert unet["int8"]["recipe_name"] == "static-qdq-mha" == manifest["int8"]["recipe"]
    assert unet["int8_build"]["calibration_size"] == "64x64" and unet["int8_build"]["calibration_steps"] == 2
    assert unet["int8_build"]["calibration_feeds"] == 8  # 4 calibration prompts x 2 CFG-batched steps
    assert unet["sha256"] == sha256_tree(out / "unet")
    ops = op_counts(out / "unet" / "model.onnx")
    assert ops["QuantizeLinear"] > 0 and ops["MultiHeadAttention"] > 0
    assert not list(tmp_path.glob(".int8.*"))  # no staging folder left behind
    assert _psnr(_image(out), fp32_image) > MIN_PSNR_DB


def test_dynamic_int8_build_needs_no_calibration_and_keeps_its_unet(sd1: Path, fp32_image: np.ndarray,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "int8"
    assert _build(sd1, out, "--int8-recipe", "dynamic-matmul-pc") == 0
    manifest = read_manifest(out)
    unet = manifest["components"]["unet"]
    assert unet["precision"] == "int8" and unet["int8"]["recipe_name"] == "dynamic-matmul-pc"
    assert unet["int8_build"]["calibration_feeds"] == 0 and unet["int8_build"]["calibration_size"] is None
    assert op_counts(out / "unet" / "model.onnx").get("DynamicQuantizeLinear", 0) + \
        op_counts(out / "unet" / "model.onnx").get("DynamicQuantizeMatMul", 0) > 0
    assert _psnr(_image(out), fp32_image) > MIN_PSNR_DB
    # Rebuilding another component keeps the int8 UNet as it is.
    assert _build(sd1, out, "--int8-recipe", "dynamic-matmul-pc", "--components", "vae_decoder", "--overwrite") == 0
    again = read_manifest(out)
    assert again["components"]["unet"]["sha256"] == unet["sha256"] == sha256_tree(out / "unet")
    assert again["precision"] == "int8" and again["int8"]["recipe"] == "dynamic-matmul-pc"
    # ... and so does an fp32 rebuild of another component: the folder still says int8.
    assert main(["build", str(sd1), "-o", str(out), "--backend", "onnxruntime", "--precision", "fp32",
                 "--components", "vae_decoder", "--overwrite"]) == 0
    kept = read_manifest(out)
    assert kept["components"]["unet"]["sha256"] == unet["sha256"]
    assert kept["components"]["unet"]["precision"] == "int8" and kept["precision"] == "int8"


def test_int8_on_tensorrt_or_without_int8_is_a_clear_error(sd1: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["build", str(sd1), "-o", str(tmp_path / "e"), "--backend", "tensorrt", "--precision", "int8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert "--precision int8 is for --backend onnxruntime or openvino on the CPU" in err[0]
    code = main(["build", str(sd1), "-o", str(tmp_path / "e"), "--backend", "onnxruntime", "--device", "cuda",
                 "--precision", "int8"])
    assert code != 0 and "on the CPU" in capsys.readouterr().err
    code = main(["build", str(sd1), "-o", str(tmp_path / "e"), "--backend", "onnxruntime",
                 "--int8-recipe", "static-qdq"])
    assert code != 0 and "needs --precision int8" in capsys.readouterr().err
    code = main(["build", str(sd1), "-o", str(tmp_path / "e"), "--backend", "onnxruntime", "--precision", "int8",
                 "--calibration-size", "64x64,128x128"])
    assert code != 0 and "one HxW size" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_cli_recipes_match_the_quantizer_and_default_calibration_size() -> None:
    assert INT8_RECIPES == tuple(RECIPES)
    assert default_calibration_size(get_family("sd1")) == (256, 256)
    assert max(default_calibration_size(get_family("sdxl"))) == 256
