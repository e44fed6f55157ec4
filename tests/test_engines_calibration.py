"""Recorded int8 calibration feeds at the edges: untrusted feed files and builds that would not use them.

Real files (numpy archives, text) and the real `latentrt build` CLI over a hand-built export
(tests/test_engines_fakes.py); no tolerances (nothing numeric is compared).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_engines_fakes import make_fake_export

from latentrt.cli import main
from latentrt.engines.build import Calibration, read_onnx_export
from latentrt.errors import BuildError
from latentrt.tensors import dummy_inputs

NOT_FEEDS = "is not a calibration feed file (an .npz of arrays written by `latentrt build`)"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_export("sd1", tmp_path_factory.mktemp("onnx") / "sd1", ("text_encoder", "unet"))


@pytest.fixture(scope="module")
def feeds(sd1: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    io = read_onnx_export(sd1).ios["unet"]
    return Calibration((dummy_inputs(io, {}, seed=0),), (64, 64), 2).save(tmp_path_factory.mktemp("f") / "feeds.npz")


def _bad_files(folder: Path) -> list[Path]:
    objects: dict[str, Any] = {"0/sample": np.array([{"x": 1}], dtype=object)}
    np.savez(folder / "objects.npz", **objects)  # would need pickles to read
    (folder / "text.npz").write_text("a text file, not an archive\n")
    np.save(folder / "array.npy", np.zeros(3, np.float32))  # one array, not an archive
    (folder / "empty.npz").write_bytes(b"")
    (folder / "zip.npz").write_bytes(b"PK\x03\x04 a broken archive")
    return [folder / n for n in ("objects.npz", "text.npz", "array.npy", "empty.npz", "zip.npz")]


def test_a_file_that_is_not_a_feed_file_gets_one_fixed_message(tmp_path: Path) -> None:
    for bad in _bad_files(tmp_path):
        with pytest.raises(BuildError) as caught:
            Calibration.load(bad)
        text = str(caught.value)
        assert text == f"{bad} {NOT_FEEDS}"
        assert "pickle" not in text.lower()  # numpy's text invites loading untrusted input unsafely
    with pytest.raises(BuildError, match="does not exist"):
        Calibration.load(tmp_path / "missing.npz")


def test_decoder_feeds_round_trip_next_to_the_unet_feeds(tmp_path: Path) -> None:
    unet = ({"sample": np.ones((2, 4, 8, 8), np.float32), "timestep": np.array([999.0], np.float32)},
            {"sample": np.zeros((2, 4, 8, 8), np.float32), "timestep": np.array([1.0], np.float32)})
    decoder = ({"latent": np.full((1, 4, 8, 8), 0.5, np.float32)},)
    got = Calibration.load(Calibration(unet, (64, 64), 2, 1.5, decoder, 1.0).save(tmp_path / "feeds.npz"))
    assert (got.size, got.steps, got.seconds, got.guidance) == ((64, 64), 2, 1.5, 1.0)
    assert len(got.feeds) == 2 and len(got.decoder_feeds) == 1
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(got.feeds, unet) for k in a)
    assert np.array_equal(got.decoder_feeds[0]["latent"], decoder[0]["latent"])
    assert Calibration.load(Calibration(unet).save(tmp_path / "unet-only.npz")).decoder_feeds == ()
    assert Calibration.load(tmp_path / "unet-only.npz").guidance is None  # the family's default scale
    for guidance in ('"4"', "true", "NaN"):  # meta written by something else: a number or null only
        arrays: dict[str, Any] = {"0/sample": np.zeros(2, np.float32),
                                  "meta": np.array(f'{{"steps": 2, "guidance": {guidance}}}')}
        np.savez(tmp_path / "g.npz", **arrays)
        with pytest.raises(BuildError, match="malformed"):
            Calibration.load(tmp_path / "g.npz")
    bad = {"unet/0/sample": np.zeros(2, np.float32)}  # only the decoder may prefix its feeds
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(BuildError, match="unexpected entry"):
        Calibration.load(tmp_path / "bad.npz")


def test_the_cli_refuses_a_bad_feed_file_in_one_line(sd1: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    bad = _bad_files(tmp_path)[0]
    code = main(["build", str(sd1), "-o", str(tmp_path / "e"), "--backend", "onnxruntime", "--precision", "int8",
                 "--int8-recipe", "static-qdq", "--calibration-feeds", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [f"latentrt build: error: {bad} {NOT_FEEDS}"]
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("options", [[], ["--backend", "onnxruntime", "--precision", "fp32"],
                                     ["--backend", "onnxruntime", "--precision", "int8", "--int8-recipe", "dynamic-matmul"]])
def test_feeds_a_build_would_not_use_are_refused(sd1: Path, feeds: Path, tmp_path: Path, options: list[str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["build", str(sd1), "-o", str(tmp_path / "e"), *options, "--calibration-feeds", str(feeds)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("latentrt build: error: --calibration-feeds needs --precision int8 with a static "
                               "recipe")
    assert not (tmp_path / "e").exists()
