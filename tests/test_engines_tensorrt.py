"""TensorRT backend: the parts that need no GPU run everywhere; builds and runs need TensorRT and CUDA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_engines_fakes import make_fake_export

from latentrt.engines.build import build_engines
from latentrt.errors import BackendUnavailable, MissingComponent, StaleArtifact
from latentrt.manifest import MANIFEST
from latentrt.runtime.backends.tensorrt import (
    SharedDeviceMemory,
    TensorRTEngine,
    check_plan_file,
    load_engines,
)
from latentrt.runtime.timing import StageTimer
from latentrt.tensorrt_support import tensorrt_available
from latentrt.tensors import dummy_inputs, io_from_json

HAVE_TRT, WHY = tensorrt_available()
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason=f"needs TensorRT and CUDA: {WHY}")


def test_shared_memory_grows_to_the_largest_reservation() -> None:
    pool = SharedDeviceMemory("cpu")
    a, b = object(), object()
    pool.reserve(a, 1000)
    first = pool.generation
    pool.reserve(b, 400)
    assert pool.size == 1000 and pool.generation == first  # smaller needs reuse the buffer
    pool.reserve(b, 5000)
    assert pool.size == 5000 and pool.generation == first + 1  # moved: captured graphs must re-capture
    pool.release(a)
    assert pool.size == 5000
    pool.release(b)
    assert pool.size == 0
    with pytest.raises(RuntimeError):
        _ = pool.ptr


def test_plan_file_checks(tmp_path: Path) -> None:
    plan = tmp_path / "unet" / "engine.plan"
    with pytest.raises(MissingComponent):
        check_plan_file({"size_bytes": 3}, plan, verify_hash=False)
    plan.parent.mkdir()
    plan.write_bytes(b"abcd")
    with pytest.raises(StaleArtifact, match="replaced or truncated"):
        check_plan_file({"size_bytes": 3}, plan, verify_hash=False)
    with pytest.raises(StaleArtifact, match="hash mismatch"):
        check_plan_file({"size_bytes": 4, "sha256": "0" * 64}, plan, verify_hash=True)


def test_onnxruntime_folder_is_not_loaded_as_tensorrt(tmp_path: Path) -> None:
    onnx_dir = make_fake_export("sd1", tmp_path / "onnx", components=("vae_decoder",))
    out = build_engines(onnx_dir, tmp_path / "engines", backend="onnxruntime")
    with pytest.raises(StaleArtifact, match="holds onnxruntime engines"):
        TensorRTEngine.from_manifest(out, "vae_decoder")


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is available here")
def test_engine_without_tensorrt_is_backend_unavailable(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="tensorrt backend is unavailable"):
        TensorRTEngine(tmp_path / "engine.plan", io_from_json({"component": "x", "inputs": [], "outputs": []}))


# ---------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def trt_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trt")
    onnx_dir = make_fake_export("sd2", root / "onnx")
    out = build_engines(onnx_dir, root / "engines", backend="tensorrt", sizes=[(512, 512), (512, 768), (768, 512)],
                        batch=(1, 2), strategy="per-bucket", timing_cache=root / "timing.cache")
    return onnx_dir, out


def ort_reference(onnx_dir: Path, component: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    s = ort.InferenceSession(str(onnx_dir / component / "model.onnx"), providers=["CPUExecutionProvider"])
    return [np.asarray(y) for y in s.run(None, feed)]


@pytest.mark.tensorrt
@needs_trt
def test_tensorrt_engines_match_onnxruntime(trt_build: tuple[Path, Path]) -> None:
    onnx_dir, out = trt_build
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["gpu"]["compute_capability"]
    engines = load_engines(out)
    memory = {e.memory for e in engines.values()}
    assert len(memory) == 1  # one shared pool
    assert next(iter(memory)).size >= max(int(e["device_memory_mb"] * 2**20) - 1 for e in manifest["components"].values())
    for c, engine in engines.items():
        for seed, size in enumerate([(512, 512), (512, 768), (768, 512)]):
            sizes = {"batch": 2, "unet_batch": 2, "latent_height": size[0] // 8, "latent_width": size[1] // 8}
            feed = dummy_inputs(engine.io, {k: v for k, v in sizes.items() if k in engine.io.dims}, seed=seed)
            timer = StageTimer("cuda")
            got = engine.run({k: torch.from_numpy(v).cuda() for k, v in feed.items()}, timer)
            assert [(stage, math.isfinite(ms)) for stage, ms in timer.record().entries] == [(c, True)]
            for (name, y), ref in zip(got.items(), ort_reference(onnx_dir, c, feed)):
                assert y.is_cuda
                np.testing.assert_allclose(y.cpu().numpy(), ref, rtol=2e-2, atol=2e-2, err_msg=f"{c}.{name}")
        engine.close()


@pytest.mark.tensorrt
@needs_trt
def test_cuda_graph_replay_matches_eager(trt_build: tuple[Path, Path]) -> None:
    _, out = trt_build
    eager = TensorRTEngine.from_manifest(out, "unet")
    graphed = TensorRTEngine.from_manifest(out, "unet", cuda_graphs=True)
    for seed in range(3):
        feed = {k: torch.from_numpy(v).cuda() for k, v in dummy_inputs(eager.io, {"unet_batch": 2, "latent_height": 64,
                                                                                  "latent_width": 96}, seed=seed).items()}
        torch.testing.assert_close(graphed.run(feed)["out_sample"], eager.run(feed)["out_sample"])


@pytest.mark.tensorrt
@needs_trt
def test_engine_loaded_by_path_reads_its_manifest_entry(trt_build: tuple[Path, Path]) -> None:
    _, out = trt_build
    entry = json.loads((out / MANIFEST).read_text())["components"]["vae_decoder"]
    engine = TensorRTEngine(out / entry["path"], io_from_json(entry["io"]), "cuda")
    assert engine.entry["cache_key"] == entry["cache_key"] and engine.vae_scale_factor == 8


@pytest.mark.tensorrt
@needs_trt
def test_stale_manifest_entry_is_refused(trt_build: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = trt_build
    manifest = json.loads((out / MANIFEST).read_text())
    entry = manifest["components"]["unet"]
    entry["key"]["trt_version"] = "9.0.0"
    with pytest.raises(StaleArtifact, match="trt_version"):
        TensorRTEngine.from_manifest(out, "unet", manifest=manifest)
