"""`latentrt build --backend openvino` and the OpenVINO runtime backend: tiny SD 1.x export, real OpenVINO
compiled models, real files (skipped without openvino).

Tolerances (final images in [0, 1], 64x64 px, 2 steps, seed 3):
- fp32 OpenVINO vs ONNX Runtime fp32 engines and vs the diffusers pipeline: max |diff| <= 1e-3, the ONNX
  Runtime bound of test_pipeline (measured 4e-6 vs ONNX Runtime).
- bf16 vs fp32 OpenVINO: PSNR >= 35 dB (measured 46 dB). bf16 keeps 8 mantissa bits; the tiny random-weight
  model has no trained scale structure, so its error is coarser than a real model's: the bound catches a
  broken bf16 path (garbage is < 15 dB), not the last dB.
- int8 (NNCF UNet) vs fp32: PSNR >= 20 dB, the ONNX Runtime int8 test's bound (measured 37 dB with 64x64, 2-step
  calibration): a tiny random UNet calibrated on 8 feeds is the worst case for int8.
- Each engine's own check against its ONNX graph at build time: `engines.openvino.TOLERANCE`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("openvino")

from latentrt.cli import main  # noqa: E402
from latentrt.engines.build import build_engines  # noqa: E402
from latentrt.errors import BuildError, MissingComponent, StaleArtifact  # noqa: E402
from latentrt.manifest import read_manifest  # noqa: E402

IMAGE_TOL = 1e-3
BF16_MIN_PSNR_DB = 35.0
INT8_MIN_PSNR_DB = 20.0
REQUEST = dict(prompt="a lighthouse", steps=2, width=64, height=64, seed=3)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def _image(folder: Path, **overrides: object) -> np.ndarray:
    from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

    pipe = load_pipeline(folder)
    array = pipe.generate(GenerationRequest(**{**REQUEST, **overrides})).array  # type: ignore[arg-type]
    pipe.close()
    assert array is not None
    return np.asarray(array, dtype=np.float64)


def _build(sd1: Path, out: Path, *extra: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["build", str(sd1), "-o", str(out), "--backend", "openvino", *extra])


@pytest.fixture(scope="module")
def sd1(onnx_export_dir: Callable[[str], Path]) -> Path:
    return onnx_export_dir("sd1")


@pytest.fixture(scope="module")
def ov_fp32(sd1: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ov") / "fp32"
    assert _build(sd1, out) == 0
    return out


@pytest.fixture(scope="module")
def fp32_image(ov_fp32: Path) -> np.ndarray:
    return _image(ov_fp32)


def test_fp32_matches_onnxruntime_and_diffusers(sd1: Path, ov_fp32: Path, fp32_image: np.ndarray,
                                                tiny_checkpoint: Callable[[str], Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    png = tmp_path / "ov.png"
    assert main(["generate", str(ov_fp32), "-p", "a lighthouse", "--steps", "2", "--width", "64", "--height", "64",
                 "--seed", "3", "-o", str(png), "--no-progress"]) == 0  # backend read from the manifest
    assert png.is_file() and "openvino" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ort = build_engines(sd1, tmp_path / "ort", backend="onnxruntime")
    assert float(np.abs(fp32_image - _image(ort)).max()) <= IMAGE_TOL
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_checkpoint("sd1")))
    pipe.set_progress_bar_config(disable=True)
    out: Any = pipe(prompt="a lighthouse", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator("cpu").manual_seed(3), output_type="np")
    ref = out.images
    assert float(np.abs(fp32_image - np.asarray(ref, dtype=np.float64)).max()) <= IMAGE_TOL


def test_manifest_records_precision_and_checks(ov_fp32: Path) -> None:
    m = read_manifest(ov_fp32)
    assert m["backend"] == "openvino" and m["precision"] == "fp32"
    for c, entry in m["components"].items():
        assert entry["path"] == f"{c}/model.xml" and (ov_fp32 / c / "model.bin").is_file()
        ov = entry["openvino"]
        assert ov["inference_precision"] == "f32" and ov["performance_hint"] == "LATENCY"
        assert ov["check"]["ran"] and max(ov["check"]["max_abs_diff"].values()) <= 1e-3


def test_bf16_and_int8_images_are_bounded(sd1: Path, ov_fp32: Path, fp32_image: np.ndarray, tmp_path: Path) -> None:
    assert _build(sd1, tmp_path / "bf16", "--precision", "bf16") == 0
    bf16 = read_manifest(tmp_path / "bf16")
    assert bf16["precision"] == "bf16"
    assert {e["openvino"]["inference_precision"] for e in bf16["components"].values()} == {"bf16"}
    assert _psnr(_image(tmp_path / "bf16"), fp32_image) >= BF16_MIN_PSNR_DB
    # the fp32 and bf16 engines of one export differ in their cache keys (the IR files are the same fp32 IR)
    fp32 = read_manifest(ov_fp32)
    assert all(fp32["components"][c]["cache_key"] != e["cache_key"] for c, e in bf16["components"].items())

    # int8 over a copy of the fp32 folder: the text encoder and VAE encoder are kept (fewer builds on 2 cores)
    shutil.copytree(ov_fp32, tmp_path / "int8")
    assert _build(sd1, tmp_path / "int8", "--precision", "int8", "--calibration-size", "64x64",
                  "--calibration-steps", "1", "--components", "unet,vae_decoder",
                  "--component-precision", "vae_decoder=bf16") == 0
    int8 = read_manifest(tmp_path / "int8")
    precisions = {c: e["precision"] for c, e in int8["components"].items()}
    assert precisions == {"text_encoder": "fp32", "unet": "int8", "vae_encoder": "fp32", "vae_decoder": "bf16"}
    assert int8["components"]["unet"]["int8_build"]["calibration_feeds"] > 0
    assert _psnr(_image(tmp_path / "int8"), fp32_image) >= INT8_MIN_PSNR_DB

    # a foreign IR (the int8 UNet) in the fp32 folder is stale (its hash); absent files are missing components
    from latentrt.runtime.engine_set import load_engines

    broken = tmp_path / "broken"
    shutil.copytree(ov_fp32, broken)
    shutil.copy2(tmp_path / "int8" / "unet" / "model.xml", broken / "unet" / "model.xml")
    with pytest.raises(StaleArtifact, match="unet.*does not match the hash"):
        load_engines(broken)
    with pytest.raises(StaleArtifact, match="not a readable OpenVINO model"):
        load_engines(broken, verify=False)  # the int8 IR does not fit the fp32 weights file
    shutil.copy2(ov_fp32 / "unet" / "model.xml", broken / "unet" / "model.xml")
    (broken / "unet" / "model.bin").unlink()
    with pytest.raises(StaleArtifact, match="does not match the hash"):
        load_engines(broken)
    with pytest.raises(MissingComponent, match="model.bin are missing"):
        load_engines(broken, verify=False)
    (broken / "unet" / "model.xml").unlink()
    with pytest.raises(MissingComponent, match="model.xml is missing"):
        load_engines(broken)


def test_static_shapes_are_keyed_and_chosen_at_run_time(sd1: Path, ov_fp32: Path, fp32_image: np.ndarray,
                                                        tmp_path: Path) -> None:
    from latentrt.runtime.pipeline import load_pipeline

    shutil.copytree(ov_fp32, tmp_path / "static")  # only the UNet is rebuilt (fewer builds on 2 cores)
    assert _build(sd1, tmp_path / "static", "--static", "--sizes", "64x64", "--threads", "1", "--components",
                  "unet") == 0
    m = read_manifest(tmp_path / "static")
    unet = m["components"]["unet"]
    assert unet["profiles"][0]["static"] == [{"latent_height": 8, "latent_width": 8}]
    assert unet["openvino"]["threads"] == 1 and m["plan"]["static_sizes"] == ["64x64"]
    assert unet["cache_key"] != read_manifest(ov_fp32)["components"]["unet"]["cache_key"]
    assert float(np.abs(_image(tmp_path / "static") - fp32_image).max()) <= IMAGE_TOL  # static 64x64
    wide = _image(tmp_path / "static", width=128)  # not a planned size: the dynamic IR runs
    assert float(np.abs(wide - _image(ov_fp32, width=128)).max()) <= IMAGE_TOL
    pipe = load_pipeline(tmp_path / "static")
    assert "static at 1 latent size" in pipe.engines["unet"].describe()
    engines: Any = pipe.engines.engines
    assert engines["unet"].model is not None  # kept: static sizes are compiled from reshaped copies of it
    assert engines["vae_decoder"].model is None  # dynamic only: the source model is freed once compiled
    pipe.close()


def test_openvino_only_settings_are_refused_elsewhere(sd1: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(BuildError, match="bf16 is an OpenVINO precision"):
        build_engines(sd1, tmp_path / "x", backend="onnxruntime", precision="bf16")
    with pytest.raises(BuildError, match="OpenVINO settings"):
        build_engines(sd1, tmp_path / "x", backend="onnxruntime", static_shapes=True)
    assert _build(sd1, tmp_path / "y", "--precision", "int8", "--int8-recipe", "dynamic-matmul") == 2
    assert "ONNX Runtime recipe" in capsys.readouterr().err
    assert _build(sd1, tmp_path / "y", "--component-precision", "text_encoder=int8") == 2
    assert "int8 is for the UNet and the VAE decoder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_int8_builds_run_the_other_components_in_bf16_where_the_cpu_has_it() -> None:
    from latentrt.choices import Precision
    from latentrt.engines.build_openvino import ov_component_precision

    def chosen(component: str, native: bool, **overrides: str) -> Precision:
        return ov_component_precision(component, Precision.INT8, overrides, native_bf16=native).precision

    assert chosen("unet", True) == chosen("unet", False) == Precision.INT8
    assert chosen("text_encoder", True) == chosen("vae_decoder", True) == Precision.BF16
    assert chosen("text_encoder", False) == chosen("vae_decoder", False) == Precision.FP32
    assert chosen("vae_decoder", True, vae_decoder="fp32") == Precision.FP32  # an override wins
    assert ov_component_precision("vae_decoder", Precision.FP32, native_bf16=True).precision == Precision.FP32
    assert chosen("vae_decoder", True, vae_decoder="int8") == Precision.INT8  # asked for by name
    with pytest.raises(BuildError, match="int8 is for the UNet and the VAE decoder"):
        chosen("text_encoder", True, text_encoder="int8")
    with pytest.raises(BuildError, match="needs --precision int8"):
        ov_component_precision("vae_decoder", Precision.BF16, {"vae_decoder": "int8"})


def test_an_int8_vae_decoder_calibrates_on_the_latents_the_runs_decode(sd1: Path, ov_fp32: Path,
                                                                         fp32_image: np.ndarray, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(ov_fp32, tmp_path / "int8")  # text encoder and VAE encoder kept (fewer builds on 2 cores)
    assert _build(sd1, tmp_path / "int8", "--precision", "int8", "--calibration-size", "64x64",
                  "--calibration-steps", "1", "--components", "unet,vae_decoder",
                  "--component-precision", "vae_decoder=int8") == 0
    manifest = read_manifest(tmp_path / "int8")
    decoder = manifest["components"]["vae_decoder"]
    assert decoder["precision"] == "int8" and decoder["openvino"]["ir_weights"] == "int8 (NNCF)"
    from latentrt.engines.openvino import cpu_native_bf16

    # the ops int8 leaves in float run in bf16 where the CPU has it natively (OpenVINO's inference precision hint)
    native = "bf16" if cpu_native_bf16() else "f32"
    assert {manifest["components"][c]["openvino"]["inference_precision"] for c in ("unet", "vae_decoder")} == {native}
    # 4 calibration prompts x 1 step: 4 UNet calls and 4 decoded latents
    assert decoder["int8_build"]["calibration_feeds"] == manifest["components"]["unet"]["int8_build"][
        "calibration_feeds"] == 4
    assert _psnr(_image(tmp_path / "int8"), fp32_image) >= INT8_MIN_PSNR_DB
    # int8 values are judged on a recorded feed (what it was quantized for); random inputs only have to run
    check = decoder["openvino"]["check"]
    assert check["judged_on"] == "on a recorded calibration feed" and check["calibration_feed"]["images"]["psnr_db"] > 20
    # asked for without the int8 build's calibration runs: refused before anything is built
    assert _build(sd1, tmp_path / "bf16", "--precision", "bf16", "--component-precision", "vae_decoder=int8") == 2
    assert "needs --precision int8" in capsys.readouterr().err and not (tmp_path / "bf16").exists()


def test_rebuild_reuses_unchanged_openvino_engines(sd1: Path, ov_fp32: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "again"
    shutil.copytree(ov_fp32, out)
    assert _build(sd1, out) == 0
    assert capsys.readouterr().err.count("unchanged, reused") == 4
    assert json.loads((out / "manifest.json").read_text())["components"] == read_manifest(ov_fp32)["components"]


def test_bench_labels_name_backend_and_precision() -> None:
    from latentrt.runtime.bench.cases import BACKENDS, fp32_label, label_for, runtime_backend
    from latentrt.runtime.bench.stats import image_baseline

    assert {"openvino", "openvino-bf16", "openvino-int8", "openvino-naive", "onnxruntime-int8"} <= set(BACKENDS)
    assert [runtime_backend(x) for x in ("onnxruntime-int8", "openvino-bf16", "tensorrt")] == \
        ["onnxruntime", "openvino", "tensorrt"]
    assert label_for("openvino", "bf16") == "openvino-bf16" and label_for("tensorrt", "fp16") == "tensorrt"
    assert fp32_label("openvino-int8") == "openvino" and fp32_label("onnxruntime") is None
    assert image_baseline(["openvino-bf16", "onnxruntime", "reference"]) == "reference"
    assert image_baseline(["openvino-bf16", "openvino"]) == "openvino"


def test_bench_reports_every_backend_against_the_fp32_baseline(ov_fp32: Path, tmp_path: Path) -> None:
    from latentrt.workflows.bench import run_bench

    with warnings.catch_warnings():  # the engine folder runs as `openvino`; the rest comes from its checkpoint
        warnings.simplefilter("ignore")
        record = run_bench(ov_fp32, backends=("openvino", "onnxruntime", "openvino-naive"), steps=1,
                           sizes=[(64, 64)], warmup=0, runs=1, out_dir=tmp_path / "bench", flops=False, plots=False)
    case = record.cases[0]
    assert record.settings["backends"] == ["openvino", "onnxruntime", "openvino-naive"]
    assert case["image_baseline"] == "openvino"  # no diffusers reference: the first fp32 backend
    assert set(case["image_vs_reference"]) == {"onnxruntime", "openvino-naive"}
    assert case["image_vs_reference"]["onnxruntime"]["max_abs_diff"] <= IMAGE_TOL  # fp32 on both
    assert case["vs_fp32"]["openvino-naive"]["fp32"] == "openvino"  # bf16 naive vs our fp32 OpenVINO
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert "image vs openvino (fp32)" in md and "openvino-naive vs openvino (fp32)" in md
    assert "bf16" in " ".join(record.backends["openvino-naive"]["describe"])
