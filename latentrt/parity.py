"""One comparator: named outputs of two runs (ONNX vs PyTorch, engine vs ONNX, int8 vs fp32, backend vs
reference images) compared tensor by tensor into a typed `ParityReport`.

A tensor passes when max |got - ref| <= atol + rtol * max |ref| (max |ref| floored at `scale_floor` when set)
and every value of `got` is finite.
Export parity, engine verification, int8 checks and `latentrt bench` all read the same report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import ExportMismatch


@dataclass(frozen=True)
class Tolerance:
    """Pass if max |got - ref| <= atol + rtol * max(scale_floor, max |ref|) (e.g. fp32 ONNX against fp32 PyTorch:
    1e-4, 1e-4; `scale_floor=1` makes rtol an absolute bound for references smaller than 1)."""

    atol: float = 1e-4
    rtol: float = 1e-4
    scale_floor: float | None = None  # None: the scale is max |ref| itself

    def limit(self, reference: np.ndarray) -> float:
        scale = float(np.abs(reference).max(initial=0.0))
        if self.scale_floor is not None:
            scale = max(self.scale_floor, scale)
        return self.atol + self.rtol * scale


@dataclass(frozen=True)
class TensorParity:
    """How one named tensor of a run differs from the reference run's."""

    name: str
    max_abs_diff: float  # inf when the shapes differ or `got` has non-finite values
    max_abs_ref: float
    limit: float  # atol + rtol * max |ref| (`Tolerance.limit`)
    rel_l2: float  # ||got - ref|| / ||ref||
    psnr_db: float  # 10 log10(peak^2 / mse), peak = max |ref| (1 for images in [0, 1]); inf when identical
    shape: tuple[int, ...]
    ref_shape: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return self.shape == self.ref_shape and self.max_abs_diff <= self.limit  # False for NaN / inf


@dataclass(frozen=True)
class ParityReport:
    """The comparison of every named output; `context` says what ran against what (and at which sizes)."""

    context: str
    tensors: tuple[TensorParity, ...]

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tensors)

    @property
    def worst(self) -> TensorParity | None:
        """The tensor furthest over (or closest to) its limit."""
        return max(self.tensors, key=_excess, default=None)

    @property
    def max_abs_diff(self) -> float:
        return max((t.max_abs_diff for t in self.tensors), default=0.0)

    def tensor(self, name: str) -> TensorParity:
        return next(t for t in self.tensors if t.name == name)

    def to_json(self) -> dict[str, Any]:
        """JSON-able (manifests, bench records): non-finite numbers as strings."""
        return {"context": self.context, "ok": self.ok,
                "tensors": [{k: _finite(v) for k, v in asdict(t).items()} | {"ok": t.ok} for t in self.tensors]}

    def raise_if_failed(self, component: str) -> ParityReport:
        """ExportMismatch naming the worst tensor, its max |diff| and the limit; else the report itself."""
        bad = [t for t in self.tensors if not t.ok]
        if bad:
            t = max(bad, key=_excess)
            where = self.context if t.shape == t.ref_shape else \
                f"{self.context} (shape {t.shape}, reference {t.ref_shape})"
            raise ExportMismatch(component, t.name, t.max_abs_diff, t.limit, where)
        return self


def _excess(t: TensorParity) -> float:
    """How far over its limit a tensor is (1 at the limit); an identical tensor scores 0 even when the limit is 0."""
    if t.shape != t.ref_shape or math.isnan(t.max_abs_diff):
        return math.inf
    if t.max_abs_diff == 0:
        return 0.0
    return t.max_abs_diff / t.limit if t.limit > 0 else math.inf


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return list(v) if isinstance(v, tuple) else v


def compare_tensor(name: str, got: Any, ref: Any, tolerance: Tolerance = Tolerance(),
                   peak: float | None = None) -> TensorParity:
    """Compare one tensor (numpy arrays or anything `np.asarray` takes), in float64."""
    g = np.asarray(got, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    ref_max = float(np.abs(r).max(initial=0.0))
    limit = tolerance.limit(r)
    if g.shape != r.shape:
        return TensorParity(name, math.inf, ref_max, limit, math.inf, -math.inf, g.shape, r.shape)
    if not np.isfinite(g).all():
        return TensorParity(name, math.inf, ref_max, limit, math.inf, -math.inf, g.shape, r.shape)
    diff = np.abs(g - r)
    mse = float(np.mean(diff**2)) if diff.size else 0.0
    top = ref_max if peak is None else peak
    psnr = math.inf if mse == 0 else (10 * math.log10(top**2 / mse) if top > 0 else -math.inf)
    norm = float(np.linalg.norm(r))
    rel_l2 = float(np.linalg.norm(g - r)) / norm if norm > 0 else (0.0 if mse == 0 else math.inf)
    return TensorParity(name, float(diff.max(initial=0.0)), ref_max, limit, rel_l2, psnr, g.shape, r.shape)


def compare(got: Mapping[str, Any], ref: Mapping[str, Any], tolerance: Tolerance = Tolerance(), *,
            context: str = "", peak: float | None = None) -> ParityReport:
    """Compare the tensors named in `ref` (a name missing from `got` is a failure with an empty shape)."""
    tensors = []
    for name, r in ref.items():
        if name not in got:
            tensors.append(TensorParity(name, math.inf, 0.0, 0.0, math.inf, -math.inf, (), np.shape(r)))
            continue
        tensors.append(compare_tensor(name, got[name], r, tolerance, peak))
    return ParityReport(context, tuple(tensors))


def merge(reports: Iterable[ParityReport], context: str = "") -> ParityReport:
    """One report over several runs (feeds, sizes): per tensor name, the run furthest from its limit."""
    worst: dict[str, TensorParity] = {}
    contexts = []
    for report in reports:
        contexts.append(report.context)
        for t in report.tensors:
            if t.name not in worst or _excess(t) > _excess(worst[t.name]):
                worst[t.name] = t
    return ParityReport(context or "; ".join(c for c in contexts if c), tuple(worst.values()))
