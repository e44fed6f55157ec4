"""`latentrt build`: plans for every family without TensorRT, the one clear error, ORT builds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_engines_fakes import make_fake_export

from latentrt.cli import main
from latentrt.errors import StaleArtifact
from latentrt.families import FamilyId, get_family
from latentrt.manifest import MANIFEST, read_manifest
from latentrt.tensorrt_support import tensorrt_available

NO_TRT = not tensorrt_available()[0]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    return {f.value: make_fake_export(f.value, root / f.value) for f in FamilyId}


@pytest.mark.parametrize("family", [f.value for f in FamilyId])
def test_plan_prints_for_every_family_without_tensorrt(exports: dict[str, Path], family: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["build", str(exports[family]), "--backend", "tensorrt", "--plan"])
    out = capsys.readouterr().out
    assert code == 0
    profiles = min(3, len(get_family(family).buckets))  # 3 groups; the demo families have a single bucket
    assert out.startswith(f"family {family}: {profiles} profile(s), strategy grouped")
    for c in get_family(family).components:
        assert f"    {c} " in out
    assert ("CFG off" in out) == (not get_family(family).uses_cfg)  # Turbo, and LDM families without guidance


def test_plan_options(exports: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["build", str(exports["sdxl"]), "--plan", "--sizes", "512x512,768x1344", "--batch", "2:3",
                 "--profiles", "per-bucket", "--no-cfg", "--components", "unet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 profile(s), strategy per-bucket, 2 size(s), batch 2..3 per prompt (opt 2), CFG off" in out
    assert "unet_batch 2/2/3  latent_height 96/96/96  latent_width 168/168/168" in out
    assert "vae_decoder" not in out


@pytest.mark.skipif(not NO_TRT, reason="TensorRT is available here")
def test_tensorrt_without_tensorrt_gives_one_clear_error(exports: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["build", str(exports["sd1"]), "-o", str(tmp_path / "engines"), "--backend", "tensorrt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1
    assert err[0].startswith("latentrt build: error: the tensorrt backend is unavailable:")
    assert "--backend onnxruntime" in err[0]
    assert not (tmp_path / "engines").exists()


def test_cli_builds_onnxruntime_engines_with_progress(exports: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "engines"
    code = main(["build", str(exports["sd-turbo"]), "-o", str(out_dir), "--backend", "onnxruntime", "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0
    manifest = json.loads((out_dir / MANIFEST).read_text())
    assert manifest["backend"] == "onnxruntime" and manifest["family"] == "sd-turbo"
    assert "[1/4] text_encoder: building onnxruntime fp32" in captured.err
    assert "[4/4] vae_decoder: done in" in captured.err
    assert f"onnxruntime engines in {out_dir}" in captured.out
    assert main(["build", str(exports["sd-turbo"]), "-o", str(out_dir), "--backend", "onnxruntime",
                 "--threads", "1"]) == 0
    assert capsys.readouterr().err.count("unchanged, reused") == 4


@pytest.mark.parametrize("argv, message", [
    (["--batch", "one"], "cannot read --batch"),
    (["--sizes", "512by512"], "cannot read size"),
    (["--components", "controlnet"], "has no component(s) controlnet"),
])
def test_bad_arguments_are_reported(exports: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    argv: list[str], message: str) -> None:
    code = main(["build", str(exports["sd1"]), "-o", str(tmp_path / "e"), "--backend", "onnxruntime", *argv])
    assert code != 0
    assert message in capsys.readouterr().err


def test_missing_output_and_missing_export(tmp_path: Path, exports: dict[str, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", str(exports["sd1"]), "--backend", "onnxruntime"]) != 0
    assert "-o ENGINE_DIR is required" in capsys.readouterr().err
    assert main(["build", str(tmp_path), "-o", str(tmp_path / "e"), "--backend", "onnxruntime"]) != 0
    assert "not an ONNX export" in capsys.readouterr().err


def test_info_on_broken_manifests_is_one_clear_error(exports: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "onnx"
    shutil.copytree(exports["sd1"], folder)
    text = (folder / MANIFEST).read_text()
    assert main(["info", str(folder)]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("ONNX export of fake:sd1 (sd1), opset 18, hand-built")
    (folder / MANIFEST).write_text(text[: len(text) // 2])  # truncated
    assert main(["info", str(folder)]) == 2
    assert "manifest.json is unreadable" in capsys.readouterr().err
    incomplete = json.loads(text)
    del incomplete["opset"]
    (folder / MANIFEST).write_text(json.dumps(incomplete))
    assert main(["info", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is incomplete or malformed (KeyError: 'opset'); re-run `latentrt export`" in err
    assert "Traceback" not in err
    (folder / MANIFEST).write_text("[1, 2]")
    with pytest.raises(StaleArtifact, match="should hold a JSON object, found list"):
        read_manifest(folder)
