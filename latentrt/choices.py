"""The closed choices every CLI, the Python API and the server share, as enums (never restated as string lists)."""

from __future__ import annotations

from enum import Enum


class Backend(str, Enum):
    """What runs a component at generation time."""

    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"  # the PyTorch reference modules
    TENSORRT = "tensorrt"
    OPENVINO = "openvino"  # OpenVINO IR on the CPU (`latentrt[openvino]`)


class BuildBackend(str, Enum):
    """What `latentrt build` produces engines for."""

    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    OPENVINO = "openvino"


class Device(str, Enum):
    """Where ONNX Runtime engines run (and what `latentrt build` prepares them for)."""

    CPU = "cpu"
    CUDA = "cuda"


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    BF16 = "bf16"  # OpenVINO only: fp32 IR compiled with the bf16 inference precision hint


class Mode(str, Enum):
    """What a generation request does, decided from what it gives."""

    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    CONTINUE = "continue"  # continue given latents from denoising_start (SDXL refiner)


class OutputType(str, Enum):
    PIL = "pil"  # decoded images (PIL) and their float array
    LATENT = "latent"  # final latents only, no VAE decode


def values(enum: type[Enum]) -> tuple[str, ...]:
    """The string values of an enum, in declaration order (argparse `choices`)."""
    return tuple(str(m.value) for m in enum)
