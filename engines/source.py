"""The ONNX export a build reads: its manifest, family and component IO, checked as untrusted input."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentrt.errors import MissingComponent, StaleArtifact
from latentrt.families import FamilySpec, get_family
from latentrt.manifest import MANIFEST, ONNX_KIND, read_manifest, sha256_file, verify_files
from latentrt.paths import inside
from latentrt.tensors import ComponentIO, io_from_json


@dataclass(frozen=True)
class OnnxExport:
    """An ONNX export folder as read from its manifest."""

    folder: Path
    manifest: Mapping[str, Any]
    manifest_sha256: str
    spec: FamilySpec
    ios: Mapping[str, ComponentIO]

    def model_path(self, component: str) -> Path:
        return self.folder / self.manifest["components"][component]["path"]

    def component_folder(self, component: str) -> str:
        """The manifest-relative path whose tree hash is the component's `sha256`."""
        parent = Path(self.manifest["components"][component]["path"]).parent
        return str(parent) if str(parent) != "." else self.manifest["components"][component]["path"]


def read_onnx_export(onnx_dir: str | os.PathLike[str]) -> OnnxExport:
    """Read an ONNX export's manifest, family and component IO (no file hashing)."""
    folder = Path(onnx_dir)
    manifest = read_manifest(folder, ONNX_KIND)
    try:
        spec = get_family(manifest["family"])
        ios = {c: io_from_json(e["io"]) for c, e in manifest["components"].items()}
    except (KeyError, TypeError) as e:
        raise StaleArtifact(f"{folder / MANIFEST} is incomplete ({e}); re-run `latentrt export`") from None
    order = [c for c in spec.components if c in ios] + [c for c in ios if c not in spec.components]
    return OnnxExport(folder, manifest, sha256_file(folder / MANIFEST), spec, {c: ios[c] for c in order})


def select_components(export: OnnxExport, components: Sequence[str] | None) -> list[str]:
    if components is None:
        return list(export.ios)
    unknown = [c for c in components if c not in export.ios]
    if unknown:
        raise MissingComponent(f"{export.folder} has no component(s) {', '.join(unknown)}; it has "
                               f"{', '.join(export.ios)}")
    return [c for c in export.ios if c in components]


def verify_export(export: OnnxExport, components: Sequence[str]) -> None:
    """Check the export's files against its manifest (StaleArtifact / MissingComponent on mismatch)."""
    entries = export.manifest["components"]
    verify_files(export.folder, {export.component_folder(c): entries[c]["sha256"] for c in components})
    verify_files(export.folder, dict(export.manifest.get("files", {})))


def copy_files(export: OnnxExport, tmp: Path) -> dict[str, str]:
    """Copy the export's non-engine files (tokenizers, scheduler) and return their hashes."""
    files = dict(export.manifest.get("files", {}))
    for rel in files:
        src, dst = inside(export.folder, rel, "export file"), inside(tmp, rel, "engine file")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    return files


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
