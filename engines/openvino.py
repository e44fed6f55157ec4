"""OpenVINO engine preparation: ONNX -> OpenVINO IR (`model.xml` + `model.bin`), int8 UNets by NNCF.

fp32 and bf16 engines share one fp32 IR: bf16 is OpenVINO's CPU inference precision hint, applied when
the model is compiled (the plugin converts weights and activations then), so the file keeps full
precision and double rounding (fp32 -> fp16 file -> bf16 compute) is avoided; the manifest records the
hint. int8 is NNCF post-training quantization of the IR (`nncf.quantize`, transformer model type) on
the UNet inputs recorded by fp32 sampling runs (`engines.calibration`). Every IR is compiled and run
once against its source ONNX graph (ONNX Runtime) on the same inputs (`latentrt.parity`).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from latentrt.choices import Precision
from latentrt.errors import BackendUnavailable, BuildError
from latentrt.parity import ParityReport, Tolerance, compare
from latentrt.tensors import ComponentIO, dummy_inputs

from .onnxruntime import check_sizes

log = logging.getLogger(__name__)

MODEL = "model.xml"
WEIGHTS = "model.bin"
PERFORMANCE_HINT = "LATENCY"  # one request at a time: the pipeline runs its components in sequence
# The compile-time inference precision of each engine precision (int8 UNets: ops NNCF left unquantized run fp32).
INFERENCE_PRECISION = {Precision.FP32: "f32", Precision.BF16: "bf16", Precision.INT8: "f32"}
# Engine vs its source ONNX graph on the same random inputs: max |diff| <= r * max(1, max |reference|)
# (`latentrt.parity`). fp32: 1e-3 (fusions reorder sums, as ONNX Runtime). bf16: 8 mantissa bits (2^-9 relative
# per rounding) accumulated over every layer: measured 1.1e-2 (UNet) to 5.8e-2 (VAE decoder images) on the tiny
# random SD 1.x components at random inputs, 0.1 bounds it. int8: a sanity bound (catches a broken graph, not
# quality; the image PSNR tests judge that): measured 8.4e-2 on the tiny random UNet at random inputs, far from
# what calibration saw.
TOLERANCE = {Precision.FP32: Tolerance(atol=0.0, rtol=1e-3, scale_floor=1.0),
             Precision.BF16: Tolerance(atol=0.0, rtol=0.1, scale_floor=1.0),
             Precision.INT8: Tolerance(atol=0.0, rtol=0.5, scale_floor=1.0)}
OV_PRECISIONS = (Precision.FP32, Precision.BF16, Precision.INT8)
NNCF_RECIPE = "nncf-ptq"  # the one OpenVINO int8 recipe: NNCF post-training quantization (static, calibrated)


def openvino_available() -> tuple[bool, str]:
    """Whether OpenVINO can build (and run) engines here, and its version or why not."""
    try:
        import openvino as ov
    except ImportError:
        return False, "openvino is not installed (pip install 'latentrt[openvino]')"
    return True, f"openvino {ov.__version__}"


def require_openvino() -> str:
    """OpenVINO's version; BackendUnavailable when it is not installed."""
    ok, why = openvino_available()
    if not ok:
        raise BackendUnavailable(why)
    return why.removeprefix("openvino ")


@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 natively here ('BF16' among its optimization capabilities:
    AVX512-BF16 or AMX); False without OpenVINO."""
    if not openvino_available()[0]:
        return False
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def inference_precision(precision: Precision) -> str:
    """The CPU plugin's inference precision hint for an engine built in `precision`. An int8 engine's ops that
    stay in float (normalizations, activations, the attention subgraphs and reorders around int8 kernels) run
    in bf16 where the CPU computes bf16 natively, else f32: measured on the full-size SD 1.5 int8 UNet, those
    ops took ~25% of its per-op profile in f32 (`benchmarks/openvino_profile.py`)."""
    if precision == Precision.INT8:
        return "bf16" if cpu_native_bf16() else "f32"
    return INFERENCE_PRECISION[precision]


def nncf_version() -> str:
    try:
        import nncf
    except ImportError:
        raise BackendUnavailable("nncf is not installed: OpenVINO int8 needs it (pip install 'latentrt[openvino]')") \
            from None
    return str(nncf.__version__)


def compile_config(inference_precision: str, threads: int | None) -> dict[str, Any]:
    """The CPU plugin settings an engine is compiled with (the runtime reads the same fields from the manifest)."""
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": PERFORMANCE_HINT}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def convert_onnx(src: Path) -> Any:
    """The ONNX graph as an OpenVINO model (`openvino.convert_model`; dynamic dims stay dynamic)."""
    import openvino as ov

    try:
        return ov.convert_model(str(src))
    except Exception as e:  # OpenVINO raises its own conversion errors
        raise BuildError(f"OpenVINO could not convert {src}: {str(e).strip().splitlines()[0] if str(e) else e}") \
            from None


def quantize_int8(model: Any, feeds: Sequence[Mapping[str, np.ndarray]], io: ComponentIO) -> Any:
    """NNCF post-training int8 quantization of an OpenVINO model on recorded input feeds."""
    import nncf

    if not feeds:
        raise BuildError(f"{io.component}: OpenVINO int8 needs recorded calibration feeds (its inputs during fp32 "
                         "sampling runs): build with `latentrt build`, which records them, or pass calibration=")
    missing = [n for n in io.input_names if any(n not in f for f in feeds)]
    if missing:
        raise BuildError(f"{io.component}: the calibration feeds lack input(s) {', '.join(missing)}")
    data = [_inputs_of(f, io) for f in feeds]
    if io.component != "vae_decoder":
        return nncf.quantize(model, nncf.Dataset(data), subset_size=len(data), model_type=nncf.ModelType.TRANSFORMER)
    # A convolutional decoder: asymmetric activations (preset MIXED: its SiLU outputs are one-sided), the first and
    # last convolutions kept in float, and so are the residual additions and the attention: by default NNCF also
    # quantizes each resnet's residual stream (the Add inputs, shared with the GroupNorm) and the SDPA, and that
    # set the error floor. Full-size SD 1.5 decoder at 256x256, calibrated and judged on 1-step latents (min
    # PSNR vs fp32 over 4 held-out ones): 34.5-34.9 dB whichever convolutions were int8 (even 3 of 40), 37.1 dB
    # with the additions and attention in float, at ~1.5x bf16's speed (benchmarks/README.md).
    convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    return nncf.quantize(model, nncf.Dataset(data), subset_size=len(data), preset=nncf.QuantizationPreset.MIXED,
                         ignored_scope=nncf.IgnoredScope(names=convs[:1] + convs[-1:],
                                                         types=["Add", "ScaledDotProductAttention"], validate=False))


def _inputs_of(feed: Mapping[str, np.ndarray], io: ComponentIO) -> dict[str, np.ndarray]:
    """The entries of a recorded feed that are inputs of the component (a feed may carry more)."""
    return {k: np.asarray(v) for k, v in feed.items() if k in io.input_names}


def prepare_ov_engine(src: Path, dest: Path, io: ComponentIO, *, precision: Precision, threads: int | None,
                      feeds: Sequence[Mapping[str, np.ndarray]] = (), verify: bool = True) -> dict[str, Any]:
    """Write `dest/model.xml` + `model.bin` from the ONNX file `src`; return the manifest's `openvino` fields."""
    import openvino as ov

    if precision not in OV_PRECISIONS:
        raise BuildError(f"unknown precision {precision.value!r} for OpenVINO; choose "
                         f"{', '.join(p.value for p in OV_PRECISIONS)}")
    dest.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = convert_onnx(src)
    if precision == Precision.INT8:
        model = quantize_int8(model, feeds, io)
    for stale in (dest / MODEL, dest / WEIGHTS):
        stale.unlink(missing_ok=True)
    ov.save_model(model, str(dest / MODEL), compress_to_fp16=False)
    info: dict[str, Any] = {"version": ov.__version__, "inference_precision": inference_precision(precision),
                            "ir_weights": "int8 (NNCF)" if precision == Precision.INT8 else "fp32",
                            "performance_hint": PERFORMANCE_HINT, "threads": threads or 0,
                            "prepare_s": round(time.perf_counter() - start, 3)}
    if precision == Precision.INT8:
        info["nncf"] = nncf_version()
    if verify:
        info["check"] = verify_ov_engine(src, dest / MODEL, io, precision=precision, threads=threads, feeds=feeds)
    return info


def verify_ov_engine(src: Path, engine: Path, io: ComponentIO, *, precision: Precision,
                     threads: int | None, feeds: Sequence[Mapping[str, np.ndarray]] = ()) -> dict[str, Any]:
    """Compile the IR as the runtime does and compare it with the source ONNX graph (ONNX Runtime) on the same
    inputs; BuildError on mismatch.

    Random inputs at small sizes check that it runs; their values are judged too, except for an int8 engine,
    whose values are judged on a recorded calibration feed (the inputs it was quantized for): int8 ranges fitted
    to real latents say nothing about random ones (a VAE decoder calibrated on sampled latents is off by
    ~1.7 on one N(0, 1) input at 8x8 and fine on the latents it decodes).
    """
    import onnxruntime as ort
    import openvino as ov

    sizes = check_sizes(io)
    session = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    try:
        compiled = ov.Core().compile_model(str(engine), "CPU", compile_config(inference_precision(precision), threads))
        request = compiled.create_infer_request()
    except Exception as e:
        raise BuildError(f"{io.component}: the OpenVINO engine {engine} does not compile: {e}") from None

    def both(feed: Mapping[str, np.ndarray], context: str) -> ParityReport:
        reference = {n: np.asarray(y) for n, y in zip(io.output_names, session.run(io.output_names, dict(feed)))}
        try:
            result = request.infer(dict(feed))
            got = {n: np.asarray(result[compiled.output(n)]) for n in io.output_names}
        except Exception as e:
            raise BuildError(f"{io.component}: the OpenVINO engine {engine} does not run {context}: {e}") from None
        return compare(got, reference, TOLERANCE[precision], context=context)

    random = both(dummy_inputs(io, sizes, seed=0), f"at {dict(sizes)}")
    judged = random
    if precision == Precision.INT8:
        bad = next((t for t in random.tensors if t.shape != t.ref_shape or not math.isfinite(t.max_abs_diff)), None)
        if bad is not None:
            raise BuildError(f"{io.component}: OpenVINO int8 engine output '{bad.name}' has shape {bad.shape} or "
                             f"non-finite values (source: {bad.ref_shape}) {random.context}")
        judged = both(_inputs_of(feeds[0], io), "on a recorded calibration feed") if feeds else None
    worst = judged.worst if judged is not None else None
    if judged is not None and worst is not None and not judged.ok:
        raise BuildError(f"{io.component}: OpenVINO {precision.value} engine output '{worst.name}' differs from the "
                         f"source graph by max |diff| {worst.max_abs_diff:.3g} (tolerance {worst.limit:.3g}) "
                         f"{judged.context}")
    out: dict[str, Any] = {"ran": True, "sizes": dict(sizes), "tolerance_rtol": TOLERANCE[precision].rtol,
                           "max_abs_diff": {t.name: t.max_abs_diff for t in random.tensors}}
    if precision == Precision.INT8:
        out["judged_on"] = judged.context if judged is not None else "nothing: no calibration feed was given"
        if judged is not None and judged is not random:
            out["calibration_feed"] = {t.name: {"max_abs_diff": t.max_abs_diff, "psnr_db": round(t.psnr_db, 2)}
                                       for t in judged.tensors}
    return out
