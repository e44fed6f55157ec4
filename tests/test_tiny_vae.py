"""The tiny VAE decoder (TAESD; diffusers `AutoencoderTiny`): export, ONNX Runtime build, generation, refusals.

The tiny VAE is a random-weight diffusers AutoencoderTiny (8 channels, latent_channels 4, factor 8) saved
with `save_pretrained` and read through `latentrt.reference.tiny_vae`, as a user's madebyollin/taesd folder is.
Its config says scaling_factor 1.5 (taesd's is 1.0), so matching diffusers, which decodes
latents / vae.config.scaling_factor, shows that the tiny VAE's own factor is honoured (not the model VAE's).

What is compared with what, and the tolerances (max |diff|):
- export: `tiny_vae_decoder` ONNX Runtime vs PyTorch at the export's parity shapes: 1e-4 (the export's own
  check, `latentrt.export.onnx.TOLERANCE`; the recorded values are read back from the manifest).
- generation vs diffusers' StableDiffusionPipeline loaded from the same tiny sd1 folder with
  `vae=AutoencoderTiny.from_pretrained(<tiny VAE folder>)`, same prompt, seed, steps and sampler, on the
  [0, 1] image: ONNX Runtime engines 1e-3, the torch backend 2e-5 (the bounds of tests/test_pipeline.py);
  the PNG written by `latentrt generate --tiny-vae` vs diffusers' image rounded to uint8: 1.
- OpenVINO (fp32, skipped without openvino): the built tiny decoder vs diffusers' AutoencoderTiny.decode on the
  same latents: 1e-4 (the export parity bound).
Measured: export parity 1.2e-7, ONNX Runtime 2.4e-7, torch 2.4e-7 (the same latents; not bit-exact for the
prompt batching noted in tests/test_pipeline.py), PNG 0.
Refusals: a tiny VAE whose latent_channels differ from the model's, a folder that is not an AutoencoderTiny,
config keys LatentRT cannot honour (named), and engines without the component (API and CLI).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from latentrt.cli import main
from latentrt.errors import CheckpointError, MissingComponent
from latentrt.families import SamplerId
from latentrt.manifest import read_manifest
from latentrt.reference.tiny_vae import check_config, make_tiny_vae
from latentrt.runtime.pipeline import GenerationRequest, GenerationResult, load_pipeline
from latentrt.runtime.scheduler_config import SAMPLER_CLASSES
from latentrt.runtime.timing import StageTimer
from latentrt.tiny_vae import TINY_VAE_DECODER

EXPORT_TOL = 1e-4
IMAGE_TOL = {"onnxruntime": 1e-3, "torch": 2e-5}
SCALING_FACTOR = 1.5
PROMPT = "a photo of an astronaut riding a horse"
SETTINGS: dict[str, Any] = dict(prompt=PROMPT, steps=2, guidance=7.5, sampler="euler", width=64, height=64, seed=7)
FAMILY_COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("taesd") / "taesd", scaling_factor=SCALING_FACTOR)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tiny_vae_dir: Path) -> dict[str, Path]:
    """tiny:sd1 exported (CLI) and built for ONNX Runtime ("plain"), then the tiny VAE added to the export
    (`--components tiny_vae_decoder --tiny-vae`) and to a copy of those engines (`build --components
    tiny_vae_decoder`: the others are kept) ("engines"): {"export", "plain", "engines"}."""
    from latentrt.engines.build import build_engines

    root = tmp_path_factory.mktemp("tiny-vae")
    export = root / "onnx"
    assert main(["export", "tiny:sd1", "-o", str(export), "--no-verify"]) == 0  # the tiny decoder's parity is checked
    plain = build_engines(export, root / "plain", verify=False)
    assert main(["export", "tiny:sd1", "-o", str(export), "--components", TINY_VAE_DECODER,
                 "--tiny-vae", str(tiny_vae_dir)]) == 0
    engines = build_engines(export, shutil.copytree(plain, root / "engines"), components=[TINY_VAE_DECODER])
    return {"export": export, "plain": plain, "engines": engines}


@pytest.fixture(scope="module")
def diffusers_image(tiny_checkpoint: Callable[[str], Path], tiny_vae_dir: Path) -> np.ndarray:
    """diffusers' StableDiffusionPipeline with vae=AutoencoderTiny: (1, 64, 64, 3) in [0, 1]."""
    import diffusers

    vae = diffusers.AutoencoderTiny.from_pretrained(str(tiny_vae_dir))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_checkpoint("sd1")), vae=vae)
    pipe.set_progress_bar_config(disable=True)
    cls, overrides = SAMPLER_CLASSES[SamplerId(SETTINGS["sampler"])]
    pipe.scheduler = getattr(diffusers, cls.name).from_config(pipe.scheduler.config, **overrides)
    out: Any = pipe(PROMPT, num_inference_steps=SETTINGS["steps"], guidance_scale=SETTINGS["guidance"], height=64,
                    width=64, generator=torch.Generator("cpu").manual_seed(SETTINGS["seed"]), output_type="np")
    return np.asarray(out.images)


def generate(folder: Path, backend: str, **kwargs: Any) -> GenerationResult:
    pipe = load_pipeline(folder, backend=backend)
    try:
        return pipe.generate(GenerationRequest(**(SETTINGS | kwargs)))
    finally:
        pipe.close()


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_export_records_the_tiny_decoder(folders: dict[str, Path], tiny_vae_dir: Path) -> None:
    """The added component keeps the export's other components, has the VAE decoder's IO and passed parity."""
    manifest = read_manifest(folders["export"])
    components = manifest["components"]
    assert list(components) == [*FAMILY_COMPONENTS, TINY_VAE_DECODER]
    assert manifest["tiny_vae"] == {**manifest["tiny_vae"], "source": str(tiny_vae_dir.resolve()),
                                    "scaling_factor": SCALING_FACTOR, "latent_channels": 4, "scale_factor": 8}
    tiny, vae = components[TINY_VAE_DECODER], components["vae_decoder"]
    assert {**tiny["io"], "component": "vae_decoder"} == vae["io"]
    diffs = [d for check in tiny["parity"]["checks"] for d in check["max_abs_diff"].values()]
    print(f"tiny_vae_decoder export parity: max |diff| {max(diffs):.1e} over {len(diffs)} shapes")
    assert len(diffs) >= 2 and max(diffs) <= EXPORT_TOL
    engines, plain = read_manifest(folders["engines"]), read_manifest(folders["plain"])
    assert list(engines["components"]) == list(components) and engines["tiny_vae"] == manifest["tiny_vae"]
    assert all(engines["components"][c]["cache_key"] == plain["components"][c]["cache_key"]
               for c in FAMILY_COMPONENTS)  # kept, not rebuilt


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_generate_matches_diffusers(folders: dict[str, Path], diffusers_image: np.ndarray, backend: str) -> None:
    """ONNX Runtime engines, and the torch backend on the export (its recorded AutoencoderTiny), vs diffusers."""
    folder = folders["engines"] if backend == "onnxruntime" else folders["export"]
    ours = generate(folder, backend, tiny_vae=True)
    assert ours.array is not None and ours.array.shape == diffusers_image.shape == (1, 64, 64, 3)
    diff = max_diff(ours.array, diffusers_image)
    print(f"tiny VAE {backend}: images max |diff| {diff:.1e}")
    assert diff <= IMAGE_TOL[backend]
    stages = ours.timing.stages()
    assert TINY_VAE_DECODER in stages and "vae_decoder" not in stages and ours.settings["tiny_vae"] is True
    pipe = load_pipeline(folder, backend=backend)  # the same latents through the model's own VAE decoder differ
    try:
        full = pipe.decode(ours.latents, StageTimer(pipe.device))
    finally:
        pipe.close()
    assert max_diff((full / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), ours.array) > 1e-2


def test_openvino_builds_the_tiny_decoder(folders: dict[str, Path], tiny_vae_dir: Path, tmp_path: Path) -> None:
    """`latentrt build --backend openvino` builds the component like any other (only it here: OpenVINO builds are
    slow on 2 cores); its compiled model decodes as diffusers' AutoencoderTiny.decode."""
    pytest.importorskip("openvino")
    import diffusers

    from latentrt.engines.build import build_engines
    from latentrt.runtime.backends.openvino import OpenVinoEngine
    from latentrt.tensors import IMAGES, LATENT, io_from_json

    out = build_engines(folders["export"], tmp_path / "openvino", backend="openvino", components=[TINY_VAE_DECODER])
    entry = read_manifest(out)["components"][TINY_VAE_DECODER]
    engine = OpenVinoEngine(out / entry["path"], io_from_json(entry["io"]))
    latents = torch.randn((2, 4, 8, 16), generator=torch.Generator().manual_seed(0))
    got = engine.run({LATENT: latents})[IMAGES]
    engine.close()
    with torch.no_grad():
        ref = diffusers.AutoencoderTiny.from_pretrained(str(tiny_vae_dir)).decode(latents, return_dict=False)[0]
    assert got.shape == ref.shape == (2, 3, 64, 128) and max_diff(got, ref) <= EXPORT_TOL


def test_cli_generate_with_tiny_vae(folders: dict[str, Path], diffusers_image: np.ndarray, tmp_path: Path) -> None:
    out = tmp_path / "taesd.png"
    argv = ["generate", str(folders["engines"]), "-p", PROMPT, "--steps", "2", "--guidance", "7.5", "--sampler",
            "euler", "--width", "64", "--height", "64", "--seed", "7", "--tiny-vae", "--no-progress", "-o", str(out)]
    assert main(argv) == 0
    png = np.asarray(Image.open(out).convert("RGB")).astype(np.int16)
    assert np.abs(png - (diffusers_image[0] * 255).round().astype(np.int16)).max() <= 1


def test_engines_without_the_tiny_decoder_are_refused(folders: dict[str, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(MissingComponent, match=f"no {TINY_VAE_DECODER}.*--tiny-vae"):
        generate(folders["plain"], "onnxruntime", tiny_vae=True)
    argv = ["generate", str(folders["plain"]), "-p", PROMPT, "--steps", "1", "--width", "64", "--height", "64",
            "--tiny-vae", "--no-progress", "-o", str(tmp_path / "x.png")]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and TINY_VAE_DECODER in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "x.png").exists()


def test_mismatched_latent_channels_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny VAE of another latent space (3 channels; taesd3 / taef1 have 16) is refused before any export."""
    wrong = make_tiny_vae(tmp_path / "taesd3", latent_channels=3)
    out = tmp_path / "onnx"
    assert main(["export", "tiny:sd1", "-o", str(out), "--tiny-vae", str(wrong)]) != 0
    err = capsys.readouterr().err
    assert "latent_channels 3 do not match the model's 4" in err and not out.exists()


def test_other_autoencoders_are_refused(tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    """The model's own AutoencoderKL folder, and a folder without a config, are not tiny VAEs."""
    from latentrt.export.onnx import export_model

    with pytest.raises(CheckpointError, match="'AutoencoderKL', not a diffusers AutoencoderTiny"):
        export_model("tiny:sd1", tmp_path / "a", tiny_vae=tiny_checkpoint("sd1") / "vae")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json: not a diffusers AutoencoderTiny folder"):
        export_model("tiny:sd1", tmp_path / "b", tiny_vae=tmp_path / "empty")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_hub_ids_take_the_hub_path_and_the_component_needs_its_source(tmp_path: Path) -> None:
    """A hub id goes through the checkpoints' hub download (offline here: a clear CheckpointError); naming the
    component in --components without --tiny-vae is refused."""
    from latentrt.export.onnx import export_model

    with pytest.raises(CheckpointError, match="cannot fetch 'latentrt-tests/no-such-taesd-0'"):
        export_model("tiny:sd1", tmp_path / "a", tiny_vae="latentrt-tests/no-such-taesd-0")
    with pytest.raises(CheckpointError, match="add --tiny-vae"):
        export_model("tiny:sd1", tmp_path / "b", components=[TINY_VAE_DECODER])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(("key", "value", "named"), [
    ("shift_factor", 0.1, "shift_factor 0.1 is not supported"),
    ("latents_mean", [0.0] * 4, "latents_mean is not supported"),
    ("tile_size", 256, "config key(s) tile_size are not supported"),
    ("out_channels", 4, "out_channels 4 is not supported"),
    ("upsampling_scaling_factor", 3, "decodes 27 pixels per latent"),
    ("scaling_factor", 0.0, "scaling_factor 0.0 should be a positive number"),
])
def test_config_keys_not_honoured_are_named(tiny_vae_dir: Path, key: str, value: Any, named: str) -> None:
    config = json.loads((tiny_vae_dir / "config.json").read_text())
    assert check_config(config, "taesd", 4, 8) == SCALING_FACTOR
    with pytest.raises(CheckpointError, match=named.replace("(", r"\(").replace(")", r"\)")):
        check_config({**config, key: value}, "taesd", 4, 8)


def test_copied_folder_keeps_working(tiny_vae_dir: Path, tmp_path: Path) -> None:
    """A tiny VAE folder with extra files (README, a second config) is hashed on its config and weights only."""
    from latentrt.reference.tiny_vae import locate_tiny_vae

    copy = tmp_path / "copy"
    shutil.copytree(tiny_vae_dir, copy)
    (copy / "README.md").write_text("TAESD")
    assert locate_tiny_vae(copy, 4, 8).spec.sha256 == locate_tiny_vae(tiny_vae_dir, 4, 8).spec.sha256


def test_served_over_http(folders: dict[str, Path], diffusers_image: np.ndarray) -> None:
    """`latentrt serve` takes `tiny_vae` over the wire: a real server on 127.0.0.1, the same image as diffusers."""
    import base64
    import io
    import threading
    import urllib.request

    from latentrt.runtime.serve import serve

    pipe = load_pipeline(folders["engines"], backend="onnxruntime")
    srv = serve(pipe, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        body = json.dumps({**SETTINGS, "tiny_vae": True}).encode()
        req = urllib.request.Request(srv.url + "/generate", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.loads(r.read())
    finally:
        srv.shutdown()
        srv.server_close()
        pipe.close()
    assert reply["settings"]["tiny_vae"] is True and TINY_VAE_DECODER in reply["timing"]["summary"]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(reply["images"][0]))).convert("RGB"), dtype=np.int16)
    assert np.abs(image - (diffusers_image[0] * 255).round().astype(np.int16)).max() <= 1
