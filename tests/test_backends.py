"""Backends behind one interface: ONNX Runtime sessions vs the PyTorch reference modules, engine-set loading."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from latentrt.errors import (
    BackendUnavailable,
    InvalidRequest,
    MissingComponent,
    StaleArtifact,
    UnsupportedShape,
)
from latentrt.manifest import MANIFEST
from latentrt.runtime.backends.onnxruntime import OrtEngine
from latentrt.runtime.engine_set import load_engines
from latentrt.runtime.pipeline import GenerationRequest, Pipeline
from latentrt.runtime.timing import StageTimer
from latentrt.tensors import dummy_inputs

# ONNX Runtime vs PyTorch on one call, relative to max |reference| (the export's own parity check is ~1e-5).
REL_TOL = 1e-4
SIZES = [{"batch": 2, "unet_batch": 2, "latent_height": 8, "latent_width": 16},
         {"batch": 1, "unet_batch": 3, "latent_height": 16, "latent_width": 8}]


def torch_feed(engine_io: object, sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    feed = dummy_inputs(engine_io, sizes, seed)  # type: ignore[arg-type]
    return {k: torch.from_numpy(v) for k, v in feed.items()}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_onnxruntime_matches_torch_per_component(family: str, onnx_export_dir: Callable[[str], Path]) -> None:
    folder = onnx_export_dir(family)
    ort_set = load_engines(folder)
    ref_set = load_engines(folder, backend="torch")
    assert ort_set.backend == "onnxruntime" and ref_set.backend == "torch" and ref_set.kind == "onnx"
    assert list(ort_set.engines) == list(ref_set.engines) == list(ort_set.spec.components)
    for name, engine in ort_set.engines.items():
        for i, sizes in enumerate(SIZES):
            feed = torch_feed(engine.io, sizes, seed=i)
            ours, ref = engine.run(feed), ref_set[name].run(feed)
            assert list(ours) == engine.io.output_names
            for out in engine.io.output_names:
                assert ours[out].shape == ref[out].shape and ours[out].dtype == torch.float32
                scale = float(ref[out].abs().max())
                assert float((ours[out] - ref[out]).abs().max()) <= REL_TOL * max(scale, 1.0), (name, out, sizes)


def test_io_binding_matches_session_run(onnx_export_dir: Callable[[str], Path]) -> None:
    unet = load_engines(onnx_export_dir("sd1"))["unet"]
    assert isinstance(unet, OrtEngine)
    feed = torch_feed(unet.io, SIZES[0], seed=3)
    timer = StageTimer()
    bound = unet.run(feed, timer)["out_sample"].numpy()
    plain = unet.run_numpy({k: v.numpy() for k, v in feed.items()})["out_sample"]
    assert np.array_equal(bound, plain)
    assert [stage for stage, _ in timer.record().entries] == ["unet"]


def test_describe_and_cuda_fallback(onnx_export_dir: Callable[[str], Path], caplog: pytest.LogCaptureFixture) -> None:
    folder = onnx_export_dir("sd1")
    engine = load_engines(folder)["text_encoder"]
    assert engine.describe().startswith("onnxruntime text_encoder on CPUExecutionProvider")
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA EP; the fallback path is not reachable")
    with caplog.at_level(logging.WARNING, logger="latentrt.runtime"):
        es = load_engines(folder, device="cuda")
    assert es.device.type == "cpu" and all(e.device.type == "cpu" for e in es.engines.values())
    messages = [r.getMessage() for r in caplog.records]
    assert any("did not enable CUDAExecutionProvider (running on CPUExecutionProvider)" in m for m in messages)
    assert "requested CUDAExecutionProvider: unavailable" in es["unet"].describe()


def test_feed_validation(onnx_export_dir: Callable[[str], Path]) -> None:
    unet = load_engines(onnx_export_dir("sd1"))["unet"]
    feed = torch_feed(unet.io, SIZES[0], seed=0)
    with pytest.raises(UnsupportedShape, match="missing input 'encoder_hidden_states'"):
        unet.run({k: v for k, v in feed.items() if k != "encoder_hidden_states"})
    feed["timestep"] = torch.zeros(5)
    with pytest.raises(UnsupportedShape, match="inconsistent unet_batch"):
        unet.run(feed)


def test_missing_onnx_file(onnx_export_dir: Callable[[str], Path], tmp_path: Path) -> None:
    io = load_engines(onnx_export_dir("sd1"))["unet"].io
    with pytest.raises(MissingComponent, match="unet: ONNX file .* is missing"):
        OrtEngine(tmp_path / "nope.onnx", io)


def test_foreign_onnx_file_is_stale(onnx_export_dir: Callable[[str], Path]) -> None:
    """An ONNX file of another component (or an older export) is StaleArtifact, naming what differs."""
    folder = onnx_export_dir("sd1")
    io = load_engines(folder)["unet"].io
    with pytest.raises(StaleArtifact, match=r"unet: .*has inputs \['latent'\].*re-export the model"):
        OrtEngine(folder / "vae_decoder" / "model.onnx", io)


def test_onnx_outputs_are_checked(onnx_export_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """Right input names but another output name: StaleArtifact, not a failure at the first run."""
    import onnx
    from onnx import TensorProto, helper

    io = load_engines(onnx_export_dir("sd1"))["vae_decoder"].io
    graph = helper.make_graph([helper.make_node("Identity", ["latent"], ["pixels"])], "g",
                              [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["b", 4, "h", "w"])],
                              [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["b", 4, "h", "w"])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(StaleArtifact, match=r"vae_decoder: .*has outputs \['pixels'\], its IO spec names \['images'\]"):
        OrtEngine(path, io)


def test_engine_covers_reads_the_io_ranges(onnx_export_dir: Callable[[str], Path]) -> None:
    es = load_engines(onnx_export_dir("sd1"))
    unet, encoder = es["unet"], es["text_encoder"]
    lh = unet.io.dims["latent_height"]
    assert unet.covers({"latent_height": lh.min, "latent_width": lh.max})
    assert not unet.covers({"latent_height": lh.max + 1, "latent_width": 8})
    assert encoder.covers({"latent_height": 10**6})  # dims an engine does not have are ignored
    assert es.covers(lh.min, lh.min) and not es.covers(lh.min - 1, lh.min)


def test_tensorrt_engine_covers_reads_its_profiles(onnx_export_dir: Callable[[str], Path]) -> None:
    """TensorRT engines cover only what some optimization profile covers (not the whole IO range)."""
    from latentrt.runtime.backends.base import Engine
    from latentrt.runtime.backends.tensorrt import TensorRTEngine

    engine = TensorRTEngine.__new__(TensorRTEngine)  # no plan needed: covers() reads the manifest's profiles
    Engine.__init__(engine, load_engines(onnx_export_dir("sd1"))["unet"].io)
    engine.profiles = [{"bounds": {"latent_height": [8, 8, 8], "latent_width": [8, 8, 16]}},
                       {"bounds": {"latent_height": [16, 16, 32], "latent_width": [16, 16, 16]}}]
    assert engine.covers({"latent_height": 8, "latent_width": 16})
    assert engine.covers({"latent_height": 24, "latent_width": 16})
    assert not engine.covers({"latent_height": 16, "latent_width": 8})  # within the IO range, in no profile
    assert Engine.covers(engine, {"latent_height": 16, "latent_width": 8})


def test_engine_folder_runs_like_the_onnx_folder(onnx_export_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """`latentrt build --backend onnxruntime` output loads through the same API and gives the same image."""
    from latentrt.engines.build import build_engines

    onnx = onnx_export_dir("sd-turbo")
    engines = build_engines(onnx, tmp_path / "engines", backend="onnxruntime")
    es = load_engines(engines)
    assert (es.kind, es.backend, es.source["model"]) == ("engines", "onnxruntime", "tiny:sd-turbo")
    request = GenerationRequest("a fox", steps=2, width=64, height=128, seed=9, sampler="euler_a")
    a = Pipeline(es).generate(request)
    b = Pipeline(load_engines(onnx)).generate(request)
    assert a.array is not None and b.array is not None
    assert float(np.abs(a.array - b.array).max()) <= 1e-4
    ref = load_engines(engines, backend="torch")  # the reference modules, found through the nested source
    assert ref.backend == "torch" and ref.source["model"] == "tiny:sd-turbo"
    with pytest.raises(InvalidRequest, match="holds onnxruntime engines, not tensorrt"):
        load_engines(engines, backend="tensorrt")


def test_tensorrt_folder_without_tensorrt(onnx_export_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """A TensorRT engine folder on a machine without TensorRT: BackendUnavailable, no crash."""
    from latentrt.tensorrt_support import tensorrt_available

    if tensorrt_available()[0]:
        pytest.skip("TensorRT and a GPU are available here")
    folder = shutil.copytree(onnx_export_dir("sd1"), tmp_path / "trt")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest.update(kind="latentrt.engines", backend="tensorrt")
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BackendUnavailable, match="TensorRT"):
        load_engines(folder)


def test_checkpoint_runs_on_torch_only(tiny_checkpoint: Callable[[str], Path]) -> None:
    es = load_engines("tiny:sd1", backend="torch")
    assert (es.kind, es.backend, es.spec.id.value) == ("checkpoint", "torch", "sd1")
    assert es.describe()[0] == "torch text_encoder on cpu (float32)"
    with pytest.raises(InvalidRequest, match="is a checkpoint; export it"):
        load_engines(tiny_checkpoint("sd1"), backend="onnxruntime")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="PyTorch sees no CUDA device"):
            load_engines("tiny:sd1", backend="torch", device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_backend_on_cuda_matches_cpu(onnx_export_dir: Callable[[str], Path]) -> None:
    folder = onnx_export_dir("sd-turbo")
    request = GenerationRequest("a fox", steps=2, width=64, height=64, seed=9)
    cpu = Pipeline(load_engines(folder, backend="torch")).generate(request)
    gpu = Pipeline(load_engines(folder, backend="torch", device="cuda")).generate(request)
    assert cpu.array is not None and gpu.array is not None
    assert float(np.abs(cpu.array - gpu.array).max()) <= 1e-3
