"""PyTorch reference backend: runs the flat-IO wrapper module of one component (`latentrt.reference.wrappers`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from latentrt.tensors import ComponentIO, Sizes, TensorSpec

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
        """Wrap one component of a `LoadedModel` (reference.models.load_checkpoint) as an engine."""
        from latentrt.reference.wrappers import wrap

        return cls(wrap(component, loaded), io, device, dtype)

    def tensor_dtype(self, spec: TensorSpec) -> torch.dtype:
        """Floating inputs run in the module's dtype (fp16 references); integer ones as the IO spec says."""
        want = TORCH_DTYPES[spec.dtype]
        return self.dtype if want.is_floating_point else want

    def _run(self, inputs: dict[str, torch.Tensor], sizes: Sizes) -> Mapping[str, torch.Tensor]:
        with torch.no_grad():
            out = self.module(*(inputs[n] for n in self.io.input_names))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return dict(zip(self.io.output_names, outs))

    def describe(self) -> str:
        return f"torch {self.component} on {self.device} ({str(self.dtype).removeprefix('torch.')})"

    def close(self) -> None:
        self.module = torch.nn.Module()
