"""Conditioning other than text through `latentrt generate --condition` and the server's "conditioning" field.

A class-conditional family defined in the tests alone (the worked example's family of docs/adding-a-family.md,
tests/_families.py, here around the built-in `CLASS_LABEL` kind and its `class_label` provider) is registered, its tiny checkpoint exported and built for ONNX
Runtime, then sampled through the real CLI and a real HTTP server on 127.0.0.1. Images from the CLI
and the server are compared with the Python API's for the same request: exactly equal (same engines,
same seed, same process); another class gives another image (max difference > 0).
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _families import class_cond
from PIL import Image

from latentrt.cli import main
from latentrt.families import CLASS_LABEL, FAMILIES, FamilySpec, register_family
from latentrt.runtime.images import read_png_metadata
from latentrt.runtime.pipeline import GenerationRequest, Pipeline, load_pipeline
from latentrt.runtime.serve import GenerationServer, ServerLimits, serve

CLASS_COND = class_cond(CLASS_LABEL)  # a tiny UNet of it has CLASS_LABEL's tiny_config: 10 classes
FAST = ["--steps", "2", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def family() -> Iterator[FamilySpec]:
    """CLASS_COND in the registry for this module only (other modules iterate over the built-in families)."""
    spec = register_family(CLASS_COND)
    yield spec
    FAMILIES.pop(spec.id, None)


@pytest.fixture(scope="module")
def engines(family: FamilySpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ONNX Runtime engines of the family's tiny checkpoint (export parity checked by the export itself)."""
    from latentrt.engines.build import build_engines
    from latentrt.export.onnx import export_model
    from latentrt.reference.tiny import make_tiny

    root = tmp_path_factory.mktemp("class-cond")
    checkpoint = make_tiny(family.name, root / "ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_dir = export_model(checkpoint, root / "onnx")
    return build_engines(onnx_dir, root / "engines", backend="onnxruntime")


@pytest.fixture(scope="module")
def pipe(engines: Path) -> Iterator[Pipeline]:
    pipeline = load_pipeline(engines)
    yield pipeline
    pipeline.close()


def exit_code(argv: list[str]) -> int:
    """`latentrt ARGV`'s exit status; usage errors (argparse) exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def api_image(pipe: Pipeline, **conditioning: Any) -> np.ndarray:
    """The Python API's image for the FAST settings."""
    result = pipe.generate(GenerationRequest(steps=2, seed=3, conditioning=conditioning))
    return np.asarray(result.images[0])


# ---------------------------------------------------------------------------- latentrt generate


def test_generate_takes_a_class_label_and_no_prompt(engines: Path, pipe: Pipeline, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "three.png"
    assert main(["generate", str(engines), "--condition", "class_labels=3", "-o", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (64x64, seed 3)" in printed and "note:" not in printed
    image = np.asarray(Image.open(out))
    settings = json.loads(read_png_metadata(out)["latentrt"])
    assert settings["conditioning"] == {"class_labels": 3} and settings["family"] == "tiny-class-cond"
    assert np.array_equal(image, api_image(pipe, class_labels=3))
    other = api_image(pipe, class_labels=4)
    assert np.abs(other.astype(int) - image.astype(int)).max() > 0  # the label reaches the UNet


def test_a_list_gives_one_image_per_label_and_batch_repeats_one(engines: Path, pipe: Pipeline,
                                                                tmp_path: Path) -> None:
    assert main(["generate", str(engines), "--condition", "class_labels=3,7", "-o", str(tmp_path / "l.png"),
                 *FAST]) == 0
    assert main(["generate", str(engines), "--condition", "class_labels=3", "--batch", "2", "-o",
                 str(tmp_path / "b.png"), *FAST]) == 0
    assert main(["generate", str(engines), "-p", "a cat", "--condition", "class_labels=3", "--batch", "2", "-o",
                 str(tmp_path / "p.png"), *FAST]) == 0  # the prompt is not used (noted); --batch still counts
    assert sorted(os.listdir(tmp_path)) == ["b-0.png", "b-1.png", "l-0.png", "l-1.png", "p-0.png", "p-1.png"]
    listed = [json.loads(read_png_metadata(tmp_path / f"l-{i}.png")["latentrt"]) for i in (0, 1)]
    assert [m["conditioning"] for m in listed] == [{"class_labels": [3, 7]}] * 2 and listed[1]["index"] == 1
    assert json.loads(read_png_metadata(tmp_path / "b-1.png")["latentrt"])["conditioning"] == {"class_labels": [3, 3]}
    assert np.array_equal(np.asarray(Image.open(tmp_path / "l-0.png")), api_image(pipe, class_labels=3))


def test_guidance_with_a_null_class(engines: Path, tmp_path: Path) -> None:
    out = tmp_path / "cfg.png"
    assert main(["generate", str(engines), "--condition", "class_labels=3", "--condition", "negative_class_labels=0",
                 "--guidance", "3", "-o", str(out), *FAST]) == 0
    settings = json.loads(read_png_metadata(out)["latentrt"])
    assert settings["conditioning"] == {"class_labels": 3, "negative_class_labels": 0} and settings["guidance"] == 3


@pytest.mark.parametrize(("argv", "needle"), [
    (["--condition", "class_labels"], "'class_labels' is not NAME=VALUE (e.g. class_labels=3)"),
    (["--condition", "class_labels=cat"], "class_labels='cat': VALUE must be a number"),
    (["--condition", "class_labels=nan"], "VALUE must be a number"),
    (["--condition", "class_labels=3,x"], "VALUE must be a number"),
    (["--condition", 'class_labels="3"'], "VALUE must be a number"),
    (["--condition", "class_labels=[]"], "VALUE must be a number"),
    (["--condition", "bad name=3"], "is not NAME=VALUE"),
    (["--condition", "class_labels=1", "--condition", "class_labels=2"], "--condition class_labels is given twice"),
    (["--condition", "class_labels=1,2", "--batch", "3"], "--batch 3 but --condition class_labels holds 2 values"),
    (["--batch", "2"], "--batch 2 repeats the prompt, but none is given"),
    ([], "this model is class-conditional: give conditioning={'class_labels': N}"),
    pytest.param(["--condition", "class_labels=10"], "conditioning['class_labels'] = 10 is beyond the model's 10 "
                 "classes"),
    (["--condition", "class_labels=2.5"], "must hold class indices"),
    (["--condition", "colour=3"], "tiny-class-cond takes no conditioning value 'colour'"),
    (["--condition", "class_labels=3", "--guidance", "3"], "needs a null class"),
])
def test_bad_conditioning_is_one_line_exit_2(engines: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            argv: list[str], needle: str) -> None:
    out = tmp_path / "x.png"
    assert exit_code(["generate", str(engines), *argv, "-o", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("latentrt generate: error: ") and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_a_text_family_still_needs_a_prompt(onnx_export_dir: Callable[[str], Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = str(onnx_export_dir("sd1"))
    out = str(tmp_path / "x.png")
    assert main(["generate", folder, "-o", out, *FAST]) == 2
    assert capsys.readouterr().err == "latentrt generate: error: sd1 is conditioned on text: give a prompt with " \
                                      "-p/--prompt\n"
    assert main(["generate", folder, "-p", "a fox", "--condition", "class_labels=3", "-o", out, *FAST]) == 2
    assert "sd1 takes no conditioning value 'class_labels'; it takes none" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- latentrt serve


@pytest.fixture(scope="module")
def server(pipe: Pipeline) -> Iterator[GenerationServer]:
    srv = serve(pipe, "127.0.0.1", 0, ServerLimits(max_prompts=4, max_conditioning=2))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def post(url: str, body: object) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/generate", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_takes_conditioning_without_a_prompt(server: GenerationServer, pipe: Pipeline) -> None:
    status, body = post(server.url, {"conditioning": {"class_labels": 3}, "steps": 2, "seed": 3})
    assert status == 200 and body["settings"]["conditioning"] == {"class_labels": 3} and body["notes"] == []
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.size == (64, 64)
    assert json.loads(image.info["latentrt"])["conditioning"] == {"class_labels": 3}
    assert np.array_equal(np.asarray(image.convert("RGB")), api_image(pipe, class_labels=3))
    status, body = post(server.url, {"prompt": "a cat", "conditioning": {"class_labels": [1, 2]}, "steps": 2})
    assert status == 200 and len(body["images"]) == 2
    assert body["notes"] == ["tiny-class-cond has no text encoder: the prompt is not used"]


@pytest.mark.parametrize(("body", "code", "needle"), [
    ({"conditioning": [3]}, 400, "'conditioning' must be an object of input names to values"),
    ({"conditioning": 3}, 400, "'conditioning' must be an object"),
    ({"conditioning": {"class_labels": "3"}}, 400, "conditioning 'class_labels' must be a number or a non-empty list"),
    ({"conditioning": {"class_labels": True}}, 400, "must be a number or a non-empty list of numbers, got true"),
    ({"conditioning": {"class_labels": []}}, 400, "must be a number or a non-empty list of numbers, got []"),
    ({"conditioning": {"class_labels": [1, [2]]}}, 400, "must be a number or a non-empty list of numbers"),
    ({"conditioning": {"class_labels": 2**70}}, 400, "must be a number or a non-empty list of numbers"),
    (b'{"conditioning": {"class_labels": NaN}}', 400, "must be a number or a non-empty list of numbers, got NaN"),
    ({"conditioning": {"class labels": 3}}, 400, "'conditioning' names UNet inputs (e.g. class_labels), got "
                                                  "'class labels'"),
    ({"conditioning": {"class_labels": [1] * 5}}, 413, "conditioning 'class_labels' holds 5 values; at most 4"),
    ({"conditioning": {"a": 1, "b": 2, "c": 3}}, 413, "'conditioning' holds 3 names; at most 2"),
    ({"conditioning": {"colour": 3}}, 400, "tiny-class-cond takes no conditioning value 'colour'"),
    pytest.param({"conditioning": {"class_labels": 10}}, 400, "is beyond the model's 10 classes"),
    ({}, 400, "this model is class-conditional"),
    ({"conditioning": {"class_labels": 3}, "guidance": 3}, 400, "needs a null class"),
])
def test_server_refuses_bad_conditioning(server: GenerationServer, body: object, code: int, needle: str) -> None:
    status, reply = post(server.url, body)
    assert status == code and needle in reply["error"]


def test_a_text_server_still_needs_a_prompt(onnx_export_dir: Callable[[str], Path]) -> None:
    sd1 = load_pipeline(onnx_export_dir("sd1"))
    srv = serve(sd1, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert post(srv.url, {"steps": 2}) == (400, {"error": "the request needs a 'prompt': sd1 is conditioned on "
                                                              "text", "type": "InvalidRequest"})
        status, reply = post(srv.url, {"prompt": "a fox", "conditioning": {"class_labels": 3}, "steps": 2})
        assert status == 400 and "sd1 takes no conditioning value 'class_labels'; it takes none" in reply["error"]
    finally:
        srv.shutdown()
        srv.server_close()
        sd1.close()
