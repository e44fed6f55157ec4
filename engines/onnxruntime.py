"""ONNX Runtime engine preparation: an offline-optimized graph for the CPU EP, an fp16 graph for the CUDA EP.

CPU: ONNX Runtime applies its graph optimizations once and saves the result
(`SessionOptions.optimized_model_filepath`), so sessions start faster and run the fused graph.
`extended` (default) keeps the file portable across CPUs; `all` adds layout transforms that tie
it to this CPU type. CUDA: the fp32 graph is converted to fp16 with
`onnxruntime.transformers.float16` (IO kept fp32, fp32 islands via op/node block lists); the
CUDA EP applies its own optimizations at session start. Every prepared file is loaded in a
fresh session and compared with the source graph on the same inputs when the device is here.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from latentrt.choices import Device, Precision, values
from latentrt.errors import BackendUnavailable, BuildError
from latentrt.names import DIM_BATCH, DIM_LATENT_HEIGHT, DIM_LATENT_WIDTH, DIM_UNET_BATCH
from latentrt.onnxruntime_support import ort_level
from latentrt.parity import Tolerance, compare
from latentrt.tensors import ComponentIO, dummy_inputs

from .layers import layer_kind

log = logging.getLogger(__name__)

MODEL = "model.onnx"
DATA = "model.onnx.data"
CHECK_DIMS = (DIM_BATCH, DIM_UNET_BATCH, DIM_LATENT_HEIGHT, DIM_LATENT_WIDTH)  # checked at their minimum (cheap)
# Engine vs source graph on the same inputs: max |diff| <= r * max(1, max |reference|) (`latentrt.parity`),
# r = 1e-3 for fp32 engines (optimizer fusions reorder sums), 3e-2 for fp16 ones.
TOLERANCE = {Precision.FP32: Tolerance(atol=0.0, rtol=1e-3, scale_floor=1.0),
             Precision.FP16: Tolerance(atol=0.0, rtol=3e-2, scale_floor=1.0)}
NodeFilter = Callable[[str, str], bool]  # (node name, kind from `layer_kind(op_type)`) -> keep in fp32
ORT_PRECISIONS = (Precision.FP32, Precision.FP16)  # int8 UNets come from `engines.quantize`
CUDA_OPTIMIZES = "none (the CUDA EP optimizes at session start)"


def prepare_ort_engine(onnx_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                       device: str = Device.CPU, precision: str = Precision.FP32, graph_optimization_level: str = "extended",
                       intra_op_threads: int | None = None, io: ComponentIO | None = None,
                       fp32_ops: Sequence[str] = (), fp32_nodes: NodeFilter | None = None,
                       verify: bool = True) -> dict[str, Any]:
    """Write an ONNX Runtime engine (`out_dir/model.onnx` + external data) and return its manifest fields.

    Args:
        onnx_path: the exported fp32 ONNX file.
        out_dir: the component's engine folder (created).
        device: a `Device`: cpu (offline-optimized graph) or cuda (fp16 graph for the CUDA EP).
        precision: fp32 or fp16 (`ORT_PRECISIONS`; fp16 is a GPU format: slower than fp32 on CPUs).
        graph_optimization_level: offline level for the CPU path ('disable', 'basic', 'extended', 'all').
        intra_op_threads: threads recorded for sessions (None: ONNX Runtime's default, the physical cores).
        io: the component's IO; with it (and `verify`) the engine is checked against the source graph.
        fp32_ops / fp32_nodes: op types / a (node name, kind) predicate kept in fp32 by the fp16 conversion.
        verify: run the saved engine in a fresh session and compare with the source graph.
    """
    if device not in values(Device):
        raise BuildError(f"unknown ONNX Runtime device {device!r}; choose one of {', '.join(values(Device))}")
    if precision not in ORT_PRECISIONS:
        raise BuildError(f"unknown precision {precision!r} for ONNX Runtime; choose "
                         f"{' or '.join(repr(p.value) for p in ORT_PRECISIONS)}")
    src, out = Path(onnx_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if precision == Precision.FP16:
        blocked = convert_fp16(src, out / MODEL, fp32_ops=fp32_ops, fp32_nodes=fp32_nodes)
        applied = CUDA_OPTIMIZES if device == Device.CUDA else "none"
    elif device == Device.CPU:
        optimize_offline(src, out / MODEL, graph_optimization_level, intra_op_threads)
        blocked, applied = [], graph_optimization_level
    else:
        _copy_model(src, out)
        blocked, applied = [], CUDA_OPTIMIZES
    info: dict[str, Any] = {
        "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == Device.CUDA else ["CPUExecutionProvider"],
        "device": Device(device).value,
        "graph_optimization_level": applied,
        "session_graph_optimization_level": "all",
        "threads": {"intra_op": intra_op_threads or 0, "inter_op": 1, "execution_mode": "sequential"},
        "fp32_nodes": len(blocked),
        "prepare_s": round(time.perf_counter() - start, 3),
    }
    if verify and io is not None:
        info["check"] = verify_engine(src, out / MODEL, io, device=device, precision=precision,
                                      intra_op_threads=intra_op_threads)
    return info


def _session_options(level: str, threads: int | None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort_level(level)
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return so


def optimize_offline(src: Path, dest: Path, level: str, threads: int | None) -> None:
    """Let ONNX Runtime optimize `src` for the CPU EP and save the optimized graph (weights as external data)."""
    import onnxruntime as ort

    so = _session_options(level, threads)
    so.optimized_model_filepath = str(dest)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph types
        raise BuildError(f"ONNX Runtime could not load or optimize {src}: {e}") from None
    if not dest.is_file():
        raise BuildError(f"ONNX Runtime did not write the optimized model {dest}")


def _copy_model(src: Path, out: Path) -> None:
    """Copy an ONNX file and its external data files (same folder) unchanged."""
    import onnx

    shutil.copy2(src, out / MODEL)
    model = onnx.load(str(src), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and not (out / entry.value).exists():
                shutil.copy2(src.parent / entry.value, out / entry.value)


def convert_fp16(src: Path, dest: Path, *, fp32_ops: Sequence[str] = (), fp32_nodes: NodeFilter | None = None) -> list[str]:
    """fp32 -> fp16 graph with fp32 IO (`onnxruntime.transformers.float16`); returns the nodes kept in fp32."""
    import onnx
    from onnxruntime.transformers import float16

    graph = onnx.load(str(src), load_external_data=False).graph
    blocked = [n.name for n in graph.node if fp32_nodes is not None and fp32_nodes(n.name, layer_kind(n.op_type))]
    ops = list(dict.fromkeys([*float16.DEFAULT_OP_BLOCK_LIST, *fp32_ops]))
    try:
        model = float16.convert_float_to_float16(str(src), keep_io_types=True, op_block_list=ops,
                                                 node_block_list=blocked)
    except Exception as e:
        raise BuildError(f"fp16 conversion of {src} failed: {e}") from None
    for stale in (dest, dest.with_name(DATA)):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True, location=DATA,
                    size_threshold=1024)
    return blocked


def check_sizes(io: ComponentIO) -> dict[str, int]:
    """Small but valid sizes for a smoke run: batch and latent dims at their minimum, the rest at opt."""
    return {name: (d.min if name in CHECK_DIMS else d.opt) for name, d in io.dims.items()}


def verify_engine(src: Path, engine: Path, io: ComponentIO, *, device: str, precision: str,
                  intra_op_threads: int | None) -> dict[str, Any]:
    """Run the engine in a fresh session and the source graph on the same inputs; raise BuildError on mismatch."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device == Device.CUDA:
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            log.info("%s: no CUDA EP here; the fp16 engine was written but not run", io.component)
            return {"ran": False, "reason": "CUDAExecutionProvider not available on the build machine"}
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    sizes = check_sizes(io)
    feed = dummy_inputs(io, sizes, seed=0)
    reference = _run(src, feed, ["CPUExecutionProvider"], intra_op_threads, io)
    try:
        got = _run(engine, feed, providers, intra_op_threads, io)
    except Exception as e:
        raise BuildError(f"{io.component}: the prepared engine {engine} does not run: {e}") from None
    return _compare(io.component, reference, got, TOLERANCE[Precision(precision)], sizes)


def _run(path: Path, feed: Mapping[str, np.ndarray], providers: list[str], threads: int | None,
         io: ComponentIO) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), sess_options=_session_options("disable", threads), providers=providers)
    return {n: np.asarray(y) for n, y in zip(io.output_names, session.run(io.output_names, dict(feed)))}


def _compare(component: str, reference: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
             tolerance: Tolerance, sizes: Mapping[str, int]) -> dict[str, Any]:
    """The engine's outputs against the source graph's (`latentrt.parity.compare`); BuildError on mismatch."""
    report = compare(got, reference, tolerance, context=f"at {dict(sizes)}")
    t = report.worst
    if t is not None and not report.ok:
        raise BuildError(f"{component}: prepared engine output '{t.name}' differs from the source graph by "
                         f"max |diff| {t.max_abs_diff:.3g} (tolerance {t.limit:.3g}) {report.context}")
    return {"ran": True, "sizes": dict(sizes), "max_abs_diff": {t.name: t.max_abs_diff for t in report.tensors}}


def ort_available(device: str) -> tuple[bool, str]:
    """Whether ONNX Runtime can build (and run) engines for `device` here."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False, "onnxruntime is not installed (pip install 'latentrt[cpu]')"
    if device == Device.CUDA and "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "ONNX Runtime has no CUDAExecutionProvider here (install onnxruntime-gpu on a CUDA machine)"
    return True, f"onnxruntime {ort.__version__}"


def require_ort() -> None:
    ok, why = ort_available(Device.CPU)
    if not ok:
        raise BackendUnavailable(why)
