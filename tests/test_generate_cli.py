"""`latentrt generate` and `latentrt demo` end to end: real engines, real files, the printed timing table."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentrt.cli import main
from latentrt.runtime.images import read_png_metadata
from latentrt.runtime.pipeline import GenerationRequest, load_pipeline


def test_generate_writes_png_with_metadata(onnx_export_dir: Callable[[str], Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder = onnx_export_dir("sd1")
    out = tmp_path / "cat.png"
    code = main(["generate", str(folder), "--prompt", "a cat in a hat", "--steps", "3", "--width", "128",
                 "--height", "64", "--seed", "11", "--sampler", "euler_a", "--guidance", "6", "-o", str(out),
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file()
    image = Image.open(out)
    assert image.size == (128, 64) and image.mode == "RGB"
    meta = read_png_metadata(out)
    assert meta["prompt"] == "a cat in a hat" and meta["seed"] == "11"
    settings = json.loads(meta["latentrt"])
    assert (settings["steps"], settings["sampler"], settings["guidance"], settings["family"]) == (3, "euler_a", 6.0,
                                                                                                  "sd1")
    # the file holds exactly what the Python API makes for the same request
    api = load_pipeline(folder).generate(GenerationRequest("a cat in a hat", steps=3, width=128, height=64, seed=11,
                                                           sampler="euler_a", guidance=6.0))
    assert np.array_equal(np.asarray(image), np.asarray(api.images[0]))
    lines = printed.splitlines()
    assert f"wrote {out} (128x64, seed 11)" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("stage"))
    table = {line.split()[0]: line.split() for line in lines[header + 2:]}
    assert set(table) == {"text_encoder", "unet", "vae_decoder", "total"} and table["unet"][1] == "3"


def test_generate_several_images(onnx_export_dir: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "many.png"
    code = main(["generate", str(onnx_export_dir("sd-turbo")), "-p", "a boat", "--batch", "2", "--num-images", "2",
                 "--width", "64", "--height", "64", "--seed", "5", "-o", str(out), "--no-progress"])
    assert code == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["many-0.png", "many-1.png", "many-2.png", "many-3.png"]
    metas = [json.loads(read_png_metadata(tmp_path / f)["latentrt"]) for f in files]
    assert [m["index"] for m in metas] == [0, 1, 2, 3] and metas[0]["num_images_per_prompt"] == 2


def test_generate_img2img_and_inpaint(onnx_export_dir: Callable[[str], Path], tmp_path: Path) -> None:
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (30, 120, 200)).save(init)
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    code = main(["generate", str(onnx_export_dir("sd1-inpaint")), "-p", "a cat", "--image", str(init), "--mask",
                 str(mask), "--steps", "2", "--seed", "1", "-o", str(tmp_path / "inpaint.png"), "--no-progress"])
    assert code == 0 and Image.open(tmp_path / "inpaint.png").size == (64, 64)
    assert json.loads(read_png_metadata(tmp_path / "inpaint.png")["latentrt"])["mode"] == "inpaint"


def test_generate_errors_leave_no_file(onnx_export_dir: Callable[[str], Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.png"
    folder = str(onnx_export_dir("sd1"))
    assert main(["generate", folder, "-p", "a", "--steps", "0", "-o", str(out)]) == 2
    assert "latentrt generate: error: steps must be a whole number >= 1" in capsys.readouterr().err
    assert main(["generate", folder, "-p", "a", "--width", "100", "--height", "64", "-o", str(out)]) == 2
    assert "nearest valid: 64x64, 64x128" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "-p", "a", "-o", str(out)]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    assert main(["generate", folder, "-p", "a", "--denoising-end", "0.5", "-o", str(out)]) == 2
    assert "--denoising-end sets where the base hands over to --refiner" in capsys.readouterr().err
    assert main(["generate", folder, "-p", "a", "--device", "gpu", "-o", str(out)]) == 2
    assert "device must be cpu or cuda[:N]" in capsys.readouterr().err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_generate_with_refiner(onnx_export_dir: Callable[[str], Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "refined.png"
    code = main(["generate", str(onnx_export_dir("sdxl")), "-p", "a castle", "--refiner",
                 str(onnx_export_dir("sdxl-refiner")), "--steps", "5", "--width", "64", "--height", "64", "--seed",
                 "2", "-o", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file()
    stages = [line.split()[0] for line in printed.splitlines() if line.split() and line.split()[0].startswith(
        ("unet", "refiner_"))]
    assert stages == ["unet", "refiner_text_encoder_2", "refiner_unet", "refiner_vae_decoder"]


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "demo"
    assert main(["demo", "-o", str(work), "--family", "sd-turbo", "--size", "64", "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert (work / "demo.png").is_file() and Image.open(work / "demo.png").size == (64, 64)
    assert (work / "onnx" / "manifest.json").is_file()
    assert "[3/3] generate 64x64 on ONNX Runtime (CPU)" in printed and "stage" in printed
    engines = json.loads((work / "engines" / "manifest.json").read_text())
    assert engines["backend"] == "onnxruntime" and engines["family"] == "sd-turbo"
    # a second run reuses the export
    assert main(["demo", "-o", str(work), "--family", "sd-turbo", "--size", "64", "--steps", "1"]) == 0
    assert "[1/3] export: reusing" in capsys.readouterr().out
