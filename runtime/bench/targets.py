"""What each benchmarked backend runs from: the folders the user named, classified (nothing is built here)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentrt.choices import Backend, values
from latentrt.errors import InvalidRequest
from latentrt.families import FamilySpec, get_family
from latentrt.manifest import ENGINE_KIND, MANIFEST, ONNX_KIND, read_manifest

from .cases import BACKENDS, label_for


@dataclass
class Targets:
    """The folders each backend runs from, and what preparing them cost."""

    checkpoint: str | None  # the source checkpoint (reference, torch backend, FLOP count)
    family: str | None
    onnx_dir: Path | None
    folders: dict[str, Path] = field(default_factory=dict)  # pipeline label -> engine / ONNX / checkpoint folder
    named: dict[str, str] = field(default_factory=dict)  # user-named engine folders: label -> runtime backend
    build: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> FamilySpec:
        """The model family: the manifest's, else detected from the checkpoint."""
        from latentrt.reference.models import detect_family, resolve

        if self.family:
            return get_family(self.family)
        if self.checkpoint is None:
            raise InvalidRequest("the folder names neither a family nor a source checkpoint")
        return detect_family(resolve(self.checkpoint)[0])


def _source_of(manifest: Mapping[str, Any]) -> str | None:
    """The checkpoint an ONNX export or engine folder came from (engine manifests nest the export's source)."""
    source: Any = (manifest.get("source") or {}).get("model")
    while isinstance(source, Mapping):
        source = source.get("model")
    return str(source) if source else None


def read_targets(model_or_dir: str | os.PathLike[str]) -> Targets:
    """Classify what the user passed: an engine folder, an ONNX export, or a checkpoint.

    Bench reads only the folders the user named: the export an engine manifest records
    (`source.onnx_dir`, an untrusted path) is not followed. What an engine folder alone cannot give (the
    torch backend, another backend's engines, an int8 UNet) is exported from its source checkpoint into
    the build folder, as for a checkpoint argument (`latentrt.workflows.bench`).
    """
    path = Path(model_or_dir)
    if not (path / MANIFEST).is_file():
        return Targets(checkpoint=os.fspath(model_or_dir), family=None, onnx_dir=None)
    manifest = read_manifest(path)
    family = manifest.get("family")
    if manifest.get("kind") == ONNX_KIND:
        return Targets(_source_of(manifest), family, path)
    if manifest.get("kind") != ENGINE_KIND:
        raise InvalidRequest(f"{path} holds {manifest.get('kind')!r}, not a checkpoint, ONNX export or engines")
    label = label_for(str(manifest.get("backend", Backend.ONNXRUNTIME.value)), manifest.get("precision"))
    return Targets(_source_of(manifest), family, None, {label: path})


NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")


def add_named(t: Targets, label: str, folder: str | os.PathLike[str]) -> None:
    """Bench the engine folder `folder` under a name of the user's choosing (e.g. `ours` for a hand-tuned build
    next to the standard labels). It must be engines of the same family built from the same checkpoint as the
    benchmark's model, so that its images are comparable; its runtime backend is the one its manifest names."""
    if not label or not set(label) <= NAME_CHARS or len(label) > 40:
        raise InvalidRequest(f"engine label {label!r}: use 1-40 letters, digits, '_' or '.'")
    if label in BACKENDS:
        raise InvalidRequest(f"engine label {label!r} is a backend's own name; choose another")
    if label in t.folders:
        raise InvalidRequest(f"engine label {label!r} is given twice")
    path = Path(folder)
    if not (path / MANIFEST).is_file():
        raise InvalidRequest(f"{label}={folder}: no {MANIFEST} there; name a folder `latentrt build` wrote")
    manifest = read_manifest(path)
    if manifest.get("kind") != ENGINE_KIND:
        raise InvalidRequest(f"{label}={folder} holds {manifest.get('kind')!r}, not engines")
    backend = manifest.get("backend")
    if backend not in values(Backend) or backend == Backend.TORCH.value:
        raise InvalidRequest(f"{label}={folder}: its manifest names backend {backend!r}, not one engines run on")
    if t.family and manifest.get("family") != t.family:
        raise InvalidRequest(f"{label}={folder} holds {manifest.get('family')!r} engines; the benchmark's model "
                             f"is {t.family!r}")
    source = _source_of(manifest)
    if t.checkpoint and source and Path(source).resolve() != Path(t.checkpoint).resolve():
        raise InvalidRequest(f"{label}={folder} was built from {source}, the benchmark's model from "
                             f"{t.checkpoint}: their images would not be comparable")
    t.folders[label] = path
    t.named[label] = str(backend)
