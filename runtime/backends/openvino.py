"""OpenVINO backend: one compiled model per component (CPU plugin), fed torch tensors' memory.

Runs built IR engines (`latentrt build --backend openvino`) or an ONNX export's files directly (OpenVINO
reads ONNX; default plugin settings: no performance hint, the f32 precision unless asked).

Settings come from the engine manifest's `openvino` entry (`latentrt build --backend openvino`): the
inference precision hint (f32, or bf16 for a bf16 build), the LATENCY performance hint and the inference
threads. Compiled models are cached per process, keyed by file, settings and (static engines) shape: a
second pipeline over the same folder compiles nothing. A static engine (`--static`) compiles a copy reshaped
to the request's concrete shapes when its latent size is one the build planned, the dynamic IR otherwise.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentrt.errors import BackendUnavailable, MissingComponent, StaleArtifact
from latentrt.names import DIM_LATENT_HEIGHT, DIM_LATENT_WIDTH
from latentrt.tensors import ComponentIO, Sizes, shape_of

from .base import Engine

log = logging.getLogger(__name__)

PERFORMANCE_HINT = "LATENCY"
INFERENCE_PRECISIONS = ("f32", "bf16")
_COMPILED: dict[tuple[Any, ...], Any] = {}  # (file, stat, settings, shape) -> openvino.CompiledModel
_LOCK = threading.Lock()


def _core() -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise BackendUnavailable("these engines need OpenVINO, which is not installed here (pip install "
                                 "'latentrt[openvino]')") from None
    return ov.Core()


def compiled_cache_size() -> int:
    """How many compiled models this process holds (for tests and `describe`)."""
    return len(_COMPILED)


class OpenVinoEngine(Engine):
    """One component's OpenVINO IR, compiled for the CPU with the manifest's settings."""

    backend = "openvino"

    def __init__(self, path: str | Path, io: ComponentIO, *, inference_precision: str = "f32",
                 threads: int | None = None, static_latents: Sequence[Mapping[str, int]] = (),
                 performance_hint: str | None = PERFORMANCE_HINT):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingComponent(f"{io.component}: OpenVINO IR {self.path} is missing")
        if self.path.suffix == ".xml" and not self.path.with_suffix(".bin").is_file():
            raise MissingComponent(f"{io.component}: OpenVINO weights {self.path.with_suffix('.bin')} are missing; "
                                   "rebuild the engines")
        if inference_precision not in INFERENCE_PRECISIONS:
            raise StaleArtifact(f"{io.component}: the manifest asks for inference precision {inference_precision!r}; "
                                f"OpenVINO engines run {' or '.join(INFERENCE_PRECISIONS)}: rebuild the engines")
        super().__init__(io, "cpu")
        self.inference_precision, self.threads, self.performance_hint = inference_precision, threads, performance_hint
        try:
            self.static = {(int(s[DIM_LATENT_HEIGHT]), int(s[DIM_LATENT_WIDTH])) for s in static_latents}
        except (KeyError, TypeError, ValueError):
            raise StaleArtifact(f"{io.component}: the manifest's static latent sizes are malformed; rebuild the "
                                "engines") from None
        self.core = _core()
        try:
            self.model: Any = self.core.read_model(str(self.path))
        except Exception as e:  # a truncated or foreign file
            raise StaleArtifact(f"{io.component}: {self.path} is not a readable OpenVINO model ({_first_line(e)}); "
                                "rebuild the engines") from None
        self._check_names()
        self._compiled: Any = None
        self._request: Any = None
        self._key: tuple[Any, ...] | None = None
        self._prepare({})  # compile the dynamic model now: loading, not the first request, pays for it

    def _check_names(self) -> None:
        """The IR's inputs and outputs must be the ones the IO spec names (catches a stale or foreign file)."""
        for what, ports, expected in (("inputs", self.model.inputs, self.io.input_names),
                                      ("outputs", self.model.outputs, self.io.output_names)):
            names = {n for p in ports for n in p.get_names()}
            if not set(expected) <= names:
                raise StaleArtifact(f"{self.component}: {self.path} has {what} {sorted(names)}, its IO spec names "
                                    f"{sorted(expected)} (a stale or foreign file); rebuild the engines")

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.inference_precision}
        if self.performance_hint:
            config["PERFORMANCE_HINT"] = self.performance_hint
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        return config

    def static_shape(self, sizes: Sizes) -> dict[str, tuple[int, ...]] | None:
        """The concrete input shapes to compile for, when the request's latent size is a planned static one."""
        latent = (sizes.get(DIM_LATENT_HEIGHT), sizes.get(DIM_LATENT_WIDTH))
        if latent not in self.static:
            return None
        return {t.name: shape_of(t, sizes) for t in self.io.inputs}

    def _prepare(self, sizes: Sizes) -> None:
        shapes = self.static_shape(sizes)
        st = self.path.stat()
        key = (str(self.path.resolve()), st.st_size, st.st_mtime_ns, tuple(sorted(self.config().items())),
               tuple(sorted(shapes.items())) if shapes else None)
        if key == self._key:
            return
        with _LOCK:
            compiled = _COMPILED.get(key)
            if compiled is None:
                model = self.model if self.model is not None else self.core.read_model(str(self.path))
                if shapes is not None:
                    model = model.clone()
                    model.reshape(dict(shapes))
                log.info("%s: compiling the OpenVINO model (%s%s)", self.component, self.inference_precision,
                         f", static {shapes}" if shapes else ", dynamic")
                compiled = _COMPILED[key] = self.core.compile_model(model, "CPU", self.config())
        self._compiled, self._request, self._key = compiled, compiled.create_infer_request(), key
        if not self.static:  # nothing left to reshape: free the source model (an ONNX one holds its weights)
            self.model = None

    def _run(self, inputs: dict[str, torch.Tensor], sizes: Sizes) -> Mapping[str, torch.Tensor]:
        """Infer on the inputs' memory (shared, no copy); outputs copied out of the request's buffers."""
        import openvino as ov

        feed = {name: ov.Tensor(x.numpy(), shared_memory=True) for name, x in inputs.items()}
        self._request.infer(feed)
        return {t.name: torch.from_numpy(np.array(self._request.get_tensor(t.name).data, copy=True))
                for t in self.io.outputs}

    def describe(self) -> str:
        static = f", static at {len(self.static)} latent size(s)" if self.static else ""
        return f"openvino {self.component} on CPU ({self.inference_precision}{static}) ({self.path})"

    def close(self) -> None:
        self._request = None
        self._compiled = None


def _first_line(e: Exception) -> str:
    """The informative line of an OpenVINO error (its first lines only name OpenVINO's own source files)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith("Exception from")]
    return lines[-1][:200] if lines else type(e).__name__
