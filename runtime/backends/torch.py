"""PyTorch reference backend: runs the flat-IO wrapper module of one component (`latentrt.reference.wrappers`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from latentrt.tensors import ComponentIO

from .base import TORCH_DTYPES, Engine


class TorchEngine(Engine):
    """Runs a module taking the IO spec's inputs positionally and returning its outputs as a tuple."""

    backend = "torch"

    def __init__(self, module: torch.nn.Module, io: ComponentIO, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__(io, device)
        self.dtype = dtype
        self.module = module.to(device=self.device, dtype=dtype).eval()

    @classmethod
    def from_loaded(cls, component: str, loaded: Any, io: ComponentIO, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> TorchEngine:
        """Wrap one component of a `LoadedModel` (export.models.load_checkpoint) as an engine."""
        from latentrt.reference.wrappers import wrap

        return cls(wrap(component, loaded), io, device, dtype)

    def _input(self, name: str, dtype: str, x: torch.Tensor) -> torch.Tensor:
        want = TORCH_DTYPES[dtype]
        if want.is_floating_point:
            want = self.dtype
        return x.to(device=self.device, dtype=want)

    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check(feed)
        args = [self._input(t.name, t.dtype, feed[t.name]) for t in self.io.inputs]
        start = time.perf_counter()
        with torch.no_grad():
            out = self.module(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_latency_ms = (time.perf_counter() - start) * 1e3
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {t.name: y.float() if y.is_floating_point() else y for t, y in zip(self.io.outputs, outs)}

    def describe(self) -> str:
        return f"torch {self.component} on {self.device} ({str(self.dtype).removeprefix('torch.')})"

    def close(self) -> None:
        self.module = torch.nn.Module()
