"""One builder per backend behind one interface; int8 calibration handed over as recorded feeds.

Hand-built exports (tests/test_engines_fakes.py), real ONNX Runtime sessions, real files. Tolerances:
engine verification passes when max |engine - source| <= 1e-3 * max(1, max |source|) (fp32;
`engines.onnxruntime.TOLERANCE`); a graph with other weights fails it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_engines_fakes import make_fake_export, make_model

from latentrt.cache_keys import key_fields
from latentrt.choices import BuildBackend, Device, Precision, values
from latentrt.cli import build_parser, main
from latentrt.engines.build import (
    BUILDERS,
    BuildOptions,
    Calibration,
    build_engines,
    builder_for,
    component_precision,
    default_precision,
    int8_needs_calibration,
    int8_options,
    read_onnx_export,
)
from latentrt.engines.onnxruntime import verify_engine
from latentrt.engines.quantize import RECIPES
from latentrt.errors import BuildError
from latentrt.families import get_family
from latentrt.manifest import read_manifest, sha256_tree
from latentrt.tensors import dummy_inputs


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_export("sd1", tmp_path_factory.mktemp("onnx") / "sd1")


def _feeds(sd1: Path, n: int = 3) -> list[dict[str, np.ndarray]]:
    """UNet feeds at the export's smallest sizes (stand-ins for ones recorded by fp32 sampling)."""
    io = read_onnx_export(sd1).ios["unet"]
    return [dummy_inputs(io, {}, seed=i) for i in range(n)]


def test_one_builder_per_backend_with_the_former_defaults() -> None:
    assert set(BUILDERS) == set(BuildBackend)
    for backend in BuildBackend:
        builder = builder_for(BuildOptions(backend, Precision.FP32))
        assert builder.backend is backend and builder.options.backend is backend
    assert BUILDERS[BuildBackend.ONNXRUNTIME].engine_file == "model.onnx"
    assert BUILDERS[BuildBackend.TENSORRT].engine_file == "engine.plan"
    assert default_precision("tensorrt", "cpu") == default_precision("onnxruntime", "cuda") == Precision.FP16
    assert default_precision("onnxruntime", "cpu") == "fp32"


def test_builder_cache_key_is_the_former_key(sd1: Path) -> None:
    export = read_onnx_export(sd1)
    builder = builder_for(BuildOptions(BuildBackend.ONNXRUNTIME, Precision.FP32, threads=2))
    prec = component_precision(export.spec, "unet", Precision.FP32)
    io, profiles = builder.engine_io(None, "unet", export.ios["unet"])  # type: ignore[arg-type]  # ORT: no plan
    sha = export.manifest["components"]["unet"]["sha256"]
    fields = builder.cache_key(sha, prec, profiles, None)
    flags = fields["builder_flags"]
    assert flags["backend"] == "onnxruntime" and flags["device"] == "cpu" and flags["threads"] == 2
    assert fields == key_fields(sha, "fp32", profiles, flags, None, None)
    assert builder.machine_fields(None) == {} and builder.plan_info(None) is None  # type: ignore[arg-type]
    trt = builder_for(BuildOptions(BuildBackend.TENSORRT, Precision.FP16))
    assert set(trt.machine_fields({"compute_capability": "9.0"})) == {"trt_version", "compute_capability"}


def test_ort_builder_writes_and_verifies_one_engine(sd1: Path, tmp_path: Path) -> None:
    export = read_onnx_export(sd1)
    builder = builder_for(BuildOptions(BuildBackend.ONNXRUNTIME, Precision.FP32))
    prec = component_precision(export.spec, "vae_decoder", Precision.FP32)
    details = builder.build(export.model_path("vae_decoder"), export.ios["vae_decoder"], [], tmp_path, prec)
    assert (tmp_path / builder.engine_file).is_file() and details["build_s"] >= 0
    check = details["ort"]["check"]
    assert check["ran"] is True and 0 <= check["max_abs_diff"]["images"] < 5e-4


def test_verification_fails_an_engine_that_differs_from_its_source(sd1: Path, tmp_path: Path) -> None:
    import onnx

    export = read_onnx_export(sd1)
    io = export.ios["vae_decoder"]
    onnx.save_model(make_model(io, seed=99), str(tmp_path / "other.onnx"))  # same IO, other weights
    with pytest.raises(BuildError, match=r"vae_decoder: prepared engine output 'images' differs .*\(tolerance"):
        verify_engine(export.model_path("vae_decoder"), tmp_path / "other.onnx", io, device="cpu", precision="fp32",
                      intra_op_threads=None)


def test_calibration_file_round_trip_and_untrusted_files(sd1: Path, tmp_path: Path) -> None:
    feeds = _feeds(sd1)
    path = Calibration(tuple(feeds), (64, 64), 2, 1.5).save(tmp_path / "feeds.npz")
    assert not [p for p in tmp_path.iterdir() if p.name != "feeds.npz"]  # written atomically, nothing beside
    back = Calibration.load(path)
    assert (back.size, back.steps, back.seconds, len(back.feeds)) == ((64, 64), 2, 1.5, 3)
    for a, b in zip(back.feeds, feeds):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    objects: dict[str, Any] = {"0/sample": np.array([{"x": 1}], dtype=object)}
    names: dict[str, Any] = {"../sample": np.zeros(2, np.float32)}
    np.savez(tmp_path / "objects.npz", **objects)
    np.savez(tmp_path / "names.npz", **names)
    (tmp_path / "text.npz").write_text("not a zip")
    for bad in ("objects.npz", "names.npz", "text.npz"):
        with pytest.raises(BuildError):
            Calibration.load(tmp_path / bad)


def test_static_int8_stage_takes_recorded_feeds_and_refuses_without(sd1: Path, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="needs recorded calibration feeds"):
        build_engines(sd1, tmp_path / "none", backend="onnxruntime", precision="int8", int8_recipe="static-qdq")
    assert not (tmp_path / "none").exists()
    path = Calibration(tuple(_feeds(sd1)), (64, 64), 2, 0.25).save(tmp_path / "feeds.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = build_engines(sd1, tmp_path / "int8", backend="onnxruntime", precision="int8",
                            int8_recipe="static-qdq", calibration=path)
    unet = read_manifest(out)["components"]["unet"]
    assert unet["precision"] == "int8" and unet["sha256"] == sha256_tree(out / "unet")
    assert unet["int8_build"] == {"recipe": "static-qdq", "calibration_size": "64x64", "calibration_steps": 2,
                                  "calibration_guidance": None, "calibration_s": 0.25, "calibration_feeds": 3}
    assert unet["int8"]["recipe_name"] == "static-qdq" and unet["int8"]["calibration_feeds"] == 3  # quantize_static
    # The kept int8 UNet needs no new feeds; other calibration settings do.
    same = int8_options(get_family("sd1"), "onnxruntime", "cpu", "static-qdq", (64, 64), 2)
    other = int8_options(get_family("sd1"), "onnxruntime", "cpu", "static-qdq", (64, 64), 3)
    dynamic = int8_options(get_family("sd1"), "onnxruntime", "cpu", "dynamic-matmul", None, 4)
    unguided = int8_options(get_family("sd1"), "onnxruntime", "cpu", "static-qdq", (64, 64), 2,
                            calibration_guidance=1.0)
    assert unguided.calibration_guidance == 1.0 and unguided.as_json()["calibration_guidance"] == 1.0
    assert not int8_needs_calibration(sd1, out, same, components=["vae_decoder"])
    assert int8_needs_calibration(sd1, out, other, components=["vae_decoder"])
    assert int8_needs_calibration(sd1, out, unguided, components=["vae_decoder"])  # other guidance: new feeds
    for bad in (-1.0, float("nan")):
        with pytest.raises(BuildError, match="not a scale"):
            int8_options(get_family("sd1"), "onnxruntime", "cpu", "static-qdq", (64, 64), 2, calibration_guidance=bad)
    assert int8_needs_calibration(sd1, out, same, components=["unet"])
    assert not int8_needs_calibration(sd1, out, dynamic)


def test_build_cli_takes_a_feed_file_and_lists_the_enums(sd1: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = Calibration(tuple(_feeds(sd1, 2)), (64, 64), 2).save(tmp_path / "feeds.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["build", str(sd1), "-o", str(tmp_path / "e"), "--backend", "onnxruntime", "--precision", "int8",
                     "--int8-recipe", "static-qdq", "--calibration-feeds", str(path)])
    assert code == 0, capsys.readouterr().err
    assert "recording" not in capsys.readouterr().err  # recorded feeds given: no sampling runs
    assert read_manifest(tmp_path / "e")["components"]["unet"]["int8_build"]["calibration_feeds"] == 2
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    build = sub.choices["build"]  # type: ignore[index]
    choices = {a.dest: tuple(a.choices) for a in build._actions if a.choices}
    assert choices["backend"] == values(BuildBackend) and choices["device"] == values(Device)
    assert choices["precision"] == values(Precision) and choices["int8_recipe"] == tuple(RECIPES)


def test_the_engines_stage_imports_no_runtime_export_or_workflow() -> None:
    code = ("import sys, json; import latentrt.engines.build, latentrt.engines.cli, latentrt.engines.quantize; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('latentrt.'))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                       cwd=Path(__file__).parent).stdout)
    stages = ("latentrt.runtime", "latentrt.export", "latentrt.reference", "latentrt.workflows")
    assert not [m for m in loaded if m.startswith(stages)], loaded
