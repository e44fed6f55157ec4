"""Native TensorRT backend: serialized plans run on torch CUDA tensors, without host copies.

One execution context per optimization profile; a request is routed to the profile that covers
it with the nearest opt shapes (`latentrt.profile_routing.select_profile`). Inputs and outputs are torch
CUDA tensors bound by address (`set_tensor_address`) and the engine runs with `execute_async_v3`
on torch's current stream, so it composes with the rest of the pipeline without syncs. Contexts
use user-managed activation memory from a `SharedDeviceMemory` that several engines share (they
never run at the same time), sized to the largest requirement. Optional CUDA graphs are
captured per (profile, shapes) and replayed. A plan is checked against its manifest entry (cache
key, TensorRT version, GPU compute capability) before it is deserialized.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from latentrt.cache_keys import check_engine
from latentrt.errors import MissingComponent, StaleArtifact, UnsupportedShape
from latentrt.manifest import ENGINE_KIND, read_manifest, sha256_tree
from latentrt.profile_routing import covers, select_profile
from latentrt.tensorrt_support import LogTail, gpu_info, make_logger, require_tensorrt, trt_version
from latentrt.tensors import ComponentIO, Sizes, TensorSpec, io_from_json, shape_of

from .base import Engine

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)

class SharedDeviceMemory:
    """One activation buffer shared by engines that run one at a time (TensorRT user-managed memory).

    Each engine reserves what it needs; the buffer grows to the largest reservation. `generation`
    changes whenever the buffer moves, so captured CUDA graphs know to re-capture.
    """

    def __init__(self, device: torch.device | str = "cuda"):
        self.device = torch.device(device)
        self._needs: dict[int, int] = {}
        self._buffer: torch.Tensor | None = None
        self.generation = 0

    def reserve(self, owner: object, nbytes: int) -> None:
        self._needs[id(owner)] = int(nbytes)
        want = max(self._needs.values())
        if self._buffer is None or self._buffer.numel() < want:
            self._buffer = None  # free the old block before allocating the larger one
            self._buffer = torch.empty(max(want, 1), dtype=torch.uint8, device=self.device)
            self.generation += 1

    def release(self, owner: object) -> None:
        self._needs.pop(id(owner), None)
        if not self._needs:
            self._buffer = None
            self.generation += 1

    @property
    def size(self) -> int:
        return 0 if self._buffer is None else self._buffer.numel()

    @property
    def ptr(self) -> int:
        if self._buffer is None:
            raise RuntimeError("no device memory reserved")
        return self._buffer.data_ptr()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    generation: int


def expected_key_fields() -> dict[str, Any]:
    """What a plan must have been built for to run here: this TensorRT version and GPU."""
    gpu = gpu_info()
    return {"trt_version": trt_version(), "compute_capability": gpu["compute_capability"] if gpu else None}


def check_plan_file(entry: Mapping[str, Any], path: Path, verify_hash: bool) -> None:
    """The plan file must exist and match the manifest (size always, content hash on request)."""
    if not path.is_file():
        raise MissingComponent(f"TensorRT plan {path} is missing; rebuild with `latentrt build`")
    size = entry.get("size_bytes")
    if size is not None and path.stat().st_size != size:
        raise StaleArtifact(f"{path} has {path.stat().st_size} bytes, its manifest says {size}: the plan was "
                            "replaced or truncated; rebuild with `latentrt build --overwrite`")
    if verify_hash and sha256_tree(path.parent) != entry.get("sha256"):
        raise StaleArtifact(f"{path.parent} changed since it was built (hash mismatch); rebuild with "
                            "`latentrt build --overwrite`")


def _vae_factor(manifest: Mapping[str, Any]) -> int | None:
    return ((manifest.get("model") or {}).get("dims") or {}).get("vae_scale_factor")


def _entry_beside(plan: Path, component: str) -> tuple[Mapping[str, Any], int | None]:
    """The manifest entry of a plan inside an engine folder (ENGINE_DIR/<component>/engine.plan)."""
    folder = plan.parent.parent
    m = read_manifest(folder, ENGINE_KIND)
    entry = m.get("components", {}).get(component)
    if entry is None or (folder / entry.get("path", "")).resolve() != plan.resolve():
        raise StaleArtifact(f"{plan} is not the {component} engine listed in {folder}/manifest.json; load engines "
                            "through their folder (TensorRTEngine.from_manifest / load_engines)")
    return entry, _vae_factor(m)


class TensorRTEngine(Engine):
    """Runs one component's TensorRT plan on torch CUDA tensors."""

    backend = "tensorrt"

    def __init__(self, plan_path: str | os.PathLike[str], io: ComponentIO, device: torch.device | str = "cuda", *,
                 entry: Mapping[str, Any] | None = None, memory: SharedDeviceMemory | None = None,
                 cuda_graphs: bool = False, vae_scale_factor: int | None = None, verify_hash: bool = False):
        """Load a plan. `entry` is its engine-manifest entry (default: read from ENGINE_DIR/manifest.json for
        a plan at ENGINE_DIR/<component>/engine.plan); `memory` is shared with the other engines of a set."""
        require_tensorrt()
        import tensorrt as trt

        device = torch.device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(io, device)
        if entry is None:
            entry, factor = _entry_beside(Path(plan_path), io.component)
            vae_scale_factor = vae_scale_factor or factor
        self.path = Path(plan_path)
        self.entry = dict(entry)
        check_engine(self.entry, expected_key_fields())
        check_plan_file(self.entry, self.path, verify_hash)
        self.profiles: list[Mapping[str, Any]] = list(self.entry["profiles"])
        self.vae_scale_factor = vae_scale_factor
        self.cuda_graphs = cuda_graphs
        self.memory = memory or SharedDeviceMemory(device)
        self._tail = LogTail(100)
        self._logger = make_logger(self._tail)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._deserialize()
        self._dtypes = self._tensor_dtypes()
        self.memory.reserve(self, self._engine.device_memory_size_v2)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self._contexts = [self._context(i, stream) for i in range(self._engine.num_optimization_profiles)]
        self._active: tuple[int, tuple[tuple[str, int], ...]] | None = None
        self._graphs: dict[tuple[int, tuple[tuple[str, int], ...]], _Graph] = {}

    @classmethod
    def from_manifest(cls, engine_dir: str | os.PathLike[str], component: str,
                      manifest: Mapping[str, Any] | None = None, **kwargs: Any) -> TensorRTEngine:
        """Load one component of a TensorRT engine folder (see `load_engines` for a set)."""
        folder = Path(engine_dir)
        m = manifest if manifest is not None else read_manifest(folder, ENGINE_KIND)
        if m.get("backend") != "tensorrt":
            raise StaleArtifact(f"{folder} holds {m.get('backend')} engines, not TensorRT plans; load it with that "
                                "backend or rebuild with `latentrt build --backend tensorrt`")
        entry = m.get("components", {}).get(component)
        if entry is None:
            raise MissingComponent(f"{folder} has no {component} engine (it has {', '.join(m.get('components', {}))})")
        kwargs.setdefault("vae_scale_factor", _vae_factor(m))
        return cls(folder / entry["path"], io_from_json(entry["io"]), entry=entry, **kwargs)

    # ------------------------------------------------------------------ loading

    def _deserialize(self) -> trt.ICudaEngine:
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise StaleArtifact(f"TensorRT could not deserialize {self.path} (built by another TensorRT version or "
                                f"for another GPU?); rebuild it. TensorRT log:\n{self._tail.tail(10)}")
        return engine

    def _tensor_dtypes(self) -> dict[str, torch.dtype]:
        """Engine tensor dtypes, checked against the IO spec's names."""
        import tensorrt as trt

        to_torch = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                    trt.int32: torch.int32, trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool,
                    trt.uint8: torch.uint8}
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        expected = set(self.io.input_names + self.io.output_names)
        if set(names) != expected:
            raise StaleArtifact(f"{self.path} has tensors {sorted(names)}, its manifest describes {sorted(expected)}; "
                                "rebuild the engine")
        return {n: to_torch[self._engine.get_tensor_dtype(n)] for n in names}

    def _context(self, index: int, stream: int) -> trt.IExecutionContext:
        import tensorrt as trt

        ctx = self._engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise RuntimeError(f"{self.component}: TensorRT could not create an execution context:\n"
                               f"{self._tail.tail(10)}")
        ctx.set_optimization_profile_async(index, stream)
        return ctx

    # ------------------------------------------------------------------ running

    def covers(self, sizes: Sizes) -> bool:
        """Whether some optimization profile of the plan covers these dim sizes."""
        if not self.profiles or not all("bounds" in p for p in self.profiles):
            return super().covers(sizes)
        return any(covers({k: (int(v[0]), int(v[1]), int(v[2])) for k, v in p["bounds"].items()}, sizes)
                   for p in self.profiles)

    def tensor_dtype(self, spec: TensorSpec) -> torch.dtype:
        """The plan's own tensor dtype (an fp16 plan may take and give fp16 where the IO spec says float32)."""
        return self._dtypes[spec.name]

    def _prepare(self, sizes: Sizes) -> None:
        """Route to a profile and set the input shapes for these dim sizes."""
        import tensorrt as trt

        key = tuple(sorted(sizes.items()))
        if self._active is not None and self._active[1] == key:
            return
        index = select_profile(self.component, self.profiles, sizes, self.vae_scale_factor)
        ctx = self._contexts[index]
        for t in self.io.inputs:
            shape = shape_of(t, sizes)
            if not ctx.set_input_shape(t.name, trt.Dims(list(shape))):
                raise UnsupportedShape(f"{self.component}: TensorRT rejected shape {shape} for '{t.name}' in "
                                       f"profile {index}:\n{self._tail.tail(5)}")
        for t in self.io.outputs:
            dims = ctx.get_tensor_shape(t.name)
            got = tuple(dims[i] for i in range(len(dims)))
            if got != shape_of(t, sizes):
                raise StaleArtifact(f"{self.component}: the engine gives '{t.name}' shape {got}, the IO spec "
                                    f"{shape_of(t, sizes)}; rebuild the engine")
        self._active = (index, key)

    def _run(self, inputs: dict[str, torch.Tensor], sizes: Sizes) -> Mapping[str, torch.Tensor]:
        """Run on CUDA tensors bound by address, on torch's current stream (no sync); outputs are new tensors."""
        assert self._active is not None
        if self.cuda_graphs:
            return self._replay(inputs, sizes)
        outputs = self.empty_outputs(sizes)
        self._execute(self._contexts[self._active[0]], {**inputs, **outputs})
        return outputs

    def _bind(self, ctx: trt.IExecutionContext, tensors: Mapping[str, torch.Tensor]) -> None:
        ctx.set_device_memory(self.memory.ptr, self.memory.size)
        for name, x in tensors.items():
            if not ctx.set_tensor_address(name, x.data_ptr()):
                raise RuntimeError(f"{self.component}: TensorRT rejected the address of '{name}'")

    def _execute(self, ctx: trt.IExecutionContext, tensors: Mapping[str, torch.Tensor]) -> None:
        self._bind(ctx, tensors)
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{self.component}: TensorRT execution failed:\n{self._tail.tail(10)}")

    def _replay(self, inputs: Mapping[str, torch.Tensor], sizes: Sizes) -> dict[str, torch.Tensor]:
        """Replay (capturing first if needed) the CUDA graph of the active profile and shapes."""
        assert self._active is not None
        g = self._graphs.get(self._active)
        if g is None or g.generation != self.memory.generation:
            g = self._capture(inputs, sizes)
            self._graphs[self._active] = g
        for name, x in inputs.items():
            g.inputs[name].copy_(x)
        g.graph.replay()
        return {name: y.clone() for name, y in g.outputs.items()}

    def _capture(self, inputs: Mapping[str, torch.Tensor], sizes: Sizes) -> _Graph:
        assert self._active is not None
        ctx = self._contexts[self._active[0]]
        static_in = {n: x.clone() for n, x in inputs.items()}
        static_out = self.empty_outputs(sizes)
        self._execute(ctx, {**static_in, **static_out})  # flush TensorRT's deferred shape work
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
                raise RuntimeError(f"{self.component}: TensorRT execution failed during CUDA graph capture")
        log.debug("%s: captured a CUDA graph for profile %d at %s", self.component, self._active[0], dict(sizes))
        return _Graph(graph, static_in, static_out, self.memory.generation)

    # ------------------------------------------------------------------ reporting

    def describe(self) -> str:
        gpu = torch.cuda.get_device_name(self.device)
        return (f"tensorrt {self.component} on {gpu} ({self.entry.get('precision')}, {len(self.profiles)} "
                f"profile(s){', CUDA graphs' if self.cuda_graphs else ''}; {self.path})")

    def close(self) -> None:
        self._graphs.clear()
        vars(self).pop("_contexts", None)
        vars(self).pop("_engine", None)
        self.memory.release(self)


def load_engines(engine_dir: str | os.PathLike[str], components: Sequence[str] | None = None, *,
                 device: torch.device | str = "cuda", cuda_graphs: bool = False, verify_hash: bool = False,
                 manifest: Mapping[str, Any] | None = None) -> dict[str, TensorRTEngine]:
    """Load a TensorRT engine folder's components sharing one device-memory pool (`manifest`: already read)."""
    m = manifest if manifest is not None else read_manifest(engine_dir, ENGINE_KIND)
    names = list(components) if components is not None else list(m.get("components", {}))
    memory = SharedDeviceMemory(device if torch.device(device).index is not None else "cuda")
    return {c: TensorRTEngine.from_manifest(engine_dir, c, m, device=device, memory=memory,
                                            cuda_graphs=cuda_graphs, verify_hash=verify_hash) for c in names}
