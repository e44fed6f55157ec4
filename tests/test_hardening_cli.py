"""Hostile and clumsy input to the `latentrt` verbs and the Python API: one line, exit code != 0, no traceback.

Every class of expected failure gets at least two real inputs: damaged checkpoints and weights,
unsupported opsets, cache folders that are files or unwritable, full disks (a real ENOSPC on a tiny
tmpfs where this machine lets us mount one, and a real EFBIG from a file-size limit everywhere),
output paths that are folders, devices, empty, too long or unwritable (as root permission bits do
not bind, so the unwritable places are /proc, /sys and a path under a file), decompression-bomb
images, bad --sweep and --port values, a busy port, None in API calls, and requests that need more
memory than the machine has. Memory estimates are checked for what they promise (a refusal with
the estimate, and a suggested size that is valid, covered by the engines and fits), not for bytes:
`latentrt.memory` records the measured accuracy (-6%..+28% of peak RSS on tiny sd1).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from latentrt.buckets import is_valid_size, nearest_valid
from latentrt.cli import main
from latentrt.errors import CheckpointError, InvalidRequest, TooLarge, UnsupportedShape
from latentrt.memory import architecture, estimate_bytes
from latentrt.runtime.engine_set import load_engines
from latentrt.runtime.pipeline import GenerationRequest, Pipeline, generate, load_pipeline

# ---------------------------------------------------------------------------- helpers


def one_error_line(err: str, verb: str) -> str:
    """The single error line of a failed command's stderr (INFO logging may precede it); no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert len(errors) == 1, err
    assert err.strip().splitlines()[-1] == errors[0], err
    assert errors[0].startswith(f"latentrt {verb}: error: ") or errors[0].startswith(f"latentrt {verb}: "), err
    return errors[0]


def no_files(path: Path) -> bool:
    """Nothing was written at `path` (an empty folder left by the export's output lock is tolerated)."""
    return not path.exists() or not any(p.is_file() for p in path.rglob("*"))


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_process(argv: list[str], cwd: Path, env: dict[str, str] | None = None, fsize: int | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`latentrt ARGV` in a real process (optionally under a file-size limit, which Python meets as EFBIG)."""
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "latentrt.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, preexec_fn=limit)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels in a few dozen bytes (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def sd1_dir(onnx_export_dir: Callable[[str], Path]) -> Path:
    return onnx_export_dir("sd1")


@pytest.fixture(scope="module")
def sd1(sd1_dir: Path) -> Iterator[Pipeline]:
    pipe = load_pipeline(sd1_dir, backend="onnxruntime")
    yield pipe
    pipe.close()


def generate_argv(folder: Path, out: str, *extra: str) -> list[str]:
    return ["generate", str(folder), "-p", "a fox", "--steps", "1", "--width", "64", "--height", "64", "--seed", "1",
            "--no-progress", "-o", out, *extra]


# ---------------------------------------------------------------------------- checkpoints


def _edit_config(folder: Path, part: str, key: str, value: object) -> None:
    path = folder / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))


def _truncate(path: Path, size: int = 300) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"{not a safetensors header ......"
    path.write_bytes(bytes(data))


BAD_CHECKPOINTS = {
    "unet block_out_channels null": lambda f: _edit_config(f, "unet", "block_out_channels", None),
    "vae block_out_channels a number": lambda f: _edit_config(f, "vae", "block_out_channels", 7),
    "text_encoder hidden_size a string": lambda f: _edit_config(f, "text_encoder", "hidden_size", "wide"),
    "unet in_channels a string": lambda f: _edit_config(f, "unet", "in_channels", "four"),
    "scheduler num_train_timesteps a string": lambda f: _edit_config(f, "scheduler", "num_train_timesteps", "many"),
    "scheduler beta_start null": lambda f: _edit_config(f, "scheduler", "beta_start", None),
    "truncated text_encoder weights": lambda f: _truncate(f / "text_encoder" / "model.safetensors"),
    "truncated vae weights": lambda f: _truncate(f / "vae" / "diffusion_pytorch_model.safetensors"),
    "garbled unet weights header": lambda f: _garble_header(f / "unet" / "diffusion_pytorch_model.safetensors"),
}


@pytest.mark.parametrize("damage", list(BAD_CHECKPOINTS))
def test_damaged_checkpoints_fail_in_one_line(damage: str, tiny_checkpoint: Callable[[str], Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("sd1"), folder)
    BAD_CHECKPOINTS[damage](folder)
    code, _, err = run_main(capsys, "export", str(folder), "-o", str(tmp_path / "onnx"), "--no-verify")
    line = one_error_line(err, "export")
    assert code == 2 and str(folder) in line
    assert no_files(tmp_path / "onnx")  # nothing half-written


def test_damaged_onnx_component_fails_in_one_line(sd1_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "onnx"
    shutil.copytree(sd1_dir, folder)
    _truncate(folder / "vae_decoder" / "model.onnx", 1000)
    code, _, err = run_main(capsys, *generate_argv(folder, str(tmp_path / "x.png")))
    one_error_line(err, "generate")
    assert code == 2 and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("key, value", [("beta_end", "high"), ("use_karras_sigmas", "yes")])
def test_a_tampered_scheduler_config_in_an_export_is_refused(key: str, value: object, sd1_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "onnx"
    shutil.copytree(sd1_dir, folder)
    _edit_config(folder, "scheduler", key, value)
    code, _, err = run_main(capsys, *generate_argv(folder, str(tmp_path / "x.png")))  # the manifest's hash sees it
    assert code == 2 and "scheduler" in one_error_line(err, "generate") and not (tmp_path / "x.png").exists()
    engines = load_engines(sd1_dir, backend="onnxruntime")  # and the pipeline checks the values it will read
    try:
        with pytest.raises(CheckpointError, match=key):
            Pipeline(replace(engines, scheduler_config={**engines.scheduler_config, key: value}))
    finally:
        engines.close()


@pytest.mark.parametrize("argv", [["--opset", "5"], ["--opset", "99"], ["--dynamo", "--opset", "40"]])
def test_unsupported_opsets_are_refused_before_exporting(argv: list[str], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "export", "tiny:sd1", "-o", str(tmp_path / "onnx"), *argv)
    assert code == 2 and "opset" in one_error_line(err, "export") and no_files(tmp_path / "onnx")


# ---------------------------------------------------------------------------- cache folders and full disks


@pytest.mark.parametrize("cache", ["a-file", "/proc/latentrt-cache"])
def test_cache_folder_that_is_a_file_or_unwritable(cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    if cache == "a-file":
        (tmp_path / "a-file").write_text("not a folder")
        cache = str(tmp_path / "a-file")
    monkeypatch.setenv("LATENTRT_CACHE", cache)
    code, _, err = run_main(capsys, "export", "tiny:sd2", "-o", str(tmp_path / "onnx"), "--no-verify")
    line = one_error_line(err, "export")
    assert code == 2 and cache in line and no_files(tmp_path / "onnx")


def test_a_file_size_limit_at_the_png_is_one_line(sd1_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fox.png"
    done = run_process(generate_argv(sd1_dir, str(out)), cwd=tmp_path, fsize=2000)
    line = one_error_line(done.stderr, "generate")
    assert done.returncode == 2 and "EFBIG" in line
    assert not out.exists() and not list(tmp_path.glob(".*partial"))  # no half-written PNG, no temporary left


def test_a_file_size_limit_during_export_leaves_nothing(tmp_path: Path, tiny_checkpoint: Callable[[str], Path]) -> None:
    tiny_checkpoint("sd1")  # built (and cached) without the limit
    out = tmp_path / "onnx"
    done = run_process(["export", "tiny:sd1", "-o", str(out), "--no-verify", "--components", "text_encoder"],
                       cwd=tmp_path, fsize=200_000, env={"LATENTRT_CACHE": os.environ["LATENTRT_CACHE"]})
    one_error_line(done.stderr, "export")
    assert done.returncode == 2 and no_files(out) and not list(tmp_path.glob(".*partial"))


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (a real ENOSPC); skipped where this process may not mount file systems."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        (mount / "filler").write_bytes(b"\0" * (60 << 10))
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_at_the_png_is_one_line(sd1_dir: Path, full_disk: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, *generate_argv(sd1_dir, str(full_disk / "fox.png")))
    assert code == 2 and "ENOSPC" in one_error_line(err, "generate")
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_a_full_disk_during_export_is_one_line(full_disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "export", "tiny:sd1", "-o", str(full_disk / "onnx"), "--no-verify",
                            "--components", "text_encoder")
    assert code == 2 and "ENOSPC" in one_error_line(err, "export")
    assert no_files(full_disk / "onnx") and sorted(p.name for p in full_disk.iterdir()) in (["filler"],
                                                                                            ["filler", "onnx"])


# ---------------------------------------------------------------------------- output paths


def _bad_outputs(tmp: Path) -> dict[str, tuple[str, str]]:
    (tmp / "file").write_text("x")
    return {
        "a folder": (str(tmp), "is a folder"),
        "a device": ("/dev/null", "not a regular file"),
        "empty": ("", "names no file"),
        "blank": ("  ", "names no file"),
        "too long": (str(tmp / ("a" * 250 + ".png")), "use a shorter one"),
        "under a file": (str(tmp / "file" / "x.png"), "cannot write"),
        "in /proc": ("/proc/latentrt-x.png", "cannot write"),
        "in /sys": ("/sys/latentrt-x.png", "cannot write"),
        "not png": (str(tmp / "x.jpg"), ".png"),
    }


@pytest.mark.parametrize("case", ["a folder", "a device", "empty", "blank", "too long", "under a file", "in /proc",
                                  "in /sys", "not png"])
def test_bad_output_paths_are_refused_before_generating(case: str, sd1_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(tmp_path.rglob("*"))
    out, needle = _bad_outputs(tmp_path)[case]
    before = sorted(tmp_path.rglob("*"))
    code, printed, err = run_main(capsys, *generate_argv(sd1_dir, out))
    assert code == 2 and needle in one_error_line(err, "generate")
    assert "engine:" not in printed  # refused before the engines were even loaded: no work lost
    assert sorted(tmp_path.rglob("*")) == before


def test_several_images_check_each_name(sd1_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "many-1.png").mkdir()  # the second of out-0.png, out-1.png is a folder
    code, printed, err = run_main(capsys, *generate_argv(sd1_dir, str(tmp_path / "many.png"), "--num-images", "2"))
    assert code == 2 and "many-1.png" in one_error_line(err, "generate") and "engine:" not in printed


# ---------------------------------------------------------------------------- images


@pytest.mark.parametrize("size", [(100_000, 100_000), (10_000, 10_000)])
def test_decompression_bomb_init_images(size: tuple[int, int], sd1_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(*size))
    code, _, err = run_main(capsys, *generate_argv(sd1_dir, str(tmp_path / "x.png"), "--image", str(bomb)))
    assert code == 2 and "too large" in one_error_line(err, "generate") and not (tmp_path / "x.png").exists()


def test_unreadable_init_images(sd1_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for image in (tmp_path, tmp_path / "missing.png"):
        code, _, err = run_main(capsys, *generate_argv(sd1_dir, str(tmp_path / "x.png"), "--image", str(image)))
        assert code == 2 and "image" in one_error_line(err, "generate")


# ---------------------------------------------------------------------------- bench, serve arguments


@pytest.mark.parametrize("sweep", ["steps=a,b", "size=100x100", "colour=1", "batch=0", "steps=", "size=512",
                                   "steps=1,,2"])
def test_bad_sweep_values_fail_before_any_work(sweep: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "bench", "tiny:sd1", "-o", str(tmp_path / "bench"), "--sweep", sweep,
                            "--no-progress")
    one_error_line(err, "bench")
    assert code == 2 and not (tmp_path / "bench").exists()


@pytest.mark.parametrize("port", ["70000", "-1", "http", "8080.5"])
def test_bad_port_values(port: str, sd1_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "serve", str(sd1_dir), "--port", port)
    assert code == 2 and "--port" in one_error_line(err, "serve")


def test_a_busy_port_or_foreign_address_fails_before_loading(sd1_dir: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, printed, err = run_main(capsys, "serve", str(sd1_dir), "--port", str(port))
        assert code == 2 and "in use" in one_error_line(err, "serve") and "serving" not in printed
    for host in ("203.0.113.7", "no-such-host.invalid"):  # TEST-NET-3 is no address of this machine
        code, _, err = run_main(capsys, "serve", str(sd1_dir), "--host", host, "--port", "0")
        assert code == 2 and "cannot listen" in one_error_line(err, "serve")


# ---------------------------------------------------------------------------- Python API with None


@pytest.mark.parametrize("call", [
    lambda d: generate(None, "a fox"),  # type: ignore[arg-type]
    lambda d: generate(d, None),  # type: ignore[arg-type]
    lambda d: generate(d, "a fox", steps=None, seed="1"),
    lambda d: load_pipeline(None),  # type: ignore[arg-type]
    lambda d: load_pipeline(d, refiner=3),  # type: ignore[arg-type]
])
def test_api_calls_with_none_raise_invalid_request(call: Callable[[Path], object], sd1_dir: Path) -> None:
    with pytest.raises(InvalidRequest):
        call(sd1_dir)


@pytest.mark.parametrize("call", [
    lambda p: p.generate(None),  # type: ignore[arg-type]
    lambda p: p(None),
    lambda p: p(prompt=None),
    lambda p: p(GenerationRequest(prompt=None)),  # type: ignore[arg-type]
    lambda p: p(GenerationRequest(prompt="a fox", width=64, height=64, num_images_per_prompt=None)),  # type: ignore
    lambda p: p(GenerationRequest(prompt="a fox", width=None, height=64)),
    lambda p: p(GenerationRequest(prompt="a fox", width=64, height=64, guidance="7")),  # type: ignore[arg-type]
    lambda p: p(GenerationRequest(prompt="a fox", width=64, height=64, seed=float("nan"))),  # type: ignore
])
def test_pipeline_calls_with_none_or_wrong_types(call: Callable[[Pipeline], object], sd1: Pipeline) -> None:
    with pytest.raises(InvalidRequest):
        call(sd1)


# ---------------------------------------------------------------------------- memory and valid sizes


def _suggested(line: str) -> tuple[int, int]:
    found = re.search(r"try (\d+)x(\d+)", line)
    assert found, line
    return int(found.group(1)), int(found.group(2))


@pytest.mark.parametrize("argv, env", [
    (["--width", "2048", "--height", "2048", "--num-images", "8", "--guidance", "7.5"], {}),  # ~4 TiB: no machine
    (["--width", "512", "--height", "512"], {"LATENTRT_MEMORY_BUDGET_MB": "64"}),
])
def test_requests_beyond_memory_are_refused_up_front(argv: list[str], env: dict[str, str], sd1: Pipeline,
                                                     sd1_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "big.png"
    code, printed, err = run_main(capsys, "generate", str(sd1_dir), "-p", "a fox", "--steps", "1", "--no-progress",
                                  "-o", str(out), *argv)
    line = one_error_line(err, "generate")
    assert "engine:" not in printed  # refused before anything ran
    assert code == 2 and re.search(r"needs about [\d.]+ (GiB|MiB) of memory .* but [\d.]+ (GiB|MiB) is available",
                                   line) and not out.exists()
    h, w = _suggested(line)
    assert is_valid_size((h, w)) and sd1._covers((h, w))
    settings, _ = sd1.resolve(GenerationRequest("a fox", width=w, height=h, guidance=7.5,
                                                num_images_per_prompt=8 if "8" in argv else 1))
    sd1.check_memory(settings)  # the suggestion fits: no TooLarge


def test_memory_estimate_grows_with_size_batch_and_guidance() -> None:
    arch = architecture("sd1", {"unet_attention": [1, 2], "unet_channels": 32, "vae_channels": 16})
    small = estimate_bytes(arch, unet_rows=1, decode_batch=1, latent_height=32, latent_width=32)
    assert estimate_bytes(arch, unet_rows=2, decode_batch=1, latent_height=32, latent_width=32)["unet"] > small["unet"]
    assert estimate_bytes(arch, unet_rows=1, decode_batch=1, latent_height=64, latent_width=64)["unet"] > \
        4 * small["unet"]  # attention is quadratic in tokens
    assert architecture("sdxl", {"unet_attention": "junk"}).attention_factor == 2  # hostile extras: the reference


@pytest.mark.parametrize("size", [(0, 100), (-64, 64), (100, 5000), (7, 7), (2100, 2100), (1, 10**9)])
def test_nearest_valid_sizes_are_always_valid_and_covered(size: tuple[int, int], sd1: Pipeline) -> None:
    ranges = sd1.pixel_ranges()
    for h, w in nearest_valid(size, 64, ranges):
        assert is_valid_size((h, w)) and sd1._covers((h, w))
    with pytest.raises(UnsupportedShape) as raised:
        sd1.resolve(GenerationRequest("a fox", width=size[1], height=size[0]))
    for h, w in re.findall(r"(\d+)x(\d+)", str(raised.value).split("nearest valid:")[1]):
        assert is_valid_size((int(h), int(w))) and sd1._covers((int(h), int(w)))


def test_too_large_is_an_invalid_request() -> None:
    assert issubclass(TooLarge, InvalidRequest)
