"""TensorRT engine build (TensorRT >= 10): ONNX -> serialized plan with optimization profiles.

The only module that imports `tensorrt` at build time, and only inside functions: importing
LatentRT never needs TensorRT, and no TensorRT object is created on a machine without a GPU
(TensorRT's lean runtime crashes there). Layer selection for fp32 islands is plain Python (`engines.layers`);
the availability checks and the log tail the runtime shares live in `latentrt.tensorrt_support`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentrt.errors import BuildError
from latentrt.manifest import atomic_write_bytes
from latentrt.tensorrt_support import LogTail, make_logger, require_tensorrt

from .layers import InputProfile, LayerFilter, layer_kind

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    path: Path
    build_s: float
    size_mb: float
    device_memory_mb: float  # activation memory the engine needs at its largest profile
    profile_memory_mb: list[float]
    num_layers: int
    fp32_layers: int
    trt_version: str
    warnings: list[str] = field(default_factory=list)


def build_trt_engine(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                     profiles: Sequence[InputProfile], *, fp16: bool = True, strongly_typed: bool = False,
                     optimization_level: int = 3, refittable: bool = False,
                     timing_cache: str | os.PathLike[str] | None = None, fp32_layers: LayerFilter | None = None,
                     fp32_ops: Sequence[str] = (), workspace_mb: int | None = None, tf32: bool = True,
                     log_lines: int = 200) -> BuildResult:
    """Build a serialized TensorRT engine from an ONNX file and write it atomically.

    Args:
        onnx_path: the ONNX file (external data next to it is found by the parser).
        out_path: where the plan is written (`.plan`).
        profiles: one dict per optimization profile: input name -> (min, opt, max) shape.
        fp16: allow fp16 kernels (weakly typed networks); ignored when `strongly_typed`.
        strongly_typed: take every tensor type from the ONNX graph (for graphs already in fp16).
        optimization_level: builder optimization level 0..5 (3 is TensorRT's default).
        refittable: allow weights to be refitted later (slightly slower engines).
        timing_cache: file to load tactic timings from and save them to (shared between builds).
        fp32_layers: (layer name, kind) predicate selecting layers forced to fp32 (fp16 overflow islands).
        fp32_ops: layer kinds forced to fp32 everywhere (`layer_kind` names: "softmax", "matmul", ...).
        workspace_mb: cap on the builder's workspace memory pool (None: TensorRT's default, the whole GPU).
        tf32: allow TF32 for fp32 layers.
        log_lines: lines of the TensorRT log kept for error messages.
    """
    require_tensorrt()
    import tensorrt as trt

    if not 0 <= optimization_level <= 5:
        raise BuildError(f"optimization level must be 0..5, got {optimization_level}")
    if not profiles:
        raise BuildError("at least one optimization profile is needed")
    tail = LogTail(log_lines)
    logger = make_logger(tail)
    start = time.perf_counter()
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    _parse(trt, network, logger, Path(onnx_path), tail)
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    keep = _fp32_filter(fp32_layers, fp32_ops)
    forced = _set_precision(trt, network, config, fp16=fp16 and not strongly_typed, tf32=tf32,
                            fp32_layers=None if strongly_typed else keep)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    for p in profiles:
        config.add_optimization_profile(_profile(trt, builder, network, p))
    cache = _load_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT could not build an engine from {onnx_path}. TensorRT log (last lines):\n"
                         f"{tail.tail()}")
    data = bytes(memoryview(serialized))
    atomic_write_bytes(out_path, data)
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    del cache
    memory = _device_memory(trt, logger, data)
    return BuildResult(Path(out_path), round(time.perf_counter() - start, 3), round(len(data) / 2**20, 3),
                       memory[0], memory[1], network.num_layers, forced, str(trt.__version__),
                       [line for line in tail.lines if line.startswith("[WARNING]")][-20:])


def _parse(trt: Any, network: trt.INetworkDefinition, logger: trt.ILogger, path: Path, tail: LogTail) -> None:
    if not path.is_file():
        raise BuildError(f"ONNX file {path} does not exist")
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT's ONNX parser rejected {path}:\n{errors}\nTensorRT log (last lines):\n"
                         f"{tail.tail(15)}")


def _fp32_filter(fp32_layers: LayerFilter | None, fp32_ops: Sequence[str]) -> LayerFilter | None:
    """One predicate from a layer predicate and an op-kind block list."""
    kinds = {layer_kind(op) for op in fp32_ops}
    if not kinds:
        return fp32_layers
    return lambda name, kind: kind in kinds or (fp32_layers is not None and fp32_layers(name, kind))


def _set_precision(trt: Any, network: trt.INetworkDefinition, config: trt.IBuilderConfig, *, fp16: bool,
                   tf32: bool, fp32_layers: LayerFilter | None) -> int:
    """Set fp16/tf32 flags and force the selected layers to fp32; returns how many were forced."""
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if not tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if not fp16 or fp32_layers is None:
        return 0
    forced = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if fp32_layers(layer.name, layer_kind(layer.type.name)):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            forced += 1
    if forced:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        log.info("forced %d layers to fp32", forced)
    return forced


def _profile(trt: Any, builder: trt.Builder, network: trt.INetworkDefinition,
             shapes: InputProfile) -> trt.IOptimizationProfile:
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    missing = sorted(names - set(shapes))
    if missing:
        raise BuildError(f"the optimization profile has no shapes for network inputs {missing}")
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        if name not in names:
            raise BuildError(f"the optimization profile names '{name}', which is not a network input "
                             f"({sorted(names)})")
        profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    return profile


def _load_timing_cache(config: trt.IBuilderConfig, path: str | os.PathLike[str] | None) -> trt.ITimingCache | None:
    if path is None:
        return None
    p = Path(path)
    blob = p.read_bytes() if p.is_file() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this GPU / TensorRT; starting a new one", p)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=True)
    return cache


def _device_memory(trt: Any, logger: trt.ILogger, data: bytes) -> tuple[float, list[float]]:
    """Activation memory of the engine (max over profiles) and per profile, in MiB."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise BuildError("TensorRT built an engine it cannot deserialize")
    per = [engine.get_device_memory_size_for_profile_v2(i) / 2**20 for i in range(engine.num_optimization_profiles)]
    return round(engine.device_memory_size_v2 / 2**20, 3), [round(x, 3) for x in per]
