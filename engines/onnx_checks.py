"""An export's ONNX files checked against its manifest before a build reads them (the export is untrusted).

Each graph must have exactly the inputs and outputs the manifest's IO description names, with the
same dtypes, ranks and fixed sizes, and every external-weights location must stay inside the
component's folder (ONNX Runtime refuses escaping locations too; this says so before it runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from latentrt.errors import StaleArtifact
from latentrt.manifest import MANIFEST
from latentrt.paths import inside
from latentrt.tensors import ComponentIO

if TYPE_CHECKING:
    from .source import OnnxExport

ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32"}  # onnx.TensorProto elem types


def check_onnx_files(export: OnnxExport, components: Sequence[str]) -> None:
    """StaleArtifact unless each ONNX graph has the IO its manifest describes; UnsafePath for weights out of folder.

    A file that is not an ONNX model at all is left to the backend, which reports it as a BuildError.
    """
    import onnx

    for c in components:
        path = export.model_path(c)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001 - protobuf raises several types for a file that is not ONNX
            continue
        for tensor in _graph_tensors(model.graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                location = next((e.value for e in tensor.external_data if e.key == "location"), None)
                inside(path.parent, location, f"{path}: external weights of {tensor.name!r}")
        problem = _graph_io_problem(model.graph, export.ios[c])
        if problem:
            raise StaleArtifact(f"{path}: the ONNX graph does not match the IO in {export.folder / MANIFEST} "
                                f"({problem}); re-run `latentrt export`")


def _graph_tensors(graph: Any) -> list[Any]:
    """Initializers and constant tensors of a graph (where external data can be referenced)."""
    out = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            out += ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
    return out


def _graph_io_problem(graph: Any, io: ComponentIO) -> str | None:
    """The first difference between an ONNX graph's inputs/outputs and `io` (names, dtypes, ranks, sizes)."""
    initializers = {t.name for t in graph.initializer}
    sides = (("inputs", [v for v in graph.input if v.name not in initializers], io.inputs),
             ("outputs", list(graph.output), io.outputs))
    for what, values, specs in sides:
        found = {v.name: v for v in values}
        if set(found) != {t.name for t in specs}:
            return f"graph {what} {sorted(found)}, manifest {sorted(t.name for t in specs)}"
        for t in specs:
            tt = found[t.name].type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            dtype = ONNX_DTYPES.get(tt.elem_type, f"type {tt.elem_type}")
            if dtype != t.dtype or len(dims) != len(t.shape):
                return f"{t.name}: graph {dtype} rank {len(dims)}, manifest {t.dtype} rank {len(t.shape)}"
            fixed = [(i, a, d) for i, (a, d) in enumerate(zip(t.shape, dims)) if isinstance(a, int) and d not in (None, a)]
            if fixed:
                i, want, got = fixed[0]
                return f"{t.name}: axis {i} is {got} in the graph, {want} in the manifest"
    return None
