"""Issue 10, loose ends: the API's opset check, int8 engine folders under the output rules, bench reading
only the folders it is given, no empty folders after a failure, closed pipes, old-version staging folders.

Real files, real processes and real ONNX Runtime sessions throughout; what is asserted is what a
careful user expects (a clear refusal, nothing half-written, nothing the user had removed or changed,
no folder the user did not have). No numeric tolerances are involved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_engines_fakes import make_fake_export

from latentrt.cli import EXIT_PIPE, main
from latentrt.engines.build import build_engines
from latentrt.engines.quantize import quantize_engine_dir
from latentrt.errors import (
    BuildError,
    CheckpointError,
    InvalidRequest,
    OutputConflict,
    StaleArtifact,
    UnsafePath,
)
from latentrt.manifest import LEGACY_STAGING_AGE_S, MANIFEST, read_manifest, sha256_tree
from latentrt.outputs import output_lock

RECIPE = "dynamic-matmul-pc"  # no calibration runs: the quickest real int8 UNet


def quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = quiet(main, argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def fp32_engines(onnx_export_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quiet(build_engines, onnx_export_dir("sd1"), tmp_path_factory.mktemp("fp32") / "engines",
                 backend="onnxruntime")


# ---------------------------------------------------------------------------- 1. the API checks the opset first


@pytest.mark.parametrize("opset", [5, 99, "17", True])
def test_export_model_refuses_a_bad_opset_before_any_work(opset: Any, tmp_path: Path) -> None:
    from latentrt.export.onnx import export_model

    with pytest.raises(InvalidRequest, match="opset"):  # checked before the (missing) checkpoint is looked at
        export_model(str(tmp_path / "no-such-checkpoint"), tmp_path / "new" / "onnx", opset=opset)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_model_with_dynamo_raises_a_low_opset_like_the_cli(tmp_path: Path) -> None:
    from latentrt.export.onnx import export_model

    with pytest.raises(CheckpointError):  # opset 14 is raised to 18 for dynamo: the checkpoint is the problem
        export_model(str(tmp_path / "no-such-checkpoint"), tmp_path / "onnx", opset=14, dynamo=True)


# ---------------------------------------------------------------------------- 2. int8 folders follow the output rules


@pytest.mark.parametrize("foreign", ["notes.txt", "unet/extra.bin"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_quantize_never_replaces_a_folder_holding_foreign_files(fp32_engines: Path, tmp_path: Path, foreign: str,
                                                                overwrite: bool) -> None:
    out = tmp_path / "int8"
    if foreign.startswith("unet/"):
        quantize_engine_dir(fp32_engines, out, recipe=RECIPE)  # a folder LatentRT wrote, then a file added
    path = out / foreign
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("mine")
    before = sha256_tree(out)
    with pytest.raises(OutputConflict, match="not written by LatentRT|LatentRT did not write"):
        quantize_engine_dir(fp32_engines, out, recipe=RECIPE, overwrite=overwrite)
    assert sha256_tree(out) == before and path.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]  # no staging, no lock left


def test_quantize_replaces_its_own_folder_and_another_model_only_with_overwrite(fp32_engines: Path,
                                                                                tmp_path: Path) -> None:
    out = quantize_engine_dir(fp32_engines, tmp_path / "int8", recipe=RECIPE)
    manifest = read_manifest(out)
    assert sorted(manifest["written"]) == sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                                                 if p.is_file() and p.name != MANIFEST)
    quantize_engine_dir(fp32_engines, out, recipe=RECIPE)  # the same model's int8 folder: replaced
    edit_manifest(out, lambda m: m["source"].update(model="someone/else"))
    with pytest.raises(OutputConflict, match="another model"):
        quantize_engine_dir(fp32_engines, out, recipe=RECIPE)
    quantize_engine_dir(fp32_engines, out, recipe=RECIPE, overwrite=True)
    assert read_manifest(out)["source"]["model"] == manifest["source"]["model"]


def test_quantize_is_refused_while_another_run_writes_the_folder(fp32_engines: Path, tmp_path: Path) -> None:
    for out in (tmp_path / "int8", tmp_path / "nested" / "int8"):
        with output_lock(out), pytest.raises(OutputConflict, match="another LatentRT run"):
            quantize_engine_dir(fp32_engines, out, recipe=RECIPE)
        assert not out.exists()


@pytest.mark.parametrize("craft", ["another model", "unet outside"])
def test_quantize_refuses_an_export_path_from_a_crafted_engine_manifest(fp32_engines: Path, tmp_path: Path,
                                                                        craft: str) -> None:
    import shutil

    engines = Path(shutil.copytree(fp32_engines, tmp_path / "engines"))
    export = Path(shutil.copytree(read_manifest(fp32_engines)["source"]["onnx_dir"], tmp_path / "export"))
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "model.onnx").write_bytes(b"not yours")
    if craft == "another model":
        edit_manifest(export, lambda m: m["source"].update(model="someone/else"))
    else:
        shutil.rmtree(export / "unet")
        (export / "unet").symlink_to(secret, target_is_directory=True)
    edit_manifest(engines, lambda m: m["source"].update(onnx_dir=str(export)))
    with pytest.raises((BuildError, UnsafePath)):
        quantize_engine_dir(engines, tmp_path / "int8", recipe=RECIPE)
    assert not (tmp_path / "int8").exists() and (secret / "model.onnx").read_bytes() == b"not yours"


# ---------------------------------------------------------------------------- 3. bench reads only what it is given


@pytest.mark.parametrize("onnx_dir", ["export", "/"])
def test_bench_does_not_follow_the_export_path_of_an_engine_manifest(fp32_engines: Path, tmp_path: Path,
                                                                     onnx_dir: str) -> None:
    import shutil

    from latentrt.runtime.bench import read_targets

    engines = Path(shutil.copytree(fp32_engines, tmp_path / "engines"))
    target = str(read_manifest(fp32_engines)["source"]["onnx_dir"]) if onnx_dir == "export" else onnx_dir
    edit_manifest(engines, lambda m: m["source"].update(onnx_dir=target))
    t = read_targets(engines)
    assert t.onnx_dir is None and t.folders == {"onnxruntime": engines} and t.checkpoint == "tiny:sd1"


def test_bench_int8_from_an_engine_folder_exports_its_checkpoint_instead(fp32_engines: Path, tmp_path: Path) -> None:
    import shutil

    from latentrt.workflows.bench import run_bench

    engines = Path(shutil.copytree(fp32_engines, tmp_path / "engines"))
    crafted = tmp_path / "crafted"  # a folder bench must not read: its UNet is a symlink out of it
    shutil.copytree(read_manifest(fp32_engines)["source"]["onnx_dir"], crafted)
    (tmp_path / "secret.onnx").write_bytes(b"not yours")
    (crafted / "unet" / "model.onnx").unlink()
    (crafted / "unet" / "model.onnx").symlink_to(tmp_path / "secret.onnx")
    edit_manifest(engines, lambda m: m["source"].update(onnx_dir=str(crafted)))
    record = quiet(run_bench, engines, backends=["onnxruntime"], precision="int8", int8_recipe=RECIPE, steps=1,
                   sizes=[(128, 128)], warmup=0, runs=1, out_dir=tmp_path / "out", flops=False, plots=False)
    assert "export_s" in record.build and "quantize_s" in record.build
    assert read_manifest(tmp_path / "out" / "engines-onnxruntime-int8")["int8"]["fp32_unet"] == \
        str((tmp_path / "out" / "onnx" / "unet" / "model.onnx").resolve())


# ---------------------------------------------------------------------------- 4. no empty folders after a failure


@pytest.mark.parametrize("argv", [["tiny:sd1", "--backends", "tensorrt"], ["{tmp}/no-such-model", "--backends",
                                                                            "onnxruntime"]])
def test_a_failed_bench_leaves_no_output_folder(argv: list[str], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine").mkdir()
    for out in (tmp_path / "new" / "deeper" / "bench", tmp_path / "mine" / "bench"):
        code, err = run_cli(["bench", *(a.format(tmp=tmp_path) for a in argv), "-o", str(out), "--no-progress",
                             "--no-flops", "--no-plots"], capsys)
        assert code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("latentrt bench: error:"), err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["mine"]


@pytest.mark.parametrize("kwargs", [{"model": "{tmp}/no-such-model"}, {"model": "tiny:sd1", "components": ["nope"]}])
def test_a_failed_export_leaves_no_output_folder(kwargs: dict[str, Any], tmp_path: Path) -> None:
    from latentrt.export.onnx import export_model

    (tmp_path / "mine").mkdir()
    model = kwargs.pop("model").format(tmp=tmp_path)
    for out in (tmp_path / "new" / "deeper" / "onnx", tmp_path / "mine" / "onnx"):
        with pytest.raises(CheckpointError):
            export_model(model, out, **kwargs)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["mine"]


def test_a_failed_build_leaves_no_output_folder(tmp_path: Path) -> None:
    export = make_fake_export("sd1", tmp_path / "export")
    (export / "vae_decoder" / "model.onnx").write_bytes(b"changed after export")
    for out in (tmp_path / "new" / "engines", tmp_path / "export" / "x" / "y" / "engines"):
        with pytest.raises(StaleArtifact):
            quiet(build_engines, export, out, backend="onnxruntime")
    assert not (tmp_path / "new").exists() and not (tmp_path / "export" / "x").exists()


# ---------------------------------------------------------------------------- 5. a closed pipe ends quietly


def closed_pipe_run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`latentrt ARGV` writing into a pipe whose reader is already gone (as after `| head -1`)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "latentrt.cli", *argv], cwd=cwd, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)


def test_output_into_a_closed_pipe_ends_quietly(onnx_export_dir: Callable[[str], Path], tmp_path: Path) -> None:
    for argv, code in ((["info", str(onnx_export_dir("sd1"))], EXIT_PIPE),
                       (["export", "tiny:sd1", "-o", str(tmp_path / "onnx"), "--no-verify"], EXIT_PIPE),
                       (["--help"], None), (["info", "--help"], None)):
        done = closed_pipe_run(argv, tmp_path)
        for bad in (": error:", "Traceback", "Broken pipe", "Exception ignored"):
            assert bad not in done.stderr, (argv, done.stderr)
        assert done.returncode in ((0, EXIT_PIPE) if code is None else (code,)), (argv, done.returncode, done.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the interrupted export left nothing


# ---------------------------------------------------------------------------- 6. old-version staging folders


def test_old_version_staging_folders_are_removed_once_untouched_for_an_hour(tmp_path: Path) -> None:
    export = make_fake_export("sd1", tmp_path / "export")
    old = time.time() - LEGACY_STAGING_AGE_S - 60

    def legacy(name: str, age_of_file: float) -> Path:
        folder = tmp_path / f".engines.{name}.partial"
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "half.onnx").write_bytes(b"12")
        for p in (folder / "unet" / "half.onnx", folder / "unet", folder):
            os.utime(p, (age_of_file if p.is_file() else old, age_of_file if p.is_file() else old))
        return folder

    killed = legacy("k1lled_1", old)  # a killed old-version run: nothing changed for over an hour
    killed2 = legacy("abcdefgh", old)
    busy = legacy("b_sy1234", time.time())  # an old-version run still writing into it
    fresh = tmp_path / ".engines.fr3sh000.partial"
    fresh.mkdir()
    other = tmp_path / ".other.k1lled_2.partial"  # another destination's: not this run's to clean
    other.mkdir()
    os.utime(other, (old, old))
    quiet(build_engines, export, tmp_path / "engines", backend="onnxruntime")
    assert not killed.exists() and not killed2.exists()
    assert busy.exists() and fresh.exists() and other.exists()


# ---------------------------------------------------------------------------- 7. --overwrite says the rule


@pytest.mark.parametrize("verb", ["export", "build"])
def test_overwrite_help_states_the_ownership_rule(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "A folder holding anything LatentRT did not write is never replaced, with or without --overwrite" in text
    assert "another model's" in text
