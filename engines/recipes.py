"""The int8 UNet recipes (pure Python, light enough for building the CLI parser): how a UNet graph is quantized.

Why the defaults keep what they keep in fp32 is in `engines.quantize` (measured, benchmarks/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("dynamic", "static")
CALIBRATION = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class Int8Recipe:
    """One int8 variant: how the UNet graph is quantized."""

    method: str  # "dynamic" | "static"
    op_types: tuple[str, ...]  # op types quantized ("MatMul", "Conv")
    per_channel: bool = True  # one weight scale per output channel (vs one per tensor)
    fp32_edges: bool = True  # keep conv_in / conv_out (first and last Conv) in fp32
    fp32_skip_convs: bool = True  # keep Convs fed by a Concat (up-block skip shortcuts) in fp32
    fuse_attention: bool = False  # fuse attention into com.microsoft.MultiHeadAttention first
    calibration: str = "minmax"  # static only: "minmax" | "percentile" | "entropy" (the last two hold
    # every calibration activation in memory: tens of GB for a mid-size UNet and 40 feeds)


# The variants the benchmark compares; DEFAULT_RECIPE is the recommended one (see benchmarks/README.md).
RECIPES: dict[str, Int8Recipe] = {
    "dynamic-matmul": Int8Recipe("dynamic", ("MatMul",), per_channel=False),
    "dynamic-matmul-pc": Int8Recipe("dynamic", ("MatMul",), per_channel=True),
    "dynamic-conv-matmul-pc": Int8Recipe("dynamic", ("Conv", "MatMul"), per_channel=True),
    "static-qdq-conv": Int8Recipe("static", ("Conv",)),
    "static-qdq": Int8Recipe("static", ("Conv", "MatMul")),
    "static-qdq-int8-skips": Int8Recipe("static", ("Conv", "MatMul"), fp32_skip_convs=False),
    "static-qdq-mha": Int8Recipe("static", ("Conv", "MatMul"), fuse_attention=True),
    "static-qdq-all-convs": Int8Recipe("static", ("Conv", "MatMul"), fp32_edges=False, fp32_skip_convs=False),
}
DEFAULT_RECIPE = "static-qdq-mha"
