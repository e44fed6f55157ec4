"""The one small interface every backend implements (PyTorch reference, ONNX Runtime, TensorRT).

An `Engine` runs one component (text_encoder, unet, vae_decoder, ...) given a feed of named
torch tensors and returns named torch tensors. The pipeline never asks which backend it holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import TracebackType

import torch

from latentrt.tensors import ComponentIO, Sizes, infer_sizes

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


class Engine(ABC):
    """Runs one component on named tensors. Subclasses set `backend`, `io`, `device`."""

    backend: str = "abstract"

    def __init__(self, io: ComponentIO, device: torch.device | str = "cpu"):
        self.io = io
        self.device = torch.device(device)
        self.last_latency_ms: float = 0.0

    @property
    def component(self) -> str:
        return self.io.component

    def prepare(self, sizes: Sizes) -> None:  # noqa: B027 (optional hook: backends without profiles skip it)
        """Select a profile / allocate buffers for concrete dim sizes (batch, latent_height, ...)."""

    def covers(self, sizes: Sizes) -> bool:
        """Whether this engine accepts these dim sizes (dims it does not have are ignored): the IO spec's ranges."""
        dims = self.io.dims
        return all(dims[k].min <= v <= dims[k].max for k, v in sizes.items() if k in dims)

    def check(self, feed: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Validate a feed against the IO spec (names, ranks, consistent dims in range)."""
        return infer_sizes(self.io, feed)

    @abstractmethod
    def run(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the component. Inputs are on `self.device`; outputs are returned on `self.device`."""

    def describe(self) -> str:
        """One line saying what actually runs (e.g. the ONNX Runtime providers in use)."""
        return f"{self.backend} {self.component} on {self.device}"

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release sessions / contexts / device memory."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
