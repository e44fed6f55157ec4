"""Backend-neutral layer vocabulary for engine builders: profile shapes, fp32-island filters, layer kinds.

ONNX op types (ONNX Runtime's fp16 conversion) and TensorRT layer types (TensorRT builds) map to one
small vocabulary, so one predicate such as `attention_core` selects the same fp32 islands in both.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

Shape = tuple[int, ...]
InputProfile = Mapping[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max) shape
LayerFilter = Callable[[str, str], bool]  # (layer or node name, kind: "matmul" | "softmax" | ...) -> keep in fp32

# direct children of an attention module: the QK^T / AV matmuls and the softmax (not to_q/to_k/to_v/to_out)
_ATTENTION_CORE = re.compile(r"(?:^|/)attn\d*/(?:MatMul|Softmax|Einsum)[^/]*$")


def attention_core(name: str, kind: str) -> bool:
    """Whether a node / layer is an attention score matmul or softmax (kept fp32 where fp16 overflows)."""
    return kind in ("matmul", "softmax") and bool(_ATTENTION_CORE.search(name))


def layer_kind(type_name: str) -> str:
    """Map ONNX op types and TensorRT LayerType names to a small shared vocabulary."""
    t = type_name.upper()
    if t in ("MATMUL", "MATRIX_MULTIPLY", "EINSUM", "GEMM"):
        return "matmul"
    if t in ("SOFTMAX", "RAGGED_SOFTMAX"):
        return "softmax"
    return t.lower()
