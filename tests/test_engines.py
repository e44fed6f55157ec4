"""ONNX Runtime engine builds from hand-built exports: manifests, reuse, staleness, atomicity, fp16 islands."""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_engines_fakes import make_fake_export

from latentrt.cache_keys import check_engine, digest
from latentrt.engines.build import build_engines, component_precision, read_onnx_export
from latentrt.engines.layers import attention_core, layer_kind
from latentrt.engines.onnxruntime import prepare_ort_engine
from latentrt.errors import BuildError, OutputConflict, StaleArtifact
from latentrt.families import FAMILIES, FamilyId, get_family
from latentrt.manifest import ENGINE_KIND, MANIFEST, read_manifest, sha256_tree
from latentrt.tensorrt_support import LogTail
from latentrt.tensors import dummy_inputs, io_from_json, io_to_json

ENTRY_KEYS = {"path", "io", "precision", "fp32_islands", "profiles", "cache_key", "key", "sha256", "size_mb",
              "size_bytes", "build_s", "ort"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    return {f.value: make_fake_export(f.value, root / f.value) for f in FamilyId}


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("family", [f.value for f in FamilyId])
def test_ort_engines_match_the_source_graph_at_several_shapes(exports: dict[str, Path], tmp_path: Path,
                                                              family: str) -> None:
    out = build_engines(exports[family], tmp_path / "engines", backend="onnxruntime")
    manifest = read_manifest(out, ENGINE_KIND)
    export = read_onnx_export(exports[family])
    assert list(manifest["components"]) == list(get_family(family).components)
    for c, entry in manifest["components"].items():
        io = io_from_json(entry["io"])
        engine, source = session(out / entry["path"]), session(export.model_path(c))
        for i, sizes in enumerate(({}, {"batch": 2, "unet_batch": 3, "latent_height": 16, "latent_width": 24})):
            feed = dummy_inputs(io, {k: v for k, v in sizes.items() if k in io.dims}, seed=i)
            for got, want in zip(engine.run(None, feed), source.run(None, feed)):
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_engine_manifest_is_complete(exports: dict[str, Path], tmp_path: Path) -> None:
    out = build_engines(exports["sdxl"], tmp_path / "engines", backend="onnxruntime", threads=2)
    m = json.loads((out / MANIFEST).read_text())
    onnx_m = json.loads((exports["sdxl"] / MANIFEST).read_text())
    assert m["kind"] == ENGINE_KIND and m["schema"] == 1 and m["backend"] == "onnxruntime"
    assert m["family"] == "sdxl" and m["gpu"] is None and m["model"] == onnx_m["model"]
    assert m["source"]["model"] == onnx_m["source"]
    assert m["source"]["onnx_manifest_sha256"] == read_onnx_export(exports["sdxl"]).manifest_sha256
    assert {"onnxruntime", "onnx", "python"} <= set(m["tools"])
    assert m["files"] == onnx_m["files"]
    for rel, digest_ in m["files"].items():
        assert sha256_tree(out / rel) == digest_
    for c, entry in m["components"].items():
        assert ENTRY_KEYS <= set(entry), c
        assert entry["path"] == f"{c}/model.onnx"
        assert entry["sha256"] == sha256_tree(out / c)
        assert entry["cache_key"] == digest(entry["key"])
        assert entry["key"]["onnx_sha256"] == onnx_m["components"][c]["sha256"]
        assert entry["io"] == io_to_json(io_from_json(onnx_m["components"][c]["io"]))
        assert entry["ort"]["threads"]["intra_op"] == 2
        assert entry["ort"]["check"]["ran"] is True
        check_engine(entry, {"onnx_sha256": onnx_m["components"][c]["sha256"], "precision": "fp32"})
    assert not list(tmp_path.glob(".*partial"))  # no staging left behind


def test_rebuild_reuses_unchanged_engines_and_rebuilds_on_request(exports: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "engines"
    build_engines(exports["sd1"], out, backend="onnxruntime")
    first = json.loads((out / MANIFEST).read_text())
    events: list = []
    build_engines(exports["sd1"], out, backend="onnxruntime", progress=events.append)
    assert {e.stage for e in events} == {"reused"}
    second = json.loads((out / MANIFEST).read_text())
    assert {c: e["cache_key"] for c, e in first["components"].items()} == \
        {c: e["cache_key"] for c, e in second["components"].items()}
    events.clear()
    build_engines(exports["sd1"], out, backend="onnxruntime", graph_optimization_level="basic", components=["unet"],
                  progress=events.append)
    assert [(e.component, e.stage) for e in events] == [("unet", "start"), ("unet", "done")]
    third = json.loads((out / MANIFEST).read_text())
    assert list(third["components"]) == list(first["components"])  # the other components are kept
    assert third["components"]["unet"]["cache_key"] != first["components"]["unet"]["cache_key"]
    assert third["components"]["vae_decoder"] == first["components"]["vae_decoder"]


def test_tampered_onnx_export_is_stale(exports: dict[str, Path], tmp_path: Path) -> None:
    src = shutil.copytree(exports["sd1"], tmp_path / "onnx")
    with open(src / "text_encoder" / "model.onnx.data", "r+b") as f:
        f.write(b"\x00\x01\x02\x03")  # weights changed after export
    with pytest.raises(StaleArtifact, match="text_encoder"):
        build_engines(src, tmp_path / "engines", backend="onnxruntime")
    (src / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(StaleArtifact):
        build_engines(src, tmp_path / "engines", backend="onnxruntime", components=["text_encoder"])
    assert not (tmp_path / "engines").exists()


def broken_export(exports: dict[str, Path], tmp_path: Path) -> Path:
    """An export whose UNet file is garbage but whose manifest hash matches it (fails only at build time)."""
    src = shutil.copytree(exports["sd1"], tmp_path / "broken")
    (src / "unet" / "model.onnx").write_bytes(b"not an onnx file")
    manifest = json.loads((src / MANIFEST).read_text())
    manifest["components"]["unet"]["sha256"] = sha256_tree(src / "unet")
    (src / MANIFEST).write_text(json.dumps(manifest))
    return src


def test_failure_mid_build_leaves_no_manifest(exports: dict[str, Path], tmp_path: Path) -> None:
    src = broken_export(exports, tmp_path)
    out = tmp_path / "engines"
    with pytest.raises(BuildError, match="could not load or optimize"):
        build_engines(src, out, backend="onnxruntime")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]  # no staging folder left either


def test_failed_rebuild_keeps_the_previous_engines(exports: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "engines"
    build_engines(exports["sd1"], out, backend="onnxruntime")
    before = (out / MANIFEST).read_bytes()
    src = broken_export(exports, tmp_path)
    manifest = json.loads((src / MANIFEST).read_text())
    manifest["source"] = json.loads((exports["sd1"] / MANIFEST).read_text())["source"]
    (src / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BuildError):
        build_engines(src, out, backend="onnxruntime", overwrite=True)
    assert (out / MANIFEST).read_bytes() == before
    assert sha256_tree(out / "unet") == json.loads(before)["components"]["unet"]["sha256"]


def test_output_folder_conflicts(exports: dict[str, Path], tmp_path: Path) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(OutputConflict, match="--overwrite"):
        build_engines(exports["sd1"], foreign, backend="onnxruntime")
    assert (foreign / "cat.jpg").exists()
    other = build_engines(exports["sd2"], tmp_path / "other", backend="onnxruntime")
    other_manifest = json.loads((other / MANIFEST).read_text())
    other_manifest["source"]["model"] = {"model": "another", "sha256": "1" * 64}
    (other / MANIFEST).write_text(json.dumps(other_manifest))
    with pytest.raises(OutputConflict, match="another model"):
        build_engines(exports["sd1"], other, backend="onnxruntime")
    with pytest.raises(OutputConflict, match="cat.jpg"):  # issue 10: --overwrite never deletes a foreign file
        build_engines(exports["sd1"], foreign, backend="onnxruntime", overwrite=True)
    assert (foreign / "cat.jpg").exists()
    build_engines(exports["sd1"], other, backend="onnxruntime", overwrite=True)  # another model's engines: replaced
    assert read_manifest(other, ENGINE_KIND)["family"] == "sd1"
    with pytest.raises(OutputConflict, match="is the ONNX folder"):
        build_engines(exports["sd1"], exports["sd1"], backend="onnxruntime")


def test_plan_only_writes_nothing(exports: dict[str, Path], tmp_path: Path) -> None:
    out = build_engines(exports["sdxl"], tmp_path / "engines", backend="tensorrt", plan_only=True)
    assert out == tmp_path / "engines" and not out.exists()


def test_precision_policy_keeps_known_fp16_failures_in_fp32() -> None:
    sdxl, sd2, sd1 = get_family("sdxl"), get_family("sd2"), get_family("sd1")
    assert component_precision(sdxl, "vae_decoder", "fp16").precision == "fp32"
    assert component_precision(sdxl, "vae_decoder", "fp16", fp16_fixed_vae=True).precision == "fp16"
    assert component_precision(sdxl, "unet", "fp16").fp32_layers is None
    sd2_unet = component_precision(sd2, "unet", "fp16")
    assert sd2_unet.precision == "fp16" and sd2_unet.fp32_layers is attention_core
    assert component_precision(sd1, "vae_decoder", "fp16").precision == "fp16"
    assert component_precision(sd2, "unet", "fp32").fp32_layers is None


@pytest.mark.parametrize("name, op, kept", [
    ("/down_blocks.0/attentions.0/transformer_blocks.0/attn1/MatMul", "MatMul", True),
    ("/down_blocks.0/attentions.0/transformer_blocks.0/attn2/Softmax", "Softmax", True),
    ("/mid_block/attentions.0/transformer_blocks.0/attn1/MatMul_1", "MATRIX_MULTIPLY", True),
    ("/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul", "MatMul", False),
    ("/down_blocks.0/attentions.0/transformer_blocks.0/attn1/Mul", "Mul", False),
    ("/down_blocks.0/resnets.0/conv1/Conv", "Conv", False),
])
def test_attention_core_selects_score_matmuls_and_softmax(name: str, op: str, kept: bool) -> None:
    assert attention_core(name, layer_kind(op)) is kept


def test_fp16_conversion_keeps_attention_islands_fp32(exports: dict[str, Path], tmp_path: Path) -> None:
    export = read_onnx_export(exports["sd2"])
    info = prepare_ort_engine(export.model_path("unet"), tmp_path / "unet", precision="fp16", io=export.ios["unet"],
                              fp32_nodes=attention_core)
    assert info["fp32_nodes"] == 3 and info["check"]["ran"] is True
    model = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / "unet" / "model.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input,
                                                            *model.graph.output]}
    nodes = {n.name: n for n in model.graph.node}
    assert types[nodes["/mid/attn1/Softmax"].output[0]] == onnx.TensorProto.FLOAT
    assert types[nodes["/conv_in/Conv"].output[0]] == onnx.TensorProto.FLOAT16
    assert types["sample"] == types["out_sample"] == onnx.TensorProto.FLOAT  # IO stays fp32


def test_log_tail_keeps_the_last_lines() -> None:
    tail = LogTail(size=3)
    for i in range(5):
        tail.add("ERROR" if i == 4 else "INFO", f"line {i}")
    assert tail.tail() == "[INFO] line 2\n[INFO] line 3\n[ERROR] line 4"
    assert tail.errors == 1


def test_fp32_op_block_list_combines_with_the_layer_filter() -> None:
    from latentrt.engines.tensorrt import _fp32_filter

    keep = _fp32_filter(attention_core, ["Softmax"])
    assert keep is not None
    assert keep("/resnets.0/Softmax", layer_kind("SOFTMAX"))  # blocked op kind anywhere
    assert keep("/attn1/MatMul", layer_kind("MATRIX_MULTIPLY"))  # the attention filter still applies
    assert not keep("/attn1/to_q/MatMul", layer_kind("MATRIX_MULTIPLY"))
    assert _fp32_filter(None, []) is None


def _replace_component(export_dir: Path, component: str, seed: int) -> str:
    """Re-export one component of a fake export with other weights; returns its new manifest sha256."""
    from test_engines_fakes import make_model

    manifest = json.loads((export_dir / MANIFEST).read_text())
    io = io_from_json(manifest["components"][component]["io"])
    shutil.rmtree(export_dir / component)
    (export_dir / component).mkdir()
    onnx.save_model(make_model(io, seed=seed), str(export_dir / component / "model.onnx"))
    manifest["components"][component]["sha256"] = sha256_tree(export_dir / component)
    (export_dir / MANIFEST).write_text(json.dumps(manifest))
    return manifest["components"][component]["sha256"]


def test_partial_rebuild_rebuilds_kept_engines_whose_export_changed(exports: dict[str, Path], tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    src = shutil.copytree(exports["sd1"], tmp_path / "onnx")
    out = build_engines(src, tmp_path / "engines", backend="onnxruntime")
    first = read_manifest(out, ENGINE_KIND)
    new_sha = _replace_component(src, "vae_decoder", seed=99)
    events: list = []
    build_engines(src, out, backend="onnxruntime", components=["unet"], progress=events.append)
    assert [(e.component, e.stage) for e in events] == [("unet", "reused"), ("vae_decoder", "start"),
                                                        ("vae_decoder", "done")]
    assert "vae_decoder: the previous engine is outdated (onnx_sha256 differs)" in caplog.text
    m = read_manifest(out, ENGINE_KIND)
    assert m["components"]["vae_decoder"]["key"]["onnx_sha256"] == new_sha
    assert m["components"]["text_encoder"] == first["components"]["text_encoder"]
    engine, source = session(out / "vae_decoder" / "model.onnx"), session(src / "vae_decoder" / "model.onnx")
    feed = dummy_inputs(io_from_json(m["components"]["vae_decoder"]["io"]), {}, seed=0)
    got, want = engine.run(None, feed)[0], source.run(None, feed)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    shutil.rmtree(out / "text_encoder")  # a kept engine whose files went missing is rebuilt, not dropped
    events.clear()
    build_engines(src, out, backend="onnxruntime", components=["unet"], progress=events.append)
    assert [(e.component, e.stage) for e in events if e.stage != "reused"] == [("text_encoder", "start"),
                                                                               ("text_encoder", "done")]
    assert list(read_manifest(out, ENGINE_KIND)["components"]) == list(first["components"])


def test_kept_tensorrt_engines_of_another_tensorrt_or_gpu_are_outdated(exports: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    from latentrt.engines.build import BuildOptions, _outdated_kept, _trt_version

    export = read_onnx_export(exports["sd1"])
    opts = BuildOptions("tensorrt", "fp16")
    gpu = {"compute_capability": "8.9"}
    here = {"trt_version": _trt_version(opts), "compute_capability": "8.9"}
    components = {}
    for c, why in [("text_encoder", {}), ("vae_encoder", {"trt_version": "0.1"}),
                   ("vae_decoder", {"compute_capability": "7.5"})]:
        (tmp_path / c).mkdir()
        (tmp_path / c / "engine.plan").write_bytes(c.encode())
        key = {"onnx_sha256": export.manifest["components"][c]["sha256"], **here, **why}
        components[c] = {"key": key, "sha256": sha256_tree(tmp_path / c)}
    previous = {"backend": "tensorrt", "components": components}
    assert _outdated_kept(previous, export, opts, gpu, ["unet"], tmp_path) == ["vae_encoder", "vae_decoder"]
    assert _outdated_kept({**previous, "backend": "onnxruntime"}, export, opts, gpu, ["unet"], tmp_path) == []


def test_engine_folders_get_public_modes_whatever_the_umask(exports: dict[str, Path], tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        out = build_engines(exports["sd1"], tmp_path / "engines", backend="onnxruntime", components=["text_encoder"])
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes["."] == modes["text_encoder"] == 0o755
    assert modes[MANIFEST] == modes["text_encoder/model.onnx"] == modes["scheduler/scheduler_config.json"] == 0o644


def test_precision_policy_asks_the_family_spec() -> None:
    sd1 = get_family("sd1")
    assert component_precision(replace(sd1, fp32_attention=True), "unet", "fp16").fp32_layers is attention_core
    assert component_precision(replace(sd1, fp16_vae_overflows=True), "vae_encoder", "fp16").precision == "fp32"
    for spec in FAMILIES.values():
        assert (component_precision(spec, "vae_decoder", "fp16").precision == "fp32") is spec.fp16_vae_overflows
        assert (component_precision(spec, "unet", "fp16").fp32_layers is attention_core) is spec.fp32_attention
