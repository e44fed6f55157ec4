"""Per-stage timers feeding one timing record (CLI, benchmarks and server all read it the same way).

On CPU a stage is timed with `time.perf_counter`; on CUDA with a pair of CUDA events (and an NVTX
range, so the stage shows up in Nsight Systems). CUDA events are resolved only when the record is
read, so timing never forces a device sync inside the denoising loop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# Stage names the pipeline uses, in the order a table lists them.
STAGE_ORDER = ("text_encoder", "text_encoder_2", "vae_encoder", "unet", "refiner_text_encoder_2", "refiner_unet",
               "vae_decoder", "refiner_vae_decoder", "total")


@dataclass(frozen=True)
class StageStats:
    """Summary of every timing of one stage."""

    stage: str
    count: int
    total_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float


@dataclass
class TimingRecord:
    """An ordered list of (stage, milliseconds) entries, e.g. one `unet` entry per UNet call."""

    entries: list[tuple[str, float]] = field(default_factory=list)

    def add(self, stage: str, ms: float) -> None:
        self.entries.append((stage, float(ms)))

    def extend(self, other: TimingRecord, prefix: str = "") -> None:
        """Append another record's entries, optionally renaming stages with a prefix ("refiner_")."""
        self.entries.extend((prefix + s, ms) for s, ms in other.entries)

    def stages(self) -> list[str]:
        """Distinct stage names, known stages first in pipeline order, then others as first seen."""
        seen = list(dict.fromkeys(s for s, _ in self.entries))
        known = [s for s in STAGE_ORDER if s in seen and s != "total"]
        others = [s for s in seen if s not in STAGE_ORDER]
        return known + others + (["total"] if "total" in seen else [])

    def times(self, stage: str) -> list[float]:
        return [ms for s, ms in self.entries if s == stage]

    def total_ms(self, stage: str) -> float:
        return sum(self.times(stage))

    def summary(self) -> dict[str, StageStats]:
        """Per-stage count, total, mean, min and max in milliseconds."""
        out: dict[str, StageStats] = {}
        for stage in self.stages():
            t = self.times(stage)
            out[stage] = StageStats(stage, len(t), sum(t), sum(t) / len(t), min(t), max(t))
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain data: the raw entries plus the per-stage summary."""
        return {
            "entries": [[s, round(ms, 4)] for s, ms in self.entries],
            "summary": {s: {"count": v.count, "total_ms": round(v.total_ms, 4), "mean_ms": round(v.mean_ms, 4)}
                        for s, v in self.summary().items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TimingRecord:
        return cls([(str(s), float(ms)) for s, ms in data["entries"]])


def merge(records: Iterable[TimingRecord]) -> TimingRecord:
    """One record holding the entries of several (e.g. repeated benchmark runs)."""
    out = TimingRecord()
    for r in records:
        out.extend(r)
    return out


def format_table(record: TimingRecord, title: str | None = None) -> str:
    """A fixed-width per-stage table: calls, total, mean, and share of `total` when present."""
    stats = record.summary()
    total = stats["total"].total_ms if "total" in stats else sum(v.total_ms for v in stats.values())
    width = max([len("stage"), *(len(s) for s in stats)])
    lines = [title] if title else []
    lines.append(f"{'stage':<{width}}  {'calls':>5}  {'total ms':>10}  {'mean ms':>9}  {'share':>6}")
    lines.append("-" * len(lines[-1]))
    for s, v in stats.items():
        share = f"{100 * v.total_ms / total:5.1f}%" if total > 0 and s != "total" else ""
        lines.append(f"{s:<{width}}  {v.count:>5}  {v.total_ms:>10.2f}  {v.mean_ms:>9.2f}  {share:>6}")
    return "\n".join(lines)


class StageTimer:
    """Times named stages on one device; `record()` returns the finished `TimingRecord`."""

    def __init__(self, device: torch.device | str = "cpu", nvtx: bool = True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.nvtx = nvtx and self.cuda
        self._entries: list[tuple[str, Any, Any]] = []  # (stage, ms, None) or (stage, start event, end event)
        self._open: dict[str, list[Any]] = {}  # stage -> start times / events of its open entries
        self.prefix = ""  # prepended to stage names inside `prefixed` (e.g. "refiner_")

    @contextlib.contextmanager
    def prefixed(self, prefix: str) -> Iterator[None]:
        """Name the stages timed inside the body `prefix + name` (the SDXL refiner's stages)."""
        outer, self.prefix = self.prefix, prefix
        try:
            yield
        finally:
            self.prefix = outer

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the body as one entry of stage `name` (entries are kept in the order stages end)."""
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def start(self, name: str) -> None:
        """Open an entry of stage `name`, for callers that cannot wrap a block (module hooks); `stop` ends it.

        Entries of one name may nest (a stage re-entered inside itself); `stop` ends the latest.
        """
        name = self.prefix + name
        if not self.cuda:
            self._open.setdefault(name, []).append(time.perf_counter())
            return
        begin = torch.cuda.Event(enable_timing=True)
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        begin.record()
        self._open.setdefault(name, []).append(begin)

    def stop(self, name: str) -> None:
        """End the latest open entry of stage `name` (KeyError when none is open)."""
        name = self.prefix + name
        opened = self._open.get(name)
        if not opened:
            raise KeyError(f"stage {name!r} was not started")
        begin = opened.pop()
        if not self.cuda:
            self._entries.append((name, (time.perf_counter() - begin) * 1e3, None))
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        self._entries.append((name, begin, end))

    def add(self, stage: str, ms: float) -> None:
        """Add an entry measured elsewhere, in milliseconds."""
        self._entries.append((self.prefix + stage, float(ms), None))

    def record(self) -> TimingRecord:
        """Resolve pending CUDA events (one device sync) and return every entry."""
        if any(end is not None for _, _, end in self._entries):
            torch.cuda.synchronize(self.device)
        return TimingRecord([(name, a if b is None else a.elapsed_time(b)) for name, a, b in self._entries])
