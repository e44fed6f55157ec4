"""The torch backend runs a single original-layout `.safetensors` file, loaded as `latentrt export` loads it.

The file is made from the tiny sd1 diffusers folder (tests/_original_layout.py) with a config-only copy
of that folder as `--config`; its twin is the diffusers folder itself on the same backend. The
conversion carries every weight over unchanged (tests/test_single_file.py), so the two must give the
same image. Tolerance: images and latents within 1e-6 (asserted; the PNG from the CLI is pixel-equal).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from _original_layout import config_only_copy, save_original_layout
from PIL import Image

from latentrt.cli import main
from latentrt.errors import InvalidRequest
from latentrt.runtime.engine_set import load_engines
from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

TOL = 1e-6


@pytest.fixture(scope="module")
def sd1_file(tiny_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(original-layout sd1 file, config-only copy of its diffusers folder)."""
    root = tmp_path_factory.mktemp("torch-single-file")
    folder = tiny_checkpoint("sd1")
    return save_original_layout(folder, root / "sd1.safetensors"), config_only_copy(folder, root / "sd1-config")


def request() -> GenerationRequest:
    return GenerationRequest(prompt="a red fox", steps=3, guidance=7.5, sampler="euler", width=64, height=64, seed=7)


def test_single_file_generates_what_its_folder_twin_does(sd1_file: tuple[Path, Path],
                                                         tiny_checkpoint: Callable[[str], Path]) -> None:
    file, config = sd1_file
    got = load_pipeline(file, backend="torch", config=config).generate(request())
    want = load_pipeline(tiny_checkpoint("sd1"), backend="torch").generate(request())
    assert got.settings["backend"] == "torch" and got.settings["family"] == want.settings["family"]
    assert got.array is not None and want.array is not None
    assert np.abs(got.array - want.array).max() <= TOL
    assert (got.latents - want.latents).abs().max().item() <= TOL


def test_cli_generate_runs_a_single_file_on_torch(sd1_file: tuple[Path, Path], tiny_checkpoint: Callable[[str], Path],
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file, config = sd1_file
    out = tmp_path / "fox.png"
    args = ["-p", "a red fox", "--steps", "3", "--guidance", "7.5", "--sampler", "euler", "--width", "64",
            "--height", "64", "--seed", "7", "--backend", "torch", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["generate", str(file), "--config", str(config), "-o", str(out), *args])
    assert code == 0, capsys.readouterr().err
    want = load_pipeline(tiny_checkpoint("sd1"), backend="torch").generate(request()).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want))


def test_a_single_file_is_refused_on_other_backends(sd1_file: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    file, config = sd1_file
    with pytest.raises(InvalidRequest, match="is a checkpoint; export it"):
        load_engines(file, backend="onnxruntime", config=config)
    code = main(["generate", str(file), "--config", str(config), "-p", "x", "--backend", "onnxruntime",
                 "-o", str(tmp_path / "unused.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "latentrt export" in err[0]
