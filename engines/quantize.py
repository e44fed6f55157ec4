"""int8 UNets for the ONNX Runtime CPU path (opt-in precision), with `onnxruntime.quantization`.

Two methods:

* ``dynamic``: weights stored int8, activations quantized per call from their observed range
  (`quantize_dynamic`). No calibration data. MatMul-only is the safe choice; dynamic Conv becomes
  ``ConvInteger``, which ONNX Runtime's CPU EP runs slower than fp32 ``Conv``.
* ``static``: QDQ graph with activation ranges fixed from calibration feeds (`quantize_static`);
  ONNX Runtime fuses QDQ pairs into ``QLinearConv`` / ``QLinearMatMul``, which run on the CPU's int8
  units (VNNI / AMX where present). Calibration feeds should be real UNet inputs drawn from fp32
  sampling runs (latents along the trajectory, real text embeddings), not random tensors.

Kept fp32 by default, because quantizing them costs accuracy (measured, benchmarks/README.md):
the attention score products (MatMul of two activations; also slower in int8), the first and last
convolution, and the convolutions fed straight by a Concat -- the up blocks' skip-connection
shortcuts, whose inputs join two differently scaled feature maps (the "shortcut splitting" problem
of Q-Diffusion, Li et al. 2023, arXiv:2302.04304): keeping these 12 1x1 convs fp32 cut the
mid-size UNet's int8 error about 3x (relative L2 0.055 -> 0.017; final image 28.7 -> 37.0 dB PSNR).

Optionally the exported attention subgraphs are first fused into ONNX Runtime's
`com.microsoft.MultiHeadAttention` (`fuse_attention`), which is exact and faster on the CPU.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from latentrt.choices import BuildBackend, Device, Precision
from latentrt.errors import BuildError, MissingComponent, OutputConflict, StaleArtifact
from latentrt.manifest import (
    ENGINE_KIND,
    MANIFEST,
    ONNX_KIND,
    atomic_write_json,
    check_writable,
    move_into_place,
    publish_modes,
    read_manifest,
    sha256_tree,
    staging_dir,
)
from latentrt.manifest_checks import sealed
from latentrt.outputs import check_replaceable, output_lock, removed_if_failed, written_files
from latentrt.parity import Tolerance, compare, merge
from latentrt.paths import inside

from .calibration import Feed
from .recipes import CALIBRATION, DEFAULT_RECIPE, METHODS, RECIPES, Int8Recipe

__all__ = ["CALIBRATION", "DEFAULT_RECIPE", "METHODS", "RECIPES", "Feed", "Int8Recipe", "compare_outputs",
           "fuse_attention", "op_counts", "quantize_engine_dir", "quantize_recipe", "quantize_unet_int8"]

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 1_800_000_000  # above this the quantized model is saved with external data (2 GB proto limit)


class FeedReader(CalibrationDataReader):
    """`CalibrationDataReader` over a list of feeds (name -> array)."""

    def __init__(self, feeds: Iterable[Feed]):
        super().__init__()
        self._feeds = [dict(f) for f in feeds]
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)


def _constant_names(model: Any) -> set[str]:
    """Initializers and `Constant` outputs (inputs that are weights, not activations)."""
    names = {t.name for t in model.graph.initializer}
    names.update(o for n in model.graph.node if n.op_type == "Constant" for o in n.output)
    return names


def activation_matmuls(model: Any) -> list[str]:
    """MatMul nodes whose inputs are both activations (attention scores and attention x values)."""
    consts = _constant_names(model)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


def edge_convs(model: Any) -> list[str]:
    """The first and the last Conv in graph order (the UNet's conv_in and conv_out)."""
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    return list(dict.fromkeys(convs[:1] + convs[-1:]))


def op_counts(path: str | os.PathLike[str]) -> dict[str, int]:
    """Node count per op type of an ONNX file (weights not loaded)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(Counter(n.op_type for n in graph.node).most_common())


def model_bytes(path: Path) -> int:
    """Size of an ONNX file plus the external data files it names."""
    import onnx

    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    files = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return total + sum((path.parent / f).stat().st_size for f in files if (path.parent / f).is_file())


def skip_convs(model: Any) -> list[str]:
    """Conv nodes whose input is a Concat output (the up blocks' skip-connection shortcuts)."""
    concat = {o for n in model.graph.node if n.op_type == "Concat" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.input[0] in concat]


def _excluded(model: Any, recipe: Int8Recipe, extra: Sequence[str]) -> list[str]:
    names = activation_matmuls(model) + (edge_convs(model) if recipe.fp32_edges else []) + \
        (skip_convs(model) if recipe.fp32_skip_convs else []) + list(extra)
    return list(dict.fromkeys(names))


def _prepared_source(src: Path, dest: Path, fuse: bool) -> tuple[Path, Any, int]:
    """(file to quantize, its graph without weights, attentions fused): nodes named, attention optionally fused.

    The quantizer's exclusions are by node name, so unnamed nodes get names; a copy is written only
    when something changed.
    """
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    unnamed = any(not n.name for n in model.graph.node)
    if not unnamed and not fuse:
        return src, model, 0
    model = onnx.load(str(src))
    for i, n in enumerate(x for x in model.graph.node if not x.name):
        n.name = f"{n.op_type}_{i}_unnamed"
    fused = fuse_attention_model(model) if fuse else 0
    onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dest.name + ".data", size_threshold=1024)
    return dest, onnx.load(str(dest), load_external_data=False), fused


def quantize_unet_int8(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *,
                       method: str = "static", calibration_feeds: Sequence[Feed] | None = None,
                       op_types: Sequence[str] | None = None, per_channel: bool = True, fp32_edges: bool = True,
                       fp32_skip_convs: bool = True, fuse_attention: bool = False, calibration: str = "minmax",
                       nodes_to_exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Write an int8 version of an fp32 UNet ONNX file and return what was done (for the manifest).

    Args:
        onnx_path: fp32 UNet (an ONNX export's `unet/model.onnx`, not an ORT-optimized engine graph).
        out_path: where the int8 `.onnx` goes (weights inline, or `<name>.data` beside it above ~1.8 GB).
        method: "dynamic" (no calibration) or "static" (QDQ, needs `calibration_feeds`).
        calibration_feeds: UNet input feeds (name -> float32 array) from real fp32 sampling runs.
        op_types: op types to quantize; default ("MatMul",) for dynamic, ("Conv", "MatMul") for static.
        per_channel: per-output-channel weight scales (more accurate, same speed on the CPU EP).
        fp32_edges: keep the first and last Conv (conv_in, conv_out) in fp32.
        fp32_skip_convs: keep Convs fed by a Concat (the up blocks' skip shortcuts) in fp32.
        fuse_attention: first fuse attention subgraphs into com.microsoft.MultiHeadAttention (exact).
        calibration: static range estimator: "minmax", "percentile" or "entropy".
        nodes_to_exclude: more node names to keep in fp32 (attention score MatMuls always are).
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if method not in METHODS:
        raise BuildError(f"unknown int8 method {method!r}; choose one of {', '.join(METHODS)}")
    if calibration not in CALIBRATION:
        raise BuildError(f"unknown calibration {calibration!r}; choose one of {', '.join(CALIBRATION)}")
    if method == "static" and not calibration_feeds:
        raise BuildError("static int8 needs calibration feeds (UNet inputs from fp32 sampling runs); "
                         "pass calibration_feeds or use method='dynamic'")
    ops = tuple(op_types or (("MatMul",) if method == "dynamic" else ("Conv", "MatMul")))
    recipe = Int8Recipe(method, ops, per_channel, fp32_edges, fp32_skip_convs, fuse_attention, calibration)
    src, out = Path(onnx_path), Path(out_path)
    if not src.is_file():
        raise BuildError(f"{src} does not exist: quantization needs the fp32 UNet ONNX file")
    out.parent.mkdir(parents=True, exist_ok=True)
    external = model_bytes(src) > EXTERNAL_DATA_BYTES
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="latentrt-int8-", dir=out.parent) as tmp:
        named, graph, fused = _prepared_source(src, Path(tmp) / "source.onnx", fuse_attention)
        excluded = _excluded(graph, recipe, nodes_to_exclude)
        common: dict[str, Any] = dict(op_types_to_quantize=list(ops), per_channel=per_channel,
                                      weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                                      use_external_data_format=external)
        try:
            if method == "dynamic":
                quantize_dynamic(str(named), str(out), extra_options={"MatMulConstBOnly": True}, **common)
            else:
                methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                           "entropy": CalibrationMethod.Entropy}
                quantize_static(str(named), str(out), FeedReader(calibration_feeds or ()),
                                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                                calibrate_method=methods[calibration], calibration_providers=["CPUExecutionProvider"],
                                extra_options={"MatMulConstBOnly": True}, **common)
        except Exception as e:  # the quantizer raises plain Exceptions / ORT errors
            raise BuildError(f"int8 quantization of {src} failed: {e}") from None
    seconds = time.perf_counter() - start
    counts = op_counts(out)
    log.info("int8 %s UNet written to %s in %.1f s", method, out, seconds)
    return {
        "precision": Precision.INT8.value,
        "recipe": asdict(recipe),
        "calibration_feeds": len(calibration_feeds or ()),
        "fp32_nodes": len(excluded),
        "fused_attention": fused,
        "int8_nodes": {op: n for op, n in counts.items()
                       if op in ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DequantizeLinear",
                                 "DynamicQuantizeLinear", "QuantizeLinear")},
        "size_mb": {Precision.FP32.value: round(model_bytes(src) / 2**20, 2),
                    Precision.INT8.value: round(model_bytes(out) / 2**20, 2)},
        "quantize_s": round(seconds, 3),
    }


def quantize_recipe(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str], recipe: str | Int8Recipe,
                    calibration_feeds: Sequence[Feed] | None = None) -> dict[str, Any]:
    """`quantize_unet_int8` with one of the named `RECIPES` (or an explicit `Int8Recipe`)."""
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise BuildError(f"unknown int8 recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        name, r = recipe, RECIPES[recipe]
    else:
        name, r = "custom", recipe
    info = quantize_unet_int8(onnx_path, out_path, method=r.method, op_types=r.op_types, per_channel=r.per_channel,
                              fp32_edges=r.fp32_edges, fp32_skip_convs=r.fp32_skip_convs,
                              fuse_attention=r.fuse_attention, calibration=r.calibration,
                              calibration_feeds=calibration_feeds if r.method == "static" else None)
    return {"recipe_name": name, **info}


def compare_outputs(fp32_path: str | os.PathLike[str], int8_path: str | os.PathLike[str], feeds: Sequence[Feed],
                    threads: int | None = None) -> dict[str, float]:
    """Max |diff|, max |diff| / max |fp32| and mean relative L2 error of two UNets on the same feeds (first output).

    Each feed is compared with `latentrt.parity.compare` (the int8 UNet against the fp32 one); there is no
    pass/fail bound here (int8 is lossy by design), only a BuildError for non-finite int8 outputs.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    a = ort.InferenceSession(str(fp32_path), so, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(int8_path), so, providers=["CPUExecutionProvider"])
    name = a.get_outputs()[0].name
    reports = [compare({name: b.run(None, dict(feed))[0]}, {name: a.run(None, dict(feed))[0]}, Tolerance(),
                       context=f"int8 vs fp32 UNet, feed {i}") for i, feed in enumerate(feeds)]
    tensors = [r.tensor(name) for r in reports]
    if any(not np.isfinite(t.max_abs_diff) for t in tensors):
        raise BuildError(f"{int8_path} produced non-finite outputs ({merge(reports).context})")
    worst = max((t.max_abs_diff for t in tensors), default=0.0)
    scale = max((t.max_abs_ref for t in tensors), default=0.0)
    return {"max_abs_diff": worst, "relative": worst / max(scale, 1e-12),
            "rel_l2_mean": float(np.mean([t.rel_l2 for t in tensors]))}


# ---------------------------------------------------------------------------- engine folders


def source_unet(engine_dir: Path, manifest: Mapping[str, Any]) -> Path:
    """The fp32 UNet ONNX file an ONNX Runtime engine folder was built from (its export's `unet`).

    The export's folder is read from the engine manifest (`source.onnx_dir`), which is untrusted: it is
    followed only when it holds a LatentRT ONNX export (checked like any manifest, its UNet path kept
    inside it) of the model the engines were built from.
    """
    source = manifest.get("source")
    onnx_dir = source.get("onnx_dir") if isinstance(source, Mapping) else None
    if not isinstance(onnx_dir, str) or not onnx_dir or not (Path(onnx_dir) / "manifest.json").is_file():
        raise BuildError(f"{engine_dir} does not name an existing ONNX export (source.onnx_dir = {onnx_dir!r}); "
                         "pass onnx_path= the fp32 unet/model.onnx")
    export = read_manifest(onnx_dir, ONNX_KIND)
    if export.get("source") != (source or {}).get("model") or "unet" not in export["components"]:
        raise BuildError(f"{onnx_dir}, named by {engine_dir}/manifest.json, is not the export its engines were built "
                         "from (another model, or no unet); pass onnx_path= the fp32 unet/model.onnx")
    return inside(Path(onnx_dir), export["components"]["unet"]["path"], f"{onnx_dir}/manifest.json unet path")


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def quantize_engine_dir(engine_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                        recipe: str | Int8Recipe = DEFAULT_RECIPE, calibration_feeds: Sequence[Feed] | None = None,
                        onnx_path: str | os.PathLike[str] | None = None, overwrite: bool = False) -> Path:
    """Copy an ONNX Runtime engine folder to `out_dir` with an int8 UNet; the manifest says what changed.

    The int8 UNet is quantized from the fp32 export (`onnx_path`, default the export the folder was
    built from), not from the ORT-optimized engine graph, whose fused ops the quantizer does not know.
    Other components are hard-linked (or copied) unchanged. The folder loads like any engine folder.
    `out_dir` follows the rules of `latentrt.outputs`, like `build_engines`: one writer at a time, a
    folder holding anything LatentRT did not write is never replaced, and one holding another model's
    artifact only with `overwrite`.
    """
    src_dir, out = Path(engine_dir), Path(os.path.abspath(out_dir))  # "." has no name to stage or lock beside
    manifest = read_manifest(src_dir, ENGINE_KIND)
    if manifest.get("backend") != BuildBackend.ONNXRUNTIME:
        raise BuildError(f"{src_dir} holds {manifest.get('backend')} engines; int8 quantization is for ONNX Runtime "
                         "engine folders (build one with `latentrt build ONNX_DIR --backend onnxruntime`)")
    if "unet" not in manifest["components"]:
        raise BuildError(f"{src_dir} has no unet engine to quantize")
    if out.resolve() == src_dir.resolve():
        raise OutputConflict(f"the int8 engine folder {out} is the fp32 engine folder; choose another")
    fp32 = Path(onnx_path) if onnx_path else source_unet(src_dir, manifest)
    with removed_if_failed(out.parent), output_lock(check_writable(out.parent) / out.name):
        _check_int8_output(out, manifest, overwrite)
        _quantize_locked(src_dir, out, manifest, fp32, recipe, calibration_feeds)
    log.info("wrote int8-UNet ONNX Runtime engines to %s", out)
    return out


def _check_int8_output(out: Path, manifest: Mapping[str, Any], overwrite: bool) -> None:
    """OutputConflict unless `out` may be replaced: only what LatentRT wrote, another model's only with `overwrite`."""
    if check_replaceable(out, "engines") is None or overwrite:
        return
    try:
        old = read_manifest(out, ENGINE_KIND)
    except (MissingComponent, StaleArtifact) as e:
        raise OutputConflict(f"{out} exists and does not hold usable LatentRT engines ({e}); pass overwrite=True to "
                             "replace it or choose another folder") from None
    if old.get("source", {}).get("model") != manifest.get("source", {}).get("model"):
        raise OutputConflict(f"{out} holds engines of another model ({old.get('source', {}).get('model')}); pass "
                             "overwrite=True to replace them or choose another folder")


def _quantize_locked(src_dir: Path, out: Path, manifest: Mapping[str, Any], fp32: Path, recipe: str | Int8Recipe,
                     calibration_feeds: Sequence[Feed] | None) -> None:
    """Stage the int8 engine folder and swap it in for `out` (run while holding `out`'s lock)."""
    unet = dict(manifest["components"]["unet"])
    with staging_dir(out) as tmp:
        for p in sorted(src_dir.rglob("*")):
            rel = p.relative_to(src_dir)
            if p.is_file() and not p.is_symlink() and rel.parts[0] != "unet" and p.name != MANIFEST:
                _link_or_copy(p, tmp / rel)
        dest = tmp / "unet" / "model.onnx"
        info = quantize_recipe(fp32, dest, recipe, calibration_feeds)
        unet.update(path="unet/model.onnx", precision=Precision.INT8.value, sha256=sha256_tree(dest.parent),
                    size_mb=round(sum(f.stat().st_size for f in dest.parent.iterdir()) / 2**20, 3),
                    size_bytes=dest.stat().st_size, build_s=info["quantize_s"], cache_key=f"int8:{info['recipe_name']}",
                    int8=info,
                    ort={"device": Device.CPU.value, "graph_optimization_level": "none (optimized at session start)"})
        new = dict(manifest, precision=Precision.INT8.value, components={**manifest["components"], "unet": unet},
                   int8={"component": "unet", "recipe": info["recipe_name"], "base_engines": str(src_dir.resolve()),
                         "fp32_unet": str(fp32.resolve())})
        atomic_write_json(tmp / MANIFEST, sealed({**new, "written": written_files(tmp)}))
        publish_modes(tmp)
        move_into_place(tmp, out)


# ---------------------------------------------------------------------------- attention fusion


def _const_int(graph: Any, name: str) -> int | None:
    """The scalar / 1-element integer value of an initializer or Constant output, else None."""
    from onnx import numpy_helper

    for t in graph.initializer:
        if t.name == name:
            a = numpy_helper.to_array(t)
            return int(a.reshape(-1)[0]) if a.size == 1 else None
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            a = numpy_helper.to_array(n.attribute[0].t)
            return int(a.reshape(-1)[0]) if a.size == 1 else None
    return None


def _heads_of(graph: Any, reshape: Any, producer: Mapping[str, Any]) -> int | None:
    """Number of heads of a (B, S, C) -> (B, S, H, D) Reshape whose shape is Concat(B, S, H, D)."""
    concat = producer.get(reshape.input[1])
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
        return None
    src = producer.get(concat.input[2])
    name = src.input[0] if src is not None and src.op_type == "Unsqueeze" else concat.input[2]
    return _const_int(graph, name)


def _perm(node: Any) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _head_split(name: str, perm: list[int], producer: Mapping[str, Any], scaled: bool) -> tuple[str, Any] | None:
    """Walk back [Mul(scale)] <- Transpose(perm) <- Reshape(B,S,H,D) to the (B, S, C) projection output."""
    node = producer.get(name)
    if scaled:
        if node is None or node.op_type != "Mul":
            return None
        node = next((producer[i] for i in node.input if i in producer and producer[i].op_type == "Transpose"), None)
    if node is None or node.op_type != "Transpose" or _perm(node) != perm:
        return None
    reshape = producer.get(node.input[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    return reshape.input[0], reshape


def _match_sdpa(softmax: Any, graph: Any, producer: Mapping[str, Any],
                consumers: Mapping[str, list[Any]]) -> tuple[str, str, str, str, int, Any] | None:
    """(q, k, v, output, heads, final Reshape) of one exported scaled_dot_product_attention, else None."""
    scores = producer.get(softmax.input[0])
    if scores is None or scores.op_type != "MatMul":
        return None
    q = _head_split(scores.input[0], [0, 2, 1, 3], producer, scaled=True)
    k = _head_split(scores.input[1], [0, 2, 3, 1], producer, scaled=True)
    after = consumers.get(softmax.output[0], [])
    if q is None or k is None or len(after) != 1 or after[0].op_type != "MatMul" or after[0].input[0] != softmax.output[0]:
        return None
    v = _head_split(after[0].input[1], [0, 2, 1, 3], producer, scaled=False)
    t = consumers.get(after[0].output[0], [])
    if v is None or len(t) != 1 or t[0].op_type != "Transpose" or _perm(t[0]) != [0, 2, 1, 3]:
        return None
    r = consumers.get(t[0].output[0], [])
    heads = _heads_of(graph, q[1], producer)
    if len(r) != 1 or r[0].op_type != "Reshape" or not heads:
        return None
    return q[0], k[0], v[0], r[0].output[0], heads, r[0]


def fuse_attention_model(model: Any) -> int:
    """Replace exported SDPA subgraphs (reshape/transpose/scale/MatMul/Softmax/MatMul) by one
    `com.microsoft.MultiHeadAttention` node each (ONNX Runtime's fused CPU/CUDA kernel); returns the count.

    The legacy exporter writes diffusers' `F.scaled_dot_product_attention` with the default scale
    1/sqrt(head_dim), which is MultiHeadAttention's default too; callers check parity afterwards.
    """
    from onnx import helper

    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    replace_at: dict[int, Any] = {}
    index = {id(n): i for i, n in enumerate(graph.node)}
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        m = _match_sdpa(softmax, graph, producer, consumers)
        if m is None:
            continue
        q, k, v, out, heads, last = m
        replace_at[index[id(last)]] = helper.make_node(
            "MultiHeadAttention", [q, k, v], [out], domain="com.microsoft", num_heads=heads,
            name=softmax.name.rsplit("/", 1)[0] + "/MultiHeadAttention")
    if not replace_at:
        return 0
    nodes = _live([replace_at.get(i, n) for i, n in enumerate(graph.node)], {o.name for o in graph.output})
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replace_at)


def _live(nodes: Sequence[Any], outputs: set[str]) -> list[Any]:
    """Nodes that (transitively) feed a graph output, in the original order."""
    needed, keep = set(outputs), [False] * len(nodes)
    for i in range(len(nodes) - 1, -1, -1):
        if any(o in needed for o in nodes[i].output):
            keep[i] = True
            needed.update(x for x in nodes[i].input if x)
    return [n for n, k in zip(nodes, keep) if k]


def fuse_attention(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> int:
    """`fuse_attention_model` on an ONNX file, written to `dest` (external data above ~1.8 GB)."""
    import onnx

    src, dest = Path(src), Path(dest)
    model = onnx.load(str(src))
    count = fuse_attention_model(model)
    external = model_bytes(src) > EXTERNAL_DATA_BYTES
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dest), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=dest.name + ".data")
    return count
