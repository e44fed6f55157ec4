"""Issue 10, files: untrusted manifest paths, the --overwrite rule, checked manifests, leftovers and the lock.

Every case uses real files, real symlinks and (for the lock and killed runs) real processes, and
asserts what a careful user expects: one line on stderr naming the problem, exit code 2, no
traceback, nothing half-written, and a sentinel folder outside the named folders byte-identical
before and after. No numeric tolerances are involved.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
from test_engines_fakes import make_fake_export, make_model

from latentrt.cli import main
from latentrt.engines.build import build_engines
from latentrt.errors import OutputConflict, StaleArtifact, UnsafePath
from latentrt.families import get_family
from latentrt.manifest import ENGINE_KIND, MANIFEST, read_manifest, sha256_tree, staging_dir
from latentrt.manifest_checks import sealed
from latentrt.outputs import output_lock
from latentrt.runtime.engine_set import load_engines
from latentrt.tensors import component_ios

# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def fake_sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_export("sd1", tmp_path_factory.mktemp("fake") / "sd1")


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[Path]:
    """A folder outside every named folder: it must be byte-identical after each case."""
    folder = tmp_path / "sentinel"
    (folder / "deep").mkdir(parents=True)
    (folder / "secret.txt").write_text("do not read or delete")
    (folder / "deep" / "model.onnx").write_bytes(b"\x08\x07not yours")
    before = snapshot(folder)
    yield folder
    assert snapshot(folder) == before


def snapshot(folder: Path) -> tuple[str, list[str]]:
    return sha256_tree(folder), sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def copy_export(src: Path, dest: Path) -> Path:
    return Path(shutil.copytree(src, dest))


def edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], None], reseal: bool = False) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(sealed(manifest) if reseal else manifest))


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Run `latentrt` in-process; the exit code and stderr's lines."""
    capsys.readouterr()  # drop what fixtures printed (e.g. building a tiny checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def one_line(code: int, err: list[str], *needles: str) -> str:
    """Assert exit code 2 and a single stderr line holding every needle (no traceback)."""
    assert code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def run_latentrt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A real `latentrt` process (run outside the repository root, as a user would)."""
    return subprocess.run([sys.executable, "-m", "latentrt.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def build_cli(src: Path, out: Path, *extra: str) -> list[str]:
    return ["build", str(src), "-o", str(out), "--backend", "onnxruntime", *extra]


def quiet_export(*args: Any, **kwargs: Any) -> Path:
    from latentrt.export.onnx import export_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_model(*args, **kwargs)


# ---------------------------------------------------------------------------- 1. paths from manifests


@pytest.mark.parametrize("path", ["../sentinel/deep/model.onnx", "{sentinel}/deep/model.onnx", "unet/../../x.onnx"])
def test_component_paths_out_of_the_export_are_refused(fake_sd1: Path, tmp_path: Path, sentinel: Path, path: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_export(fake_sd1, tmp_path / "onnx")
    edit_manifest(src, lambda m: m["components"]["unet"].update(path=path.format(sentinel=sentinel)), reseal=True)
    one_line(*cli(build_cli(src, tmp_path / "engines"), capsys), "'unet'", "leaves its folder" if ".." in path
             else "absolute")
    with pytest.raises(UnsafePath):
        load_engines(src)
    assert not (tmp_path / "engines").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx", "sentinel"]  # no staging, no lock left


def test_symlinks_out_of_an_export_are_refused(fake_sd1: Path, tmp_path: Path, sentinel: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_export(fake_sd1, tmp_path / "onnx")
    vocab = src / "tokenizer" / "vocab.json"
    vocab.unlink()
    vocab.symlink_to(sentinel / "secret.txt")  # its hash is recorded, so only the symlink gives it away
    edit_manifest(src, lambda m: m["files"].update(tokenizer=sha256_tree(src / "tokenizer")))
    line = one_line(*cli(build_cli(src, tmp_path / "engines"), capsys), "is a symlink to", "secret.txt")
    assert "outside" in line
    one_line(*cli(["info", str(src)], capsys), "is a symlink to")
    vocab.unlink()
    shutil.copy(fake_sd1 / "tokenizer" / "vocab.json", vocab)
    (src / "unet").rename(tmp_path / "sentinel-unet")  # a whole component folder linked in from outside
    (src / "unet").symlink_to(tmp_path / "sentinel-unet", target_is_directory=True)
    one_line(*cli(build_cli(src, tmp_path / "engines"), capsys), "unet", "outside")
    with pytest.raises(UnsafePath, match="unet"):
        load_engines(src)
    assert not (tmp_path / "engines").exists()


def test_support_files_and_component_names_cannot_write_outside(fake_sd1: Path, tmp_path: Path, sentinel: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_export(fake_sd1, tmp_path / "onnx")
    edit_manifest(src, lambda m: m["files"].update({"../sentinel/deep": "0" * 64}))
    one_line(*cli(build_cli(src, tmp_path / "engines"), capsys), "'../sentinel/deep'", "leaves its folder")
    src2 = copy_export(fake_sd1, tmp_path / "onnx2")
    edit_manifest(src2, lambda m: m["components"].update({"../../sentinel": m["components"]["unet"]}))
    one_line(*cli(build_cli(src2, tmp_path / "engines"), capsys), "'../../sentinel'", "family sd1 does not have")
    assert not (tmp_path / "engines").exists()


def test_external_weights_out_of_the_component_folder_are_refused(fake_sd1: Path, tmp_path: Path, sentinel: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for i, location in enumerate(["../../sentinel/deep/model.onnx", str(sentinel / "secret.txt")]):
        src = copy_export(fake_sd1, tmp_path / f"onnx{i}")
        model = onnx.load(str(src / "text_encoder" / "model.onnx"), load_external_data=False)
        moved = 0
        for tensor in model.graph.initializer:  # the token embedding is stored in model.onnx.data
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value, moved = location, moved + 1
        assert moved
        onnx.save_model(model, str(src / "text_encoder" / "model.onnx"))
        edit_manifest(src, lambda m, s=src: m["components"]["text_encoder"].update(
            sha256=sha256_tree(s / "text_encoder")))
        one_line(*cli(build_cli(src, tmp_path / "engines"), capsys), "external weights", repr(location))
    assert not (tmp_path / "engines").exists()


def test_checkpoint_folders_with_symlinks_out_are_refused(tiny_checkpoint: Callable[[str], Path], tmp_path: Path,
                                                          sentinel: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = Path(shutil.copytree(tiny_checkpoint("sd1"), tmp_path / "ckpt"))
    config = ckpt / "unet" / "config.json"
    (sentinel.parent / "unet-config.json").write_bytes(config.read_bytes())
    config.unlink()
    config.symlink_to(sentinel.parent / "unet-config.json")
    one_line(*cli(["export", str(ckpt), "-o", str(tmp_path / "out")], capsys), "unet/config.json",
             "is a symlink to")
    one_line(*cli(["info", str(ckpt)], capsys), "is a symlink to")
    config.unlink()
    shutil.copy(sentinel.parent / "unet-config.json", config)
    (ckpt / "scheduler" / "fifo").unlink(missing_ok=True)
    os.mkfifo(ckpt / "scheduler" / "fifo")  # a read would hang
    one_line(*cli(["export", str(ckpt), "-o", str(tmp_path / "out")], capsys), "fifo", "not a regular file")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- 2. --overwrite


def test_overwrite_never_replaces_a_folder_with_foreign_files(fake_sd1: Path, tmp_path: Path, sentinel: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = build_engines(fake_sd1, tmp_path / "engines", backend="onnxruntime")
    before = read_manifest(out, ENGINE_KIND)
    (out / "unet" / "notes.txt").write_text("mine")  # inside a component folder
    one_line(*cli(build_cli(fake_sd1, out, "--overwrite"), capsys), "unet/notes.txt", "did not write")
    (out / "unet" / "notes.txt").unlink()
    (out / "photos").mkdir()  # an empty foreign folder at the top
    one_line(*cli(build_cli(fake_sd1, out, "--overwrite"), capsys), "photos/", "did not write")
    (out / "photos").rmdir()
    (out / "link").symlink_to(sentinel)
    one_line(*cli(build_cli(fake_sd1, out, "--overwrite"), capsys), "link", "symlink")
    (out / "link").unlink()
    assert read_manifest(out, ENGINE_KIND)["components"] == before["components"]
    assert cli(build_cli(fake_sd1, out, "--overwrite"), capsys)[0] == 0  # only LatentRT's files: replaced


def test_overwrite_rule_is_the_same_for_export(tmp_path: Path, sentinel: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = quiet_export("tiny:sd1", tmp_path / "out", components=["vae_decoder"], verify=False)
    (out / "notes.txt").write_text("mine")
    args = ["export", "tiny:sd1", "-o", str(out), "--components", "vae_encoder", "--no-verify", "--overwrite"]
    one_line(*cli(args, capsys), "notes.txt", "did not write")
    assert list(read_manifest(out)["components"]) == ["vae_decoder"] and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    link = tmp_path / "link-out"
    link.symlink_to(out, target_is_directory=True)
    one_line(*cli([*args[:3], str(link), *args[4:]], capsys), "symbolic link")
    assert cli(args, capsys)[0] == 0  # only LatentRT's files: the partial re-export keeps vae_decoder
    assert list(read_manifest(out)["components"]) == ["vae_encoder", "vae_decoder"]


def test_overwrite_of_a_folder_without_a_usable_manifest_is_refused(fake_sd1: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / MANIFEST).write_text("[1, 2]")  # not a LatentRT manifest: nothing says what LatentRT wrote
    (folder / "data.bin").write_bytes(b"1234")
    one_line(*cli(build_cli(fake_sd1, folder, "--overwrite"), capsys), "cannot tell which files")
    legacy = build_engines(fake_sd1, tmp_path / "legacy", backend="onnxruntime")
    edit_manifest(legacy, lambda m: m.pop("written"))  # written before the record existed: hashes decide
    (legacy / "vae_decoder" / "extra.bin").write_bytes(b"x")
    one_line(*cli(build_cli(fake_sd1, legacy, "--overwrite"), capsys), "vae_decoder", "changed since")
    assert (folder / "data.bin").exists() and (legacy / "vae_decoder" / "extra.bin").exists()


# ---------------------------------------------------------------------------- 3. manifests are checked


def test_a_hand_edited_family_is_refused_at_build_and_load(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = quiet_export("tiny:sd1", tmp_path / "onnx", components=["vae_decoder"], verify=False)
    edit_manifest(out, lambda m: m.update(family="sd2"))  # same components and widths: only the seal tells
    one_line(*cli(build_cli(out, tmp_path / "engines"), capsys), "was edited")
    with pytest.raises(StaleArtifact, match="was edited"):
        load_engines(out)
    edit_manifest(out, lambda m: m.update(family="sd1"))
    engines = build_engines(out, tmp_path / "engines", backend="onnxruntime")
    edit_manifest(engines, lambda m: m.update(family="sd-turbo"))
    with pytest.raises(StaleArtifact, match="was edited"):
        load_engines(engines)
    one_line(*cli(["info", str(engines)], capsys), "was edited")


@pytest.mark.parametrize(("family", "needle"), [("sdxl", "family sdxl does not fit the model it describes (text "
                                                         "encoders 1 != 2; time ids 0 != 6; pooled projection"),
                                                ("sd1-inpaint", "family sd1-inpaint does not fit the model it describes "
                                                                "(unet in_channels 4 != 9"),
                                                ("sdxl-refiner", "'text_encoder', which family sdxl-refiner does not "
                                                                 "have")])
def test_a_family_that_does_not_fit_the_model_is_refused(fake_sd1: Path, tmp_path: Path, family: str, needle: str,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_export(fake_sd1, tmp_path / "onnx")
    edit_manifest(src, lambda m: m.update(family=family))  # hand-built exports carry no seal
    one_line(*cli(build_cli(src, tmp_path / "engines"), capsys), needle)
    with pytest.raises(StaleArtifact, match=f"family {family}"):
        load_engines(src)


def test_component_lists_and_io_that_do_not_match_are_refused(fake_sd1: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_export(fake_sd1, tmp_path / "onnx")
    edit_manifest(src, lambda m: m["components"].update(text_encoder_2=m["components"]["text_encoder"]))
    one_line(*cli(build_cli(src, tmp_path / "engines"), capsys), "'text_encoder_2'", "family sd1 does not have")

    def rename_input(m: dict[str, Any]) -> None:
        m["components"]["unet"]["io"]["inputs"][0]["name"] = "latents"

    src = copy_export(fake_sd1, tmp_path / "onnx2")
    edit_manifest(src, rename_input)
    one_line(*cli(build_cli(src, tmp_path / "engines"), capsys), "component 'unet' IO", "differs from family sd1")
    # the manifest agrees with the family, the ONNX graph does not (a UNet with 9 input channels)
    src = copy_export(fake_sd1, tmp_path / "onnx3")
    inpaint_unet = component_ios(get_family("sd1-inpaint"), _fake_dims("sd1-inpaint"))["unet"]
    shutil.rmtree(src / "unet")
    (src / "unet").mkdir()
    onnx.save_model(make_model(inpaint_unet), str(src / "unet" / "model.onnx"))
    edit_manifest(src, lambda m: m["components"]["unet"].update(sha256=sha256_tree(src / "unet")))
    one_line(*cli(build_cli(src, tmp_path / "engines"), capsys), "does not match the IO",
             "sample: axis 1 is 9 in the graph, 4 in the manifest")
    assert not (tmp_path / "engines").exists()


def _fake_dims(family: str) -> Any:
    from test_engines_fakes import fake_dims

    return fake_dims(family)


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda m: m.update(family=5), "'family' should be a family id string, found int"),
    (lambda m: m.update(family="sd4"), "unknown family 'sd4'"),
    (lambda m: m.update(components=["unet"]), "'components' should be a non-empty JSON object, found list"),
    (lambda m: m.update(files="tokenizer"), "'files' should be a JSON object, found str"),
    (lambda m: m["components"]["unet"].update(io="sample"), "malformed IO description"),
    (lambda m: m["components"]["unet"]["io"]["inputs"][0]["shape"][0].update(min="1"), "integer min <= opt <= max"),
    (lambda m: m["components"]["unet"].update(path=None), "None is not a relative path"),
    (lambda m: m["model"].update(dims={"text_hidden": "8"}), "list of positive integers"),
])
def test_wrong_json_types_get_a_message(fake_sd1: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None],
                                        needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_export(fake_sd1, tmp_path / "onnx")
    edit_manifest(src, edit)
    one_line(*cli(build_cli(src, tmp_path / "engines"), capsys), needle)
    one_line(*cli(["info", str(src)], capsys), needle)


def test_wrong_json_types_in_engine_manifests_get_a_message(fake_sd1: Path, tmp_path: Path) -> None:
    out = build_engines(fake_sd1, tmp_path / "engines", backend="onnxruntime")
    for edit, needle in [(lambda m: m["components"]["unet"].update(ort=["cpu"]), "'ort' should be a JSON object"),
                         (lambda m: m["components"]["unet"]["ort"]["threads"].update(intra_op="2"), "ort.threads"),
                         (lambda m: m["components"]["unet"].update(precision=16), "'precision' should be a string"),
                         (lambda m: m["components"]["unet"]["ort"].update(providers=[5]), "'ort.providers'")]:
        text = (out / MANIFEST).read_text()
        edit_manifest(out, edit)
        with pytest.raises(StaleArtifact, match=needle):
            load_engines(out)
        (out / MANIFEST).write_text(text)
    assert read_manifest(out, ENGINE_KIND)["family"] == "sd1"  # the unedited manifest reads
    with pytest.raises(StaleArtifact, match="is not a readable CLIP tokenizer"):  # the fakes' stand-in vocab
        load_engines(out)


# ---------------------------------------------------------------------------- 7. leftovers and the lock


def _holder_script(out: Path) -> str:
    return ("import sys\nfrom latentrt.outputs import output_lock\n"
            f"with output_lock({str(out)!r}):\n    print('locked', flush=True)\n    sys.stdin.read()\n")


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(fake_sd1: Path, tmp_path: Path) -> None:
    out = tmp_path / "engines"
    holder = subprocess.Popen([sys.executable, "-c", _holder_script(out)], cwd=tmp_path, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        for args in (build_cli(fake_sd1, out), ["export", "tiny:sd1", "-o", str(out), "--components", "vae_decoder"]):
            done = run_latentrt(*args, cwd=tmp_path)
            err = done.stderr.strip().splitlines()
            one_line(done.returncode, err[-1:], f"another LatentRT run (pid {holder.pid}) is writing {out}")
            assert "Traceback" not in done.stderr
        with pytest.raises(OutputConflict, match="another LatentRT run"):
            build_engines(fake_sd1, out, backend="onnxruntime")
        assert not out.exists()
    finally:
        holder.communicate("", timeout=60)
    assert run_latentrt(*build_cli(fake_sd1, out), cwd=tmp_path).returncode == 0
    assert read_manifest(out, ENGINE_KIND)["family"] == "sd1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]  # lock file and staging gone


def test_a_lock_dies_with_its_process(fake_sd1: Path, tmp_path: Path) -> None:
    out = tmp_path / "engines"
    holder = subprocess.Popen([sys.executable, "-c", _holder_script(out)], cwd=tmp_path, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait(timeout=60)
    assert (tmp_path / ".engines.lock").exists()  # a killed holder cannot remove its lock file, nor keep the lock
    with output_lock(out):
        pass
    assert not (tmp_path / ".engines.lock").exists()


def test_staging_left_by_a_killed_build_is_cleaned_by_the_next_run(fake_sd1: Path, tmp_path: Path) -> None:
    out = tmp_path / "engines"
    script = ("import os, signal\nfrom latentrt.manifest import staging_dir\n"
              f"with staging_dir({str(out)!r}) as tmp:\n    (tmp / 'unet').mkdir()\n"
              "    (tmp / 'unet' / 'half.onnx').write_bytes(b'12')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".engines.") and left[0].endswith(".partial")
    done = run_latentrt(*build_cli(fake_sd1, out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


def test_staging_left_by_a_killed_export_is_cleaned_by_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    proc = subprocess.Popen([sys.executable, "-m", "latentrt.cli", "export", "tiny:sd1", "-o", str(out)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None and not list(tmp_path.glob(".onnx.*.partial/*")):
            time.sleep(0.05)  # polling for the staging folder to fill; nothing is timed
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    staged = list(tmp_path.glob(".onnx.*.partial"))
    assert proc.returncode == -signal.SIGKILL and len(staged) == 1, proc.stderr.read() if proc.stderr else ""
    assert not (out / MANIFEST).exists()  # nothing half-written looks finished
    quiet_export("tiny:sd1", out, components=["vae_decoder"], verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_a_previous_version_left_by_a_killed_swap_is_restored(fake_sd1: Path, tmp_path: Path) -> None:
    out = build_engines(fake_sd1, tmp_path / "engines", backend="onnxruntime")
    manifest = (out / MANIFEST).read_bytes()
    old = tmp_path / ".engines.old"
    out.rename(old)  # killed between the two renames of the swap: only the previous version exists
    events: list[Any] = []
    build_engines(fake_sd1, out, backend="onnxruntime", progress=events.append)
    assert {e.stage for e in events} == {"reused"} and not old.exists()
    assert read_manifest(out, ENGINE_KIND)["components"] == json.loads(manifest)["components"]
    shutil.copytree(out, old)  # killed after the swap: the stale copy is dropped
    build_engines(fake_sd1, out, backend="onnxruntime")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


def test_staging_of_a_live_process_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "engines"
    with staging_dir(out) as mine, staging_dir(out) as again:
        assert mine.exists() and again.exists()  # the same live writer: neither removes the other


def test_the_current_folder_as_output_stages_and_locks_beside_it(fake_sd1: Path, tmp_path: Path) -> None:
    here = tmp_path / "here"
    here.mkdir()
    done = run_latentrt(*build_cli(fake_sd1, Path(".")), cwd=here)
    assert done.returncode == 0, done.stderr
    assert read_manifest(here, ENGINE_KIND)["family"] == "sd1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # no lock or staging left beside it


def test_a_planted_lock_symlink_is_refused_not_followed(fake_sd1: Path, tmp_path: Path, sentinel: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / ".engines.lock").symlink_to(sentinel / "secret.txt")  # locking would truncate its target
    one_line(*cli(build_cli(fake_sd1, tmp_path / "engines"), capsys), ".engines.lock is a symlink")
    (tmp_path / ".engines.lock").unlink()
    (tmp_path / ".engines.lock").mkdir()
    one_line(*cli(build_cli(fake_sd1, tmp_path / "engines"), capsys), ".engines.lock")
    assert not (tmp_path / "engines").exists()


def test_a_failed_export_creates_no_output_folder(tiny_checkpoint: Callable[[str], Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    tiny_checkpoint("sd1")  # built beforehand: its first build prints transformers' notices
    one_line(*cli(["export", "tiny:sd1", "-o", str(tmp_path / "out"), "--components", "refiner"], capsys),
             "no component(s) refiner")

    def fail_mid_export(line: str) -> None:
        if line.startswith("[1/1] vae_decoder …"):
            raise KeyboardInterrupt  # as a user's Ctrl-C would, after the lock and the staging folder exist

    with pytest.raises(KeyboardInterrupt):
        quiet_export("tiny:sd1", tmp_path / "out", components=["vae_decoder"], progress=fail_mid_export)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output folder, staging folder or lock file
