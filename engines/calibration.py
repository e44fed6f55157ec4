"""Recorded calibration data for static int8 engines: UNet input feeds from fp32 sampling runs (and, for an
int8 VAE decoder, the latents those runs decoded).

The engines stage never samples: whoever can run the pipeline (`latentrt.workflows.build`) records the
feeds and hands them over, as values or as one `.npz` file (written atomically; read without pickles,
as untrusted input).
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.npyio import NpzFile

from latentrt.buckets import Size
from latentrt.errors import BuildError
from latentrt.manifest import atomic_write_bytes

Feed = Mapping[str, np.ndarray]  # UNet input name -> array, one UNet call
META = "meta"  # the .npz entry holding how the feeds were recorded (JSON text)
# "<call index>/<input name>" (UNet feeds) or "vae_decoder/<call index>/<input name>" (decoder feeds)
_KEY = re.compile(r"^(?:(vae_decoder)/)?(\d{1,6})/([A-Za-z_][A-Za-z0-9_.:-]{0,127})$")
DECODER = "vae_decoder"


@dataclass(frozen=True)
class Calibration:
    """UNet inputs recorded while fp32 engines sampled, and how they were recorded (for the manifest)."""

    feeds: tuple[Feed, ...]
    size: Size | None = None  # (height, width) px of the sampling runs
    steps: int | None = None  # sampling steps of each run
    seconds: float = 0.0  # how long recording took
    decoder_feeds: tuple[Feed, ...] = ()  # VAE decoder inputs of the same runs (for an int8 decoder)
    guidance: float | None = None  # classifier-free guidance scale of the runs (None: the family's default)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the feeds and their description to one `.npz` file, atomically."""
        arrays: dict[str, Any] = {f"{i}/{name}": np.asarray(a) for i, feed in enumerate(self.feeds)
                                  for name, a in feed.items()}
        arrays.update({f"{DECODER}/{i}/{name}": np.asarray(a) for i, feed in enumerate(self.decoder_feeds)
                       for name, a in feed.items()})
        meta = {"size": list(self.size) if self.size else None, "steps": self.steps, "seconds": self.seconds,
                "guidance": self.guidance}
        arrays[META] = np.array(json.dumps(meta))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """Read a file written by `save` (BuildError when it is not one; never unpickles)."""
        entries = _read_npz(path)
        meta = _meta(entries.pop(META, None), path)
        feeds: dict[str | None, dict[int, dict[str, np.ndarray]]] = {None: {}, DECODER: {}}
        for key, array in entries.items():
            m = _KEY.match(key)
            if m is None or array.dtype.kind not in "fiub":
                raise BuildError(f"{path} is not a calibration feed file: unexpected entry {key[:80]!r}")
            feeds[m[1]].setdefault(int(m[2]), {})[m[3]] = array
        size = meta.get("size")
        unet, decoder = feeds[None], feeds[DECODER]
        return cls(tuple(unet[i] for i in sorted(unet)), (int(size[0]), int(size[1])) if size else None,
                   meta.get("steps"), float(meta.get("seconds") or 0.0), tuple(decoder[i] for i in sorted(decoder)),
                   meta.get("guidance"))


def _read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every array of a `.npz` file, read without pickles; a fixed message for anything else (numpy's own
    text for object arrays suggests loading the untrusted file with pickles enabled)."""
    if not os.path.isfile(path):
        raise BuildError(f"calibration feed file {path} does not exist or is not a file")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, NpzFile):  # a single .npy array
            raise ValueError("not an .npz archive")
        with data:
            return {k: np.asarray(data[k]) for k in data.files}
    except OSError as e:
        raise BuildError(f"cannot read calibration feeds from {path}: {e.strerror or 'read error'}") from None
    except (ValueError, EOFError, KeyError, zipfile.BadZipFile):
        raise BuildError(f"{path} is not a calibration feed file (an .npz of arrays written by `latentrt build`)") \
            from None


def _meta(entry: np.ndarray | None, path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recorded description, checked: {"size": [h, w] | None, "steps": int | None, "seconds": float,
    "guidance": float | None}."""
    if entry is None:
        return {}
    try:
        meta = json.loads(str(entry))
    except ValueError:
        meta = None
    size, steps = (meta.get("size"), meta.get("steps")) if isinstance(meta, dict) else (0, 0)
    ok_size = size is None or (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) for s in size))
    if not isinstance(meta, dict) or not ok_size or not (steps is None or isinstance(steps, int)) \
            or not isinstance(meta.get("seconds", 0.0), (int, float)) \
            or not (meta.get("guidance") is None or _finite_number(meta.get("guidance"))):
        raise BuildError(f"{path} is not a calibration feed file: its '{META}' entry is malformed")
    return meta


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def as_calibration(value: Calibration | Sequence[Feed] | str | os.PathLike[str] | None) -> Calibration | None:
    """Recorded feeds as a `Calibration`: given as one, as a sequence of feeds, or as a file from `save`."""
    if value is None or isinstance(value, Calibration):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Calibration.load(value)
    return Calibration(tuple(value))
