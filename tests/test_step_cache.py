"""Step caching (DeepCache, arXiv:2312.00858): reference split, export, runtime schedule, refusals.

What is compared with what, and the tolerances (max |diff|):
- reference: the full pass's noise prediction vs diffusers' own `UNet2DConditionModel.forward`, and the
  shallow pass fed the same step's feature vs forward: 1e-6 (measured 0: the same ops in the same order),
  for tiny SD 1.x / SDXL UNets and a 3-level UNet split at depths 1 and 2, with latents that are not a
  multiple of the upsampling factor (diffusers' `upsample_size` path).
- export: each component's ONNX Runtime vs PyTorch parity as every export checks it (1e-4); the step-cache
  export's `unet` noise output vs the plain export's `unet` on one feed: 1e-5 (measured ~1e-6).
- pipeline, N=1 (no caching) on the step-cache export vs the diffusers pipeline with the same weights,
  seed and sampler: the bounds of tests/test_pipeline.py for onnxruntime (images and latents 1e-3;
  measured ~1e-6), and vs our plain export's image: 1e-4.
- pipeline, N=2 and 3: the UNet calls split as the uniform schedule says (StageTimer counts of `unet` and
  `unet_shallow`), the image differs from N=1 (the cache is used), and ONNX Runtime agrees with the
  PyTorch reference backend (which splits the checkpoint's UNet itself) within the onnxruntime bound 1e-3.
  The shallow part is the cheaper graph: fewer nodes and weights than the full UNet.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from latentrt.errors import InvalidRequest, StaleArtifact
from latentrt.manifest import MANIFEST, read_manifest
from latentrt.reference.step_cache import step_cache_modules, step_cache_spec
from latentrt.runtime.backends.onnxruntime import OrtEngine
from latentrt.runtime.pipeline import GenerationRequest, GenerationResult, load_pipeline
from latentrt.step_cache import DEEP_FEATURE, SHALLOW
from latentrt.tensors import OUT_SAMPLE, dummy_inputs, io_from_json

REFERENCE_TOL = 1e-6
EXPORT_TOL = 1e-5
ORT_TOL = 1e-3  # tests/test_pipeline.py's onnxruntime bound (images and latents)
PROMPT = "a photo of an astronaut riding a horse"


@pytest.fixture(scope="module")
def step_cache_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny:sd1 exported with --step-cache (every component, parity checked)."""
    from latentrt.export.onnx import export_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_model("tiny:sd1", tmp_path_factory.mktemp("step-cache") / "sd1", step_cache=1)


def run(folder: Path | str, backend: str = "onnxruntime", **kwargs: Any) -> GenerationResult:
    settings: dict[str, Any] = dict(prompt=PROMPT, steps=6, guidance=7.5, sampler="euler", width=64, height=64,
                                    seed=7) | kwargs
    pipe = load_pipeline(folder, backend=backend)
    try:
        return pipe.generate(GenerationRequest(**settings))
    finally:
        pipe.close()


def calls(result: GenerationResult, stage: str) -> int:
    summary = result.timing.summary()
    return summary[stage].count if stage in summary else 0


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ---------------------------------------------------------------------------- reference split


def three_level_unet() -> Any:
    """A 3-level SD-style UNet (cross-attention at the outer levels), so depth 2 has a block to keep."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).eval()


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("size", [(8, 8), (10, 14)])  # 10x14: not a multiple of 4, diffusers' upsample_size path
def test_reference_split_matches_diffusers_forward(depth: int, size: tuple[int, int]) -> None:
    unet = three_level_unet()
    full, shallow = step_cache_modules(unet, ["encoder_hidden_states"], depth)
    g = torch.Generator().manual_seed(1)
    sample, context = torch.randn(2, 4, *size, generator=g), torch.randn(2, 7, 16, generator=g)
    timestep = torch.tensor([999.0, 41.5])
    with torch.no_grad():
        expected = unet(sample, timestep, encoder_hidden_states=context).sample
        out, feature = full(sample, timestep, context)
        (again,) = shallow(sample, timestep, context, feature)
    assert feature.shape[1] == step_cache_spec(unet, depth).channels == unet.config.block_out_channels[depth]
    assert max_diff(out, expected) <= REFERENCE_TOL
    assert max_diff(again, expected) <= REFERENCE_TOL


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_reference_split_of_tiny_families(family: str) -> None:
    """SDXL adds text_embeds / time_ids (added_cond_kwargs): the split's time embedding must include them."""
    from latentrt.reference.models import load_checkpoint
    from latentrt.reference.step_cache import unet_step_cache_keywords
    from latentrt.reference.wrappers import wrap

    loaded = load_checkpoint(f"tiny:{family}")
    io = loaded.ios()["unet"]
    full, shallow = step_cache_modules(loaded.modules["unet"], unet_step_cache_keywords(loaded))
    feed = dummy_inputs(io, {"unet_batch": 2, "latent_height": 8, "latent_width": 16}, seed=3)
    args = [torch.from_numpy(feed[n]) for n in io.input_names]
    with torch.no_grad():
        (plain,) = wrap("unet", loaded)(*args)
        out, feature = full(*args)
        (again,) = shallow(*args, feature)
    assert max_diff(out, plain) <= REFERENCE_TOL and max_diff(again, plain) <= REFERENCE_TOL


def test_depth_out_of_range_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="depth must be a whole number in"):
        step_cache_modules(three_level_unet(), ["encoder_hidden_states"], 3)


# ---------------------------------------------------------------------------- export


def test_export_adds_shallow_component_and_record(step_cache_export: Path) -> None:
    manifest = read_manifest(step_cache_export)
    components = manifest["components"]
    assert list(components) == ["text_encoder", "unet", "vae_encoder", "vae_decoder", SHALLOW]
    assert manifest["step_cache"] == {"depth": 1, "channels": 64}  # tiny sd1: block_out_channels (32, 64)
    unet, shallow = io_from_json(components["unet"]["io"]), io_from_json(components[SHALLOW]["io"])
    assert unet.output_names == [OUT_SAMPLE, DEEP_FEATURE]
    assert shallow.input_names == [*unet.input_names, DEEP_FEATURE] and shallow.output_names == [OUT_SAMPLE]
    for name in ("unet", SHALLOW):
        checks = components[name]["parity"]["checks"]
        assert checks and all(d <= 1e-4 for c in checks for d in c["max_abs_diff"].values())
    # the shallow part is the cheaper graph (tiny sd1 has only 2 levels, so the outer one is a large share:
    # measured 469 vs 716 nodes, 0.9 vs 3.3 MB of weights)
    import onnx

    full_model = onnx.load(str(step_cache_export / components["unet"]["path"]))
    shallow_model = onnx.load(str(step_cache_export / components[SHALLOW]["path"]))
    assert len(shallow_model.graph.node) < 0.8 * len(full_model.graph.node)
    assert components[SHALLOW]["size_mb"] < 0.5 * components["unet"]["size_mb"]


def test_export_full_noise_equals_plain_unet(step_cache_export: Path, onnx_export_dir: Callable[[str], Path]) -> None:
    plain_dir = onnx_export_dir("sd1")
    entries = read_manifest(step_cache_export)["components"], read_manifest(plain_dir)["components"]
    full = OrtEngine(step_cache_export / entries[0]["unet"]["path"], io_from_json(entries[0]["unet"]["io"]))
    plain = OrtEngine(plain_dir / entries[1]["unet"]["path"], io_from_json(entries[1]["unet"]["io"]))
    feed = dummy_inputs(plain.io, {"unet_batch": 2, "latent_height": 8, "latent_width": 16, "sequence": 77}, seed=5)
    got, expected = full.run_numpy(feed), plain.run_numpy(feed)
    assert max_diff(got[OUT_SAMPLE], expected[OUT_SAMPLE]) <= EXPORT_TOL


def test_export_needs_the_unet(tmp_path: Path) -> None:
    from latentrt.export.onnx import export_model

    with pytest.raises(InvalidRequest, match="include unet in --components"):
        export_model("tiny:sd1", tmp_path / "x", components=["vae_decoder"], step_cache=1)
    assert not (tmp_path / "x").exists()


def test_manifest_without_record_is_refused(step_cache_export: Path, tmp_path: Path) -> None:
    """unet_shallow (and the unet's extra output) are only valid with the manifest's step_cache record."""
    copy = tmp_path / "edited"
    shutil.copytree(step_cache_export, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["step_cache"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StaleArtifact, match="unet_shallow"):
        read_manifest(copy)


# ---------------------------------------------------------------------------- runtime


def diffusers_image(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images in [0, 1], latents) of diffusers' StableDiffusionPipeline with Euler, as `run` asks ours."""
    import diffusers

    pipe: Any = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for output_type in ("np", "latent"):
        generator = torch.Generator("cpu").manual_seed(7)
        got = pipe(PROMPT, num_inference_steps=6, guidance_scale=7.5, width=64, height=64, generator=generator,
                   output_type=output_type).images
        out.append(np.asarray(got))
    return out[0], out[1]


def test_interval_one_is_the_plain_pipeline(step_cache_export: Path, onnx_export_dir: Callable[[str], Path],
                                            tiny_checkpoint: Callable[[str], Path]) -> None:
    ours = run(step_cache_export, step_cache=1)
    plain = run(onnx_export_dir("sd1"))
    images, latents = diffusers_image(tiny_checkpoint("sd1"))
    assert calls(ours, "unet") == 6 and calls(ours, SHALLOW) == 0
    assert max_diff(ours.array, images) <= ORT_TOL
    assert max_diff(ours.latents, latents) <= ORT_TOL * max(1.0, float(np.abs(latents).max()))
    assert max_diff(ours.array, plain.array) <= 1e-4
    assert "step_cache" not in ours.settings


@pytest.mark.parametrize(("interval", "full", "shallow"), [(2, 3, 3), (3, 2, 4)])
def test_uniform_schedule_with_cfg(step_cache_export: Path, interval: int, full: int, shallow: int) -> None:
    """6 steps: a full pass at steps 0, N, 2N, ...; each call is the doubled CFG batch (cache per CFG half)."""
    baseline = run(step_cache_export)
    ours = run(step_cache_export, step_cache=interval)
    torch_ref = run(step_cache_export, backend="torch", step_cache=interval)
    assert (calls(ours, "unet"), calls(ours, SHALLOW)) == (full, shallow)
    assert (calls(torch_ref, "unet"), calls(torch_ref, SHALLOW)) == (full, shallow)
    assert ours.array is not None and np.isfinite(ours.array).all()
    assert max_diff(ours.array, baseline.array) > 1e-3  # the shallow steps really reuse the cached feature
    assert max_diff(ours.array, torch_ref.array) <= ORT_TOL
    assert ours.settings["step_cache"] == interval


def test_multistep_sampler_and_no_cfg(step_cache_export: Path) -> None:
    ours = run(step_cache_export, step_cache=2, sampler="dpmpp_2m", guidance=1.0, steps=5)
    assert (calls(ours, "unet"), calls(ours, SHALLOW)) == (3, 2)
    assert ours.array is not None and np.isfinite(ours.array).all()


def test_refusals(step_cache_export: Path, onnx_export_dir: Callable[[str], Path]) -> None:
    with pytest.raises(InvalidRequest, match="second-order sampler heun"):
        run(step_cache_export, step_cache=2, sampler="heun")
    with pytest.raises(InvalidRequest, match="no step-cache engines"):
        run(onnx_export_dir("sd1"), step_cache=2)
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(InvalidRequest, match="step_cache must be a whole number"):
            run(step_cache_export, step_cache=bad)
