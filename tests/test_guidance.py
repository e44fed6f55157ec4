"""UNet inputs the configs imply: the LCM guidance embedding (`timestep_cond`) and `guidance_rescale`, vs diffusers.

- `timestep_cond`: the tiny `tiny:sd1-lcm` checkpoint (SD 1.x UNet with `time_cond_proj_dim`,
  LCMScheduler, LatentConsistencyModelPipeline). Our embedding vs diffusers'
  `get_guidance_scale_embedding` (max |diff| 0: the same float32 operations); the exported UNet vs
  diffusers' UNet called with `timestep_cond=` (1e-4, measured ~1e-6); our pipeline (Euler, no CFG
  batch: guidance goes in through the embedding) vs diffusers' StableDiffusionPipeline, which feeds
  the same embedding and also drops CFG for such UNets.
- End to end with the checkpoint's LCMScheduler vs LatentConsistencyModelPipeline: images 2/255 per
  pixel, latents 1e-4 x max(1, max|ref|) (measured: images <= 1.2e-6, latents <= 1.9e-5, both backends).
- `guidance_rescale`: our pipeline vs StableDiffusionPipeline(guidance_rescale=0.7) on the tiny
  SD 2 v-prediction checkpoint, with its own schedule and with a zero-terminal-SNR one
  (`rescale_betas_zero_snr`, trailing spacing; Euler and DDIM) (measured: images <= 8e-6, latents <= 2e-5).

Pipeline tolerances as tests/test_pipeline.py: images 2e-5 (torch) / 1e-3 (onnxruntime), latents
1e-5 / 1e-3 x max(1, max|ref|).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from latentrt.cli import main
from latentrt.engines.profiles import plan_profiles
from latentrt.errors import InvalidRequest
from latentrt.runtime.conditioning import guidance_embedding
from latentrt.runtime.images import read_png_metadata
from latentrt.runtime.pipeline import GenerationRequest, GenerationResult, Pipeline, load_pipeline
from latentrt.runtime.serve import request_from_json
from latentrt.tensors import TIMESTEP_COND, component_ios, dummy_inputs, dynamic_axes

BACKENDS = ("onnxruntime", "torch")
IMAGE_TOL = {"onnxruntime": 1e-3, "torch": 2e-5}
LATENT_TOL = {"onnxruntime": 1e-3, "torch": 1e-5}
# Zero-SNR Euler starts at sigma ~4096 (alphas_cumprod[-1] = 2^-24): float32 rounding of the first steps, summed in
# another kernel order than diffusers', is amplified by that scale. Measured 7.3e-5 x max|ref| on an AMX Xeon
# (torch backend; within 1e-5 on the AMD Zen 4 machine before): the latent bound for that case is 1e-4, images unchanged.
ZERO_SNR_EULER_LATENT_TOL = 1e-4
LCM = "sd1-lcm"
LCM_IMAGE_TOL = 2 / 255  # per pixel, [0, 1] images (measured <= 1.2e-6 on both backends)
LCM_LATENT_TOL = 1e-4  # x max(1, max|ref|) (measured <= 1.9e-5: H2's sampler orders the float32 maths differently)


@functools.cache
def diffusers_pipe(folder: str, cls: str = "StableDiffusionPipeline", scheduler: str | None = None) -> Any:
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def ours(folder: str, backend: str) -> Pipeline:
    return load_pipeline(folder, backend=backend)


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def check_match(result: GenerationResult, ref_images: Any, ref_latents: Any, backend: str,
                latent_tol: float | None = None) -> None:
    assert result.array is not None and result.array.shape == ref_images.shape
    scale = max(1.0, float(ref_latents.abs().max()))
    tol = LATENT_TOL[backend] if latent_tol is None else max(latent_tol, LATENT_TOL[backend])
    assert max_diff(result.latents, ref_latents) <= tol * scale
    assert max_diff(result.array, ref_images) <= IMAGE_TOL[backend]


# ---------------------------------------------------------------------------- LCM guidance embedding


@pytest.mark.parametrize("dim", [32, 256, 17])
@pytest.mark.parametrize("guidance", [0.0, 1.0, 1.5, 8.5])
def test_guidance_embedding_matches_diffusers(guidance: float, dim: int,
                                              tiny_checkpoint: Callable[[str], Path]) -> None:
    ref = diffusers_pipe(str(tiny_checkpoint(LCM)), "LatentConsistencyModelPipeline")
    w = torch.tensor(guidance - 1).repeat(3)
    expected = ref.get_guidance_scale_embedding(w, embedding_dim=dim)
    got = guidance_embedding(guidance, dim, 3)
    assert got.shape == expected.shape == (3, dim) and got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_lcm_checkpoint_describes_timestep_cond(tiny_checkpoint: Callable[[str], Path]) -> None:
    from latentrt.reference.models import load_checkpoint

    folder = tiny_checkpoint(LCM)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline" and index["scheduler"][1] == "LCMScheduler"
    loaded = load_checkpoint(f"tiny:{LCM}")
    assert loaded.spec.id.value == "sd1" and loaded.dims.time_cond_proj_dim == 32
    ios = component_ios(loaded.spec, loaded.dims)
    unet = ios["unet"]
    assert unet.input_names[-1] == TIMESTEP_COND and unet.input(TIMESTEP_COND).shape[1] == 32
    assert dynamic_axes(unet)[TIMESTEP_COND] == {0: "unet_batch"}
    assert dummy_inputs(unet, {"unet_batch": 3})[TIMESTEP_COND].shape == (3, 32)
    plan = plan_profiles(loaded.spec, ios, sizes=[(512, 512)], batch=(1, 4), strategy="dynamic")
    assert not plan.cfg  # guidance goes in through the embedding: no doubled UNet batch to plan for
    assert plan.profiles[0].shapes["unet"][TIMESTEP_COND] == ((1, 32), (1, 32), (4, 32))
    plain = load_checkpoint("tiny:sd1")
    assert TIMESTEP_COND not in component_ios(plain.spec, plain.dims)["unet"].input_names


def test_lcm_unet_export_matches_diffusers(onnx_export_dir: Callable[[str], Path],
                                           tiny_checkpoint: Callable[[str], Path]) -> None:
    """The exported UNet takes `timestep_cond` and computes what diffusers' UNet does with it as a keyword."""
    import onnxruntime as ort
    from diffusers import UNet2DConditionModel

    folder = onnx_export_dir(LCM)
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["components"]["unet"]
    session = ort.InferenceSession(str(folder / entry["path"]), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert inputs[TIMESTEP_COND][1] == 32
    unet = UNet2DConditionModel.from_pretrained(str(tiny_checkpoint(LCM) / "unet")).eval()
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, 154, 32, generator=g)
    timestep = torch.tensor([901.0, 421.0])
    outs = []
    for guidance in (8.5, 2.0):
        cond = guidance_embedding(guidance, 32, 2)
        with torch.no_grad():
            ref = unet(sample, timestep, context, timestep_cond=cond).sample.numpy()
        got = session.run(None, {"sample": sample.numpy(), "timestep": timestep.numpy(),
                                 "encoder_hidden_states": context.numpy(), TIMESTEP_COND: cond.numpy()})[0]
        assert max_diff(got, ref) <= 1e-4
        outs.append(got)
    assert max_diff(outs[0], outs[1]) > 1e-3  # the embedding reaches the output


@pytest.mark.parametrize("backend", BACKENDS)
def test_lcm_unet_feed_matches_diffusers(backend: str, onnx_export_dir: Callable[[str], Path],
                                         tiny_checkpoint: Callable[[str], Path]) -> None:
    """Guidance 8.5 on an LCM UNet: one UNet call per step (no CFG batch) fed diffusers' embedding of w - 1."""
    folder = str(tiny_checkpoint(LCM))
    request = dict(prompt=["a red fox", "a blue bird"], steps=3, guidance=8.5, width=64, height=64, seed=7)
    result = ours(str(onnx_export_dir(LCM)), backend).generate(GenerationRequest(**request, sampler="euler"))  # type: ignore[arg-type]
    ref = diffusers_pipe(folder, scheduler="EulerDiscreteScheduler")
    kw = dict(prompt=request["prompt"], num_inference_steps=3, guidance_scale=8.5, height=64, width=64)
    images = ref(**kw, generator=torch.Generator().manual_seed(7), output_type="np").images
    latents = ref(**kw, generator=torch.Generator().manual_seed(7), output_type="latent").images
    check_match(result, images, latents, backend)
    assert result.timing.summary()["unet"].count == 3
    other = ours(str(onnx_export_dir(LCM)), backend).generate(
        GenerationRequest(**{**request, "guidance": 2.0}, sampler="euler"))  # type: ignore[arg-type]
    assert other.array is not None and max_diff(other.array, images) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("steps", "guidance"), [(4, 8.5), (1, 1.5)])
def test_lcm_end_to_end_matches_diffusers(steps: int, guidance: float, backend: str,
                                          onnx_export_dir: Callable[[str], Path],
                                          tiny_checkpoint: Callable[[str], Path]) -> None:
    """The checkpoint's own LCMScheduler (sampler None -> lcm) vs LatentConsistencyModelPipeline, end to end."""
    ref = diffusers_pipe(str(tiny_checkpoint(LCM)), "LatentConsistencyModelPipeline")
    prompts = ["a red fox", "a blue bird"]
    kw = dict(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64)
    images = ref(**kw, generator=torch.Generator().manual_seed(3), output_type="np").images
    latents = ref(**kw, generator=torch.Generator().manual_seed(3), output_type="latent").images
    result = ours(str(onnx_export_dir(LCM)), backend).generate(
        GenerationRequest(prompts, steps=steps, guidance=guidance, width=64, height=64, seed=3))
    assert result.settings["sampler"] == "lcm" and result.timing.summary()["unet"].count == steps
    assert result.array is not None and result.array.shape == images.shape
    assert max_diff(result.array, images) <= LCM_IMAGE_TOL
    assert max_diff(result.latents, latents) <= LCM_LATENT_TOL * max(1.0, float(latents.abs().max()))
    pil = np.stack([np.asarray(im) for im in result.images]).astype(np.int16)
    assert np.abs(pil - (images * 255).round().astype(np.int16)).max() <= 1


# ---------------------------------------------------------------------------- guidance_rescale


ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}  # Lin et al. 2023's recipe


@functools.cache
def zero_snr_pipeline(folder: str, backend: str) -> Pipeline:
    """Our pipeline with the checkpoint's scheduler config switched to a zero-terminal-SNR schedule."""
    pipe = load_pipeline(folder, backend=backend)
    pipe.engines.scheduler_config = dict(pipe.engines.scheduler_config, **ZERO_SNR)
    return pipe


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("sampler", "scheduler", "zero_snr"), [("euler", "EulerDiscreteScheduler", False),
                                                              ("euler", "EulerDiscreteScheduler", True),
                                                              ("ddim", "DDIMScheduler", True)])
def test_guidance_rescale_matches_diffusers(sampler: str, scheduler: str, zero_snr: bool, backend: str,
                                            onnx_export_dir: Callable[[str], Path],
                                            tiny_checkpoint: Callable[[str], Path]) -> None:
    """guidance_rescale=0.7 on the v-prediction model, with its own schedule and with a zero-SNR one."""
    import diffusers

    export = str(onnx_export_dir("sd2-v"))
    pipe = zero_snr_pipeline(export, backend) if zero_snr else ours(export, backend)
    request = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", steps=3, guidance=7.5, width=64,
                   height=64, seed=21, sampler=sampler)
    result = pipe.generate(GenerationRequest(**request, guidance_rescale=0.7))  # type: ignore[arg-type]
    ref = diffusers_pipe(str(tiny_checkpoint("sd2-v")))
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config, **(ZERO_SNR if zero_snr else {}))
    kw = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", num_inference_steps=3, guidance_scale=7.5,
              height=64, width=64, guidance_rescale=0.7)
    images = ref(**kw, generator=torch.Generator().manual_seed(21), output_type="np").images
    latents = ref(**kw, generator=torch.Generator().manual_seed(21), output_type="latent").images
    check_match(result, images, latents, backend,
                ZERO_SNR_EULER_LATENT_TOL if zero_snr and sampler == "euler" else None)
    assert result.settings["guidance_rescale"] == 0.7
    plain = pipe.generate(GenerationRequest(**request))  # type: ignore[arg-type]
    assert plain.array is not None and max_diff(plain.array, images) > 1e-4


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_guidance_rescale_is_validated(value: float, onnx_export_dir: Callable[[str], Path]) -> None:
    pipe = ours(str(onnx_export_dir("sd2-v")), "onnxruntime")
    with pytest.raises(InvalidRequest, match=r"guidance_rescale must be in \[0, 1\]"):
        pipe.resolve(GenerationRequest("a cat", guidance_rescale=value))


@pytest.mark.parametrize("field, value, message", [
    ("guidance_rescale", "abc", "guidance_rescale must be a number"),
    ("guidance_rescale", [0.5], "guidance_rescale must be a number"),
    ("prompt_weighting", "no", "prompt_weighting must be True or False"),
])
def test_new_fields_of_the_python_api_are_typed(field: str, value: Any,
                                                message: str, onnx_export_dir: Callable[[str], Path]) -> None:
    """A wrong type from the Python API is one InvalidRequest (was: a ValueError / TypeError traceback)."""
    pipe = ours(str(onnx_export_dir("sd1")), "onnxruntime")
    with pytest.raises(InvalidRequest, match=message):
        pipe(prompt="a cat", steps=1, width=64, height=64, **{field: value})


def test_cli_and_server_take_the_new_fields(onnx_export_dir: Callable[[str], Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = onnx_export_dir("sd2-v")
    out = tmp_path / "x.png"
    args = ["generate", str(folder), "-p", "a (red:1.3) boat", "--steps", "1", "--width", "64", "--height", "64",
            "--seed", "2", "-o", str(out), "--no-progress"]
    assert main([*args, "--guidance-rescale", "0.5", "--prompt-weighting"]) == 0 and out.is_file()
    settings = json.loads(read_png_metadata(out)["latentrt"])
    assert settings["guidance_rescale"] == 0.5 and settings["prompt_weighting"] is True
    capsys.readouterr()
    assert main([*args, "--guidance-rescale", "2"]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "guidance_rescale must be in [0, 1]" in err[0]
    request = request_from_json({"prompt": "a (red) boat", "guidance_rescale": 0.7, "prompt_weighting": True})
    assert request.guidance_rescale == 0.7 and request.prompt_weighting is True
    with pytest.raises(InvalidRequest, match="'prompt_weighting' must be true or false"):
        request_from_json({"prompt": "a boat", "prompt_weighting": "yes"})
