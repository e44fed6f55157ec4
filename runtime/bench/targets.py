"""What each benchmarked backend runs from: the folders the user named, classified (nothing is built here)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentrt.choices import Backend
from latentrt.errors import InvalidRequest
from latentrt.families import FamilySpec, get_family
from latentrt.manifest import ENGINE_KIND, MANIFEST, ONNX_KIND, read_manifest

from .cases import label_for


@dataclass
class Targets:
    """The folders each backend runs from, and what preparing them cost."""

    checkpoint: str | None  # the source checkpoint (reference, torch backend, FLOP count)
    family: str | None
    onnx_dir: Path | None
    folders: dict[str, Path] = field(default_factory=dict)  # pipeline label -> engine / ONNX / checkpoint folder
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
