"""int8 UNets and the attention fusion on the tiny SD 1.x export: real ONNX Runtime sessions, real files."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from latentrt.engines.quantize import (
    RECIPES,
    activation_matmuls,
    compare_outputs,
    edge_convs,
    fuse_attention,
    op_counts,
    quantize_engine_dir,
    quantize_recipe,
    quantize_unet_int8,
    skip_convs,
)
from latentrt.errors import BuildError
from latentrt.manifest import read_manifest, sha256_tree
from latentrt.tensors import dummy_inputs, io_from_json

# Loose bounds on the tiny random-weight UNet: max |int8 - fp32| / max |fp32| over held-out feeds.
# Measured: dynamic MatMul 0.006, static QDQ 0.036-0.041 (every recipe); bounds leave ~3x headroom.
DYNAMIC_BOUND = 0.02  # weights-only int8 MatMuls
STATIC_BOUND = 0.1  # static activations (calibrated on 6 feeds)


def _feeds(io_json: dict, seeds: range) -> list[dict[str, np.ndarray]]:
    """UNet feeds at the export's opt sizes with varied latents, timesteps and contexts."""
    io = io_from_json(io_json)
    out = []
    for s in seeds:
        feed = dummy_inputs(io, {"unet_batch": 2, "latent_height": 16, "latent_width": 16}, seed=s)
        feed["timestep"] = np.full_like(feed["timestep"], 999.0 * (s % 7) / 6)
        out.append(feed)
    return out


@pytest.fixture(scope="module")
def unet(onnx_export_dir: Callable[[str], Path]) -> tuple[Path, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """(fp32 UNet file of tiny:sd1, calibration feeds, held-out feeds)."""
    folder = onnx_export_dir("sd1")
    entry = read_manifest(folder)["components"]["unet"]
    return folder / entry["path"], _feeds(entry["io"], range(6)), _feeds(entry["io"], range(100, 103))


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _quantized_convs(model: onnx.ModelProto) -> set[str]:
    """Conv nodes of a QDQ graph whose weight comes through a DequantizeLinear."""
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dq}


def test_graph_helpers_find_attention_products_and_edge_convs(unet) -> None:
    model = onnx.load(str(unet[0]), load_external_data=False)
    softmaxes = sum(n.op_type == "Softmax" for n in model.graph.node)
    assert len(activation_matmuls(model)) == 2 * softmaxes  # scores and scores x values, per attention
    first, last = edge_convs(model)
    assert "conv_in" in first and "conv_out" in last


def test_dynamic_int8_runs_close_to_fp32(unet, tmp_path: Path) -> None:
    src, _, held = unet
    info = quantize_unet_int8(src, tmp_path / "unet.onnx", method="dynamic")
    ops = op_counts(tmp_path / "unet.onnx")
    assert ops.get("DynamicQuantizeLinear", 0) + ops.get("DynamicQuantizeMatMul", 0) > 0
    assert tuple(info["recipe"]["op_types"]) == ("MatMul",)
    out = np.asarray(_session(tmp_path / "unet.onnx").run(None, held[0])[0])
    assert out.shape == held[0]["sample"].shape and np.isfinite(out).all()
    assert compare_outputs(src, tmp_path / "unet.onnx", held)["relative"] < DYNAMIC_BOUND


def test_static_qdq_int8_runs_close_to_fp32(unet, tmp_path: Path) -> None:
    src, calib, held = unet
    info = quantize_unet_int8(src, tmp_path / "unet.onnx", method="static", calibration_feeds=calib)
    assert info["calibration_feeds"] == 6
    ops = op_counts(tmp_path / "unet.onnx")
    assert ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0
    model = onnx.load(str(tmp_path / "unet.onnx"), load_external_data=False)
    quantized = _quantized_convs(model)
    assert quantized and not set(edge_convs(model)) & quantized  # conv_in / conv_out stay fp32
    diff = compare_outputs(src, tmp_path / "unet.onnx", held)
    assert 0 < diff["relative"] < STATIC_BOUND


def test_default_recipe_fuses_attention_and_keeps_skip_convs_fp32(unet, tmp_path: Path) -> None:
    src, calib, held = unet
    info = quantize_recipe(src, tmp_path / "unet.onnx", "static-qdq-mha", calib)
    ops = op_counts(tmp_path / "unet.onnx")
    assert info["fused_attention"] == op_counts(src)["Softmax"] == ops["MultiHeadAttention"]
    source = onnx.load(str(src), load_external_data=False)
    skips = skip_convs(source)
    assert skips and all("conv_shortcut" in name for name in skips)
    quantized = onnx.load(str(tmp_path / "unet.onnx"), load_external_data=False)
    assert _quantized_convs(quantized) and not set(skips) & _quantized_convs(quantized)
    assert compare_outputs(src, tmp_path / "unet.onnx", held)["relative"] < STATIC_BOUND


def test_static_without_calibration_and_unknown_method_are_refused(unet, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="calibration"):
        quantize_unet_int8(unet[0], tmp_path / "a.onnx", method="static")
    with pytest.raises(BuildError, match="unknown int8 method"):
        quantize_unet_int8(unet[0], tmp_path / "b.onnx", method="fp8")
    assert not (tmp_path / "a.onnx").exists()


def test_fuse_attention_replaces_every_sdpa_and_keeps_outputs(unet, tmp_path: Path) -> None:
    src, _, held = unet
    before = op_counts(src)
    count = fuse_attention(src, tmp_path / "fused.onnx")
    after = op_counts(tmp_path / "fused.onnx")
    assert count == before["Softmax"] > 0
    assert after["MultiHeadAttention"] == count and "Softmax" not in after
    a, b = _session(src), _session(tmp_path / "fused.onnx")
    for feed in held:
        np.testing.assert_allclose(np.asarray(b.run(None, feed)[0]), np.asarray(a.run(None, feed)[0]), atol=1e-4,
                                   rtol=1e-4)


def test_quantize_engine_dir_writes_a_loadable_int8_engine_folder(onnx_export_dir, tmp_path: Path) -> None:
    from latentrt.engines.build import build_engines
    from latentrt.runtime.pipeline import GenerationRequest, load_pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = build_engines(onnx_export_dir("sd1"), tmp_path / "fp32", backend="onnxruntime")
    out = quantize_engine_dir(fp32, tmp_path / "int8", recipe="dynamic-matmul-pc")
    manifest = read_manifest(out)
    unet = manifest["components"]["unet"]
    assert manifest["precision"] == "int8" and unet["precision"] == "int8"
    assert unet["sha256"] == sha256_tree(out / "unet")
    assert unet["int8"]["recipe_name"] == "dynamic-matmul-pc"
    assert manifest["components"]["vae_decoder"] == read_manifest(fp32)["components"]["vae_decoder"]
    request = GenerationRequest(prompt="a lighthouse", steps=2, width=128, height=128, seed=3)
    images = [load_pipeline(f).generate(request).array for f in (fp32, out)]
    assert images[0] is not None and images[1] is not None
    assert images[1].shape == images[0].shape == (1, 128, 128, 3)
    assert float(np.abs(images[1] - images[0]).max()) < 0.25  # same picture, int8 noise


def test_every_named_recipe_is_valid() -> None:
    for name, recipe in RECIPES.items():
        assert recipe.method in ("dynamic", "static"), name
        assert set(recipe.op_types) <= {"Conv", "MatMul"}, name


def test_calibration_feeds_are_real_unet_inputs_from_sampling(onnx_export_dir, tmp_path: Path) -> None:
    from latentrt.runtime.bench import calibration_feeds

    feeds = calibration_feeds(onnx_export_dir("sd1"), height=128, width=128, steps=3, prompts=["a cat", "a dog"])
    assert len(feeds) == 6  # one CFG-batched UNet call per step and prompt
    assert {f["sample"].shape for f in feeds} == {(2, 4, 16, 16)}
    timesteps = sorted({float(f["timestep"][0]) for f in feeds})
    assert len(timesteps) == 3 and timesteps[-1] > 500  # the sampling schedule, high noise first
    info = quantize_unet_int8(onnx_export_dir("sd1") / "unet" / "model.onnx", tmp_path / "u.onnx",
                              calibration_feeds=feeds)
    assert info["calibration_feeds"] == 6


def test_calibration_runs_take_the_guidance_they_are_given(onnx_export_dir, tmp_path: Path) -> None:
    """`latentrt build --calibration-guidance 1`: runs without guidance (as 1-step Turbo sampling does), so the
    UNet feeds are unbatched and the decoder feeds are the latents such runs end on; the scale is recorded."""
    from latentrt.workflows.build import record_calibration

    cal = record_calibration(onnx_export_dir("sd1"), tmp_path / "e", backend="onnxruntime", device="cpu",
                             int8_recipe="static-qdq", calibration_size=(64, 64), calibration_steps=1,
                             calibration_guidance=1.0, decoder=True)
    assert cal is not None and cal.guidance == 1.0 and cal.steps == 1
    assert {f["sample"].shape[0] for f in cal.feeds} == {1}  # no CFG batch
    assert len(cal.decoder_feeds) == len(cal.feeds)
