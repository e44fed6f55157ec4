"""ONNX Runtime backend: one `InferenceSession` per component, fed torch tensors through IO binding.

Inputs and outputs are bound straight to torch tensors' memory (zero-copy on CPU and on CUDA);
output buffers are allocated from the component's IO spec, so no shape is restated here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from latentrt.errors import MissingComponent, StaleArtifact
from latentrt.tensors import DTYPES, ComponentIO, Sizes

from .base import Engine

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
ProviderSpec = str | tuple[str, dict[str, Any]]


def default_providers(device: torch.device) -> list[ProviderSpec]:
    """CUDA EP (with CPU fallback for unsupported nodes) on a CUDA device, else the CPU EP."""
    if device.type == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def provider_name(p: ProviderSpec) -> str:
    return p if isinstance(p, str) else p[0]


def default_session_options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only; ORT's own warnings are noisy on exported UNets
    return opts


class OrtEngine(Engine):
    """Runs one exported component with ONNX Runtime."""

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], io: ComponentIO, device: torch.device | str = "cpu",
                 providers: Sequence[ProviderSpec] | None = None, session_options: ort.SessionOptions | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingComponent(f"{io.component}: ONNX file {self.path} is missing")
        requested = list(providers) if providers is not None else default_providers(torch.device(device))
        self.session = ort.InferenceSession(str(self.path), sess_options=session_options or default_session_options(),
                                            providers=requested)
        self.providers: list[str] = list(self.session.get_providers())
        self.fallback = [provider_name(p) for p in requested if provider_name(p) not in self.providers]
        on_gpu = any(p in self.providers for p in GPU_PROVIDERS)
        if self.fallback:
            log.warning("%s: ONNX Runtime did not enable %s (running on %s); check that onnxruntime-gpu is installed "
                        "and a GPU is visible", io.component, ", ".join(self.fallback), ", ".join(self.providers))
        if torch.device(device).type == "cuda" and not on_gpu:
            device = "cpu"  # feeds follow the session: binding CUDA memory to a CPU-only session would fail
        super().__init__(io, device)
        self._check_names()

    def _check_names(self) -> None:
        """The session's inputs and outputs must be the ones the IO spec names (catches a stale or foreign file)."""
        for what, found, expected in (("inputs", self.session.get_inputs(), self.io.input_names),
                                      ("outputs", self.session.get_outputs(), self.io.output_names)):
            names = {t.name for t in found}
            if names != set(expected):
                raise StaleArtifact(f"{self.component}: {self.path} has {what} {sorted(names)}, its IO spec names "
                                    f"{sorted(expected)} (a stale or foreign file); re-export the model")

    def _device_args(self) -> tuple[str, int]:
        return ("cuda", self.device.index or 0) if self.device.type == "cuda" else ("cpu", 0)

    def _run(self, inputs: dict[str, torch.Tensor], sizes: Sizes) -> Mapping[str, torch.Tensor]:
        """Bind the inputs and spec-shaped output buffers by address, run, and return the buffers."""
        kind, index = self._device_args()
        binding = self.session.io_binding()
        for spec in self.io.inputs:
            x = inputs[spec.name]
            binding.bind_input(spec.name, kind, index, DTYPES[spec.dtype], list(x.shape), x.data_ptr())
        outputs = self.empty_outputs(sizes)
        for spec in self.io.outputs:
            y = outputs[spec.name]
            binding.bind_output(spec.name, kind, index, DTYPES[spec.dtype], list(y.shape), y.data_ptr())
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream: inputs must be ready
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs

    def run_numpy(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Plain `session.run` on numpy arrays (for comparisons outside the pipeline)."""
        names = self.io.output_names
        return {n: np.asarray(y) for n, y in zip(names, self.session.run(names, dict(feed)))}

    def describe(self) -> str:
        fell_back = f" (requested {', '.join(self.fallback)}: unavailable)" if self.fallback else ""
        return f"onnxruntime {self.component} on {', '.join(self.providers)}{fell_back} ({self.path})"

    def close(self) -> None:
        if hasattr(self, "session"):
            del self.session
