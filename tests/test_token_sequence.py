"""A token sequence through cross-attention (issue 12, item 5b): a layout-to-image shaped family defined in the tests.

Rombach et al. 2022 (sec. 4.3) encode layout boxes as tokens and feed them to the UNet through
cross-attention. The family here is only a spec entry (`register_family`, no text encoder, a KL
autoencoder) around the library's generic kind `token_sequence(8)`: an `encoder_hidden_states` input of
1..8 tokens on a dim of its own, as wide as the UNet's cross_attention_dim, whose values the request
gives directly (`conditioning["encoder_hidden_states"]`, `--condition encoder_hidden_states=file.npy`,
a JSON list in the server), served by the built-in `token_sequence` provider. No library edit names it.

Tolerances:
- the built ONNX Runtime UNet against diffusers' `UNet2DConditionModel` with the same
  `encoder_hidden_states` (fp32, CPU), at 3 and 8 tokens: rtol = atol = 1e-4 (the export's parity check).
- sampling: our pipeline against a plain diffusers loop (the scheduler class from the checkpoint's config
  with `from_config`, `set_timesteps`, `scale_model_input`, the UNet with the same sequences, guidance
  uncond + w (cond - uncond), `scheduler.step`, the diffusers VAE decode and `VaeImageProcessor`; initial
  latents from `randn_tensor` with `torch.Generator("cpu").manual_seed(seed)`): [0, 1] images max |diff|
  per pixel, ONNX Runtime 1e-3, torch 2e-5 (the bounds of tests/test_pipeline.py).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from latentrt.cli import main
from latentrt.errors import InvalidRequest, UnsupportedShape
from latentrt.families import (
    FAMILIES,
    TINY_TOKEN_WIDTH,
    AutoencoderKind,
    AutoencoderSpec,
    DenoiserSpec,
    FamilySpec,
    Prediction,
    SamplerId,
    SamplingDefaults,
    Spacing,
    register_family,
    token_sequence,
)
from latentrt.manifest import ONNX_KIND, read_manifest
from latentrt.runtime.images import read_png_metadata

RTOL = ATOL = 1e-4
IMAGE_TOL = {"onnxruntime": 1e-3, "torch": 2e-5}
TOKENS, WIDTH, SIZE = 8, TINY_TOKEN_WIDTH, 64
NAME = "encoder_hidden_states"
LAYOUT = token_sequence(TOKENS)
LAYOUT_FAMILY = FamilySpec(
    id="tiny-layout", title="Layout-to-image latent diffusion (test family)", text_encoders=(),
    denoiser=DenoiserSpec(Prediction.EPS, (LAYOUT,)), native_size=(SIZE, SIZE), buckets=((SIZE, SIZE),),
    sampling=SamplingDefaults(SamplerId.DDIM, 10, 1.0, Spacing.LEADING),
    autoencoder=AutoencoderSpec(AutoencoderKind.KL, factor=8, latent_channels=4), pipeline_class="DiffusionPipeline",
)


def layout(seed: int, slots: int = 1, tokens: int = 5) -> np.ndarray:
    """(slots, tokens, width) float32 'encoded boxes' (random, seeded)."""
    return np.random.default_rng(seed).standard_normal((slots, tokens, WIDTH)).astype(np.float32)


@pytest.fixture(scope="module")
def family() -> Iterator[FamilySpec]:
    """The layout family registered for this module only (other modules iterate over the families)."""
    spec = register_family(LAYOUT_FAMILY)
    yield spec
    FAMILIES.pop(spec.id)


@pytest.fixture(scope="module")
def checkpoint(family: FamilySpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from latentrt.reference.tiny import make_tiny

    return make_tiny(family.name, tmp_path_factory.mktemp("layout") / "ckpt")


@pytest.fixture(scope="module")
def engines(checkpoint: Path, family: FamilySpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from latentrt.engines.build import build_engines
    from latentrt.export.onnx import export_model

    out = tmp_path_factory.mktemp("layout-engines")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_dir = export_model(checkpoint, out / "onnx")
    m = read_manifest(onnx_dir, ONNX_KIND)
    assert m["family"] == family.name and list(m["components"]) == ["unet", "vae_encoder", "vae_decoder"]
    assert all(len(c["parity"]["checks"]) >= 2 for c in m["components"].values())
    return build_engines(onnx_dir, out / "engines", backend="onnxruntime")


def test_detected_with_a_token_dim_of_its_own(checkpoint: Path, family: FamilySpec) -> None:
    from latentrt.reference.models import detect_family, load_checkpoint
    from latentrt.tensors import describe_shape

    assert detect_family(checkpoint) is family
    loaded = load_checkpoint(checkpoint)
    assert loaded.dims.context_dim == WIDTH and not loaded.tokenizers and loaded.dims.text_hidden == ()
    unet = loaded.ios()["unet"]
    seq = unet.input(NAME)
    assert unet.input_names == ["sample", "timestep", NAME]
    assert describe_shape(seq) == f"(unet_batch, {NAME}_tokens, {WIDTH})" and "sequence" not in unet.dims
    tokens = unet.dims[f"{NAME}_tokens"]
    assert (tokens.min, tokens.opt, tokens.max) == (1, TOKENS, TOKENS)


def test_exported_unet_matches_diffusers_at_any_token_count(checkpoint: Path, engines: Path) -> None:
    from diffusers import UNet2DConditionModel

    built = read_manifest(engines)
    session = ort.InferenceSession(str(engines / built["components"]["unet"]["path"]),
                                   providers=["CPUExecutionProvider"])
    unet: Any = UNet2DConditionModel.from_pretrained(str(checkpoint / "unet")).eval()
    g = torch.Generator().manual_seed(0)
    for batch, tokens in ((1, 3), (2, TOKENS)):
        sample = torch.randn(batch, 4, 8, 8, generator=g)
        t = torch.tensor([999.0, 500.5][:batch])
        context = torch.randn(batch, tokens, WIDTH, generator=g)
        with torch.no_grad():
            ref = unet(sample, t, encoder_hidden_states=context).sample
        got = session.run(None, {"sample": sample.numpy(), "timestep": t.numpy(), NAME: context.numpy()})[0]
        np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def modules(checkpoint: Path) -> tuple[Any, Any]:
    """diffusers' UNet and VAE of the checkpoint, loaded once."""
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(str(checkpoint / "unet")).eval()
    return unet, diffusers.AutoencoderKL.from_pretrained(str(checkpoint / "vae")).eval()


def diffusers_images(checkpoint: Path, modules: tuple[Any, Any], sampler: str, cond: np.ndarray, steps: int,
                     seed: int, guidance: float = 1.0, uncond: np.ndarray | None = None) -> np.ndarray:
    """[0, 1] images (N, H, W, 3) from a plain diffusers loop over the same UNet, the sequences as its context."""
    import diffusers
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils.torch_utils import randn_tensor

    from latentrt.runtime.scheduler_config import SAMPLER_CLASSES

    cls, overrides = SAMPLER_CLASSES[SamplerId(sampler)]
    config = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, cls.name).from_config(config, **overrides)
    unet, vae = modules
    scheduler.set_timesteps(steps)
    g = torch.Generator("cpu").manual_seed(seed)
    latents = randn_tensor((len(cond), 4, SIZE // 8, SIZE // 8), generator=g, dtype=torch.float32)
    latents = latents * scheduler.init_noise_sigma
    cfg = guidance > 1
    context = torch.from_numpy(cond)
    if cfg:
        assert uncond is not None
        context = torch.cat([torch.from_numpy(np.broadcast_to(uncond, cond.shape).copy()), context])
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
            eps = unet(x, t, encoder_hidden_states=context).sample
            if cfg:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents, generator=g).prev_sample
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    return np.asarray(VaeImageProcessor(vae_scale_factor=8).postprocess(decoded, output_type="np"))


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize(("case", "sampler", "slots", "guidance"), [("ddim", "ddim", 2, 1.0),
                                                                      ("euler-cfg", "euler", 1, 3.0)])
def test_sampled_like_a_plain_diffusers_loop(checkpoint: Path, engines: Path, modules: tuple[Any, Any], backend: str,
                                             case: str, sampler: str, slots: int, guidance: float) -> None:
    from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

    cond, uncond = layout(1, slots), np.zeros((1, 5, WIDTH), np.float32)
    conditioning: dict[str, Any] = {NAME: cond.tolist()}  # a JSON-like list: one sequence per slot
    if guidance > 1:
        conditioning[f"negative_{NAME}"] = uncond.tolist()  # one sequence for every slot
    pipe = load_pipeline(engines if backend == "onnxruntime" else checkpoint, backend=backend)
    try:
        ours = pipe.generate(GenerationRequest(conditioning=conditioning, sampler=sampler, steps=3, guidance=guidance,
                                               seed=11, width=SIZE, height=SIZE))
    finally:
        pipe.close()
    ref = diffusers_images(checkpoint, modules, sampler, cond, 3, 11, guidance, uncond)
    assert ours.array is not None and ours.array.shape == ref.shape == (slots, SIZE, SIZE, 3)
    diff = max_diff(ours.array, ref)
    print(f"{case} {backend}: images max |diff| {diff:.2e}")
    assert diff <= IMAGE_TOL[backend]
    other = diffusers_images(checkpoint, modules, sampler, layout(2, slots), 3, 11, guidance, uncond)
    assert max_diff(other, ref) > 10 * diff  # the sequence reaches the UNet


def test_generate_from_the_cli_with_a_npy_file(engines: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

    boxes = tmp_path / "boxes.npy"
    np.save(boxes, layout(3)[0])  # (tokens, width): one sequence
    out = tmp_path / "layout.png"
    assert main(["generate", str(engines), "--condition", f"{NAME}={boxes}", "--steps", "2", "--seed", "3",
                 "--no-progress", "-o", str(out)]) == 0
    assert f"wrote {out} ({SIZE}x{SIZE}, seed 3)" in capsys.readouterr().out
    settings = json.loads(read_png_metadata(out)["latentrt"])
    assert settings["family"] == "tiny-layout" and settings["conditioning"][NAME] == str(boxes)  # the file given
    pipe = load_pipeline(engines)
    try:
        api = pipe.generate(GenerationRequest(conditioning={NAME: layout(3)[0]}, steps=2, seed=3))  # an array
    finally:
        pipe.close()
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api.images[0]))
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros(4))
    # the provider reads the file (as it reads depth maps) and refuses it before any work: one line, exit 2
    assert main(["generate", str(engines), "--condition", f"{NAME}={bad}", "-o", str(out)]) == 2
    assert "give (tokens, width) or (slots, tokens, width) numbers" in capsys.readouterr().err


@pytest.mark.parametrize(("conditioning", "guidance", "error", "needle"), [
    ({}, 1.0, InvalidRequest, f"give conditioning['{NAME}']"),
    ({NAME: layout(0, 1, 5)[:, :, :7].tolist()}, 1.0, InvalidRequest, "tokens 7 wide; this model's cross-attention "
                                                                      f"takes {WIDTH}"),
    ({NAME: layout(0, 1, TOKENS + 1).tolist()}, 1.0, InvalidRequest, f"has {TOKENS + 1} tokens; this model takes 1 "
                                                                     f"to {TOKENS}"),
    ({NAME: layout(0, 1, 5)[0].tolist()}, 1.0, InvalidRequest, "one (tokens, width) sequence per prompt slot (5)"),
    ({NAME: layout(0).tolist()}, 3.0, InvalidRequest, f"needs conditioning['negative_{NAME}']"),
    ({NAME: layout(0).tolist(), f"negative_{NAME}": layout(0, 1, 2).tolist()}, 3.0, InvalidRequest,
     "must have as many tokens"),
    ({NAME: [[[float("nan")] * WIDTH]]}, 1.0, InvalidRequest, "NaN or infinite"),
])
def test_the_provider_checks_the_request(engines: Path, conditioning: dict[str, Any], guidance: float,
                                         error: type[Exception], needle: str) -> None:
    from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

    pipe = load_pipeline(engines)
    try:
        with pytest.raises(error, match=None) as e:
            pipe.generate(GenerationRequest(conditioning=conditioning, guidance=guidance, steps=1, seed=0))
        assert needle in str(e.value)
    finally:
        pipe.close()
    assert not issubclass(error, UnsupportedShape)  # checked before any engine runs, with the input's own words


def test_the_server_takes_a_json_list(engines: Path) -> None:
    from latentrt.runtime.pipeline import GenerationRequest, load_pipeline
    from latentrt.runtime.serve import serve

    pipe = load_pipeline(engines)
    srv = serve(pipe, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        body = json.dumps({"conditioning": {NAME: layout(4).tolist()}, "steps": 2, "seed": 3}).encode()
        req = urllib.request.Request(srv.url + "/generate", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            status, reply = r.status, json.loads(r.read())
        assert status == 200
        image = Image.open(io.BytesIO(base64.b64decode(reply["images"][0])))
        api = pipe.generate(GenerationRequest(conditioning={NAME: layout(4).tolist()}, steps=2, seed=3))
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(api.images[0]))
        bad = json.dumps({"conditioning": {NAME: [[["x"]]]}, "steps": 2}).encode()
        req = urllib.request.Request(srv.url + "/generate", data=bad, method="POST",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=120)
        assert e.value.code == 400
    finally:
        srv.shutdown()
        srv.server_close()
        pipe.close()
