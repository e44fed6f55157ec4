"""`latentrt info DIR`: say what a folder holds (diffusers checkpoint, ONNX export, engines)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from latentrt.errors import LatentRTError, MissingComponent, StaleArtifact
from latentrt.manifest import ENGINE_KIND, MANIFEST, ONNX_KIND, read_manifest
from latentrt.paths import check_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a diffusers checkpoint, an ONNX export or an engines folder")


def run(args: argparse.Namespace) -> int:
    for line in describe(Path(args.folder)):
        print(line)
    return 0


def describe(folder: Path) -> list[str]:
    """A few lines saying what `folder` holds."""
    if (folder / MANIFEST).is_file():
        manifest = read_manifest(folder)
        lines = {ONNX_KIND: _onnx_lines, ENGINE_KIND: _engine_lines}.get(str(manifest.get("kind")))
        if lines is None:
            return [f"{folder}: a manifest of unknown kind {manifest.get('kind')!r}"]
        try:
            return lines(folder, manifest)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StaleArtifact(f"{folder / MANIFEST} is incomplete or malformed ({type(e).__name__}: {e}); re-run "
                                f"`latentrt {'export' if manifest['kind'] == ONNX_KIND else 'build'}`") from None
    if (folder / "model_index.json").is_file():
        return _checkpoint_lines(folder)
    raise MissingComponent(f"{folder} holds no diffusers checkpoint (model_index.json), ONNX export or engines "
                           f"({MANIFEST})")


def _checkpoint_lines(folder: Path) -> list[str]:
    from latentrt.reference.models import detect_family, model_index

    check_checkpoint(folder)
    index = model_index(folder)
    try:
        spec = detect_family(folder)
        family = f"family {spec.name} ({spec.title})"
    except LatentRTError as e:
        family = f"family not recognised: {e}"
    parts = [k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[1] is not None]
    return [f"{folder}: diffusers checkpoint, {index['_class_name']}", f"  {family}", f"  parts: {', '.join(parts)}"]


def _onnx_lines(folder: Path, m: dict[str, Any]) -> list[str]:
    lines = [f"{folder}: ONNX export of {m['source']['model']} ({m['family']}), opset {m['opset']}, {m['exporter']}"]
    for name, c in m["components"].items():
        checks = c.get("parity", {}).get("checks", [])
        worst = max((d for chk in checks for d in chk["max_abs_diff"].values()), default=None)
        parity = f"parity max|diff| {worst:.1e} at {len(checks)} shapes" if worst is not None else "parity not checked"
        lines.append(f"  {name:<15} {c['size_mb']:>9.1f} MB  {parity}")
    return lines


def _engine_lines(folder: Path, m: dict[str, Any]) -> list[str]:
    backend = m.get("backend", "?")
    lines = [f"{folder}: engines ({backend}) for {m.get('family', '?')}"]
    for name, c in m.get("components", {}).items():
        extra = ", ".join(f"{k} {c[k]}" for k in ("precision", "size_mb") if isinstance(c, dict) and k in c)
        lines.append(f"  {name}" + (f": {extra}" if extra else ""))
    return lines
