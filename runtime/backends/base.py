"""The one engine base every backend derives from (PyTorch reference, ONNX Runtime, TensorRT).

An `Engine` runs one component (text_encoder, unet, vae_decoder, ...) given a feed of named torch
tensors and returns named torch tensors. The base does what is the same for every backend: it checks
the feed against the component's IO spec (names, ranks, consistent dims in range), prepares the
shapes, moves and casts the inputs, times the run as one stage of a `StageTimer`, and checks and
packs the outputs. A backend implements only `_run` (and, if it has profiles or bindings,
`_prepare`). The pipeline never asks which backend it holds.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import TracebackType

import torch

from latentrt.errors import StaleArtifact
from latentrt.tensors import ComponentIO, Sizes, TensorSpec, infer_sizes, shape_of

from ..timing import StageTimer

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


class Engine(ABC):
    """Runs one component on named tensors. Subclasses set `backend` and implement `_run`."""

    backend: str = "abstract"

    def __init__(self, io: ComponentIO, device: torch.device | str = "cpu"):
        self.io = io
        self.device = torch.device(device)

    @property
    def component(self) -> str:
        return self.io.component

    # ------------------------------------------------------------------ shapes

    def covers(self, sizes: Sizes) -> bool:
        """Whether this engine accepts these dim sizes (dims it does not have are ignored): the IO spec's ranges."""
        dims = self.io.dims
        return all(dims[k].min <= v <= dims[k].max for k, v in sizes.items() if k in dims)

    def check(self, feed: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Validate a feed against the IO spec (names, ranks, consistent dims in range): UnsupportedShape if not."""
        return infer_sizes(self.io, feed)

    def prepare(self, sizes: Sizes) -> None:
        """Get ready for these concrete dim sizes (batch, latent_height, ...): select a profile, set shapes."""
        self._prepare(sizes)

    def tensor_dtype(self, spec: TensorSpec) -> torch.dtype:
        """The dtype this backend runs a tensor in (the IO spec's unless the backend computes in another)."""
        return TORCH_DTYPES[spec.dtype]

    def empty_outputs(self, sizes: Sizes) -> dict[str, torch.Tensor]:
        """Output buffers shaped by the IO spec for these sizes (for backends that write into bound memory)."""
        return {t.name: torch.empty(shape_of(t, sizes), dtype=self.tensor_dtype(t), device=self.device)
                for t in self.io.outputs}

    # ------------------------------------------------------------------ running

    def run(self, feed: Mapping[str, torch.Tensor], timer: StageTimer | None = None) -> dict[str, torch.Tensor]:
        """Run the component; with a `timer`, the backend's run is recorded as one stage named after the component.

        Inputs may be on any device and of any dtype (they are moved and cast); outputs are on `self.device`
        in the IO spec's dtypes, in the IO spec's order.
        """
        sizes = self.check(feed)
        self.prepare(sizes)
        inputs = {t.name: feed[t.name].to(device=self.device, dtype=self.tensor_dtype(t)).contiguous()
                  for t in self.io.inputs}
        with timer.stage(self.component) if timer is not None else contextlib.nullcontext():
            outputs = self._run(inputs, sizes)
        return self._pack(outputs, sizes)

    def _pack(self, outputs: Mapping[str, torch.Tensor], sizes: Sizes) -> dict[str, torch.Tensor]:
        """The backend's outputs in the IO spec's order and dtypes, checked against the spec's shapes."""
        packed = {}
        for t in self.io.outputs:
            y = outputs.get(t.name)
            if y is None:
                raise StaleArtifact(f"{self.component}: the {self.backend} engine gave no output '{t.name}' "
                                    f"(it gave {sorted(outputs)}); re-export or rebuild it")
            if tuple(y.shape) != shape_of(t, sizes):
                raise StaleArtifact(f"{self.component}: the {self.backend} engine gave '{t.name}' shape "
                                    f"{tuple(y.shape)}, the IO spec {shape_of(t, sizes)}; re-export or rebuild it")
            packed[t.name] = y.to(TORCH_DTYPES[t.dtype])
        return packed

    def _prepare(self, sizes: Sizes) -> None:  # noqa: B027 (optional hook: backends without profiles skip it)
        """Backend hook of `prepare`: select a profile / set binding shapes."""

    @abstractmethod
    def _run(self, inputs: dict[str, torch.Tensor], sizes: Sizes) -> Mapping[str, torch.Tensor]:
        """Run on checked inputs (on `self.device`, in `tensor_dtype`, contiguous) at `sizes`; outputs by name."""

    # ------------------------------------------------------------------ reporting and lifetime

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
