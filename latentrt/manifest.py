"""Stage manifests (JSON, self-describing, content-hashed) and atomic file writes.

A stage writes its outputs into a hidden staging folder next to the destination and moves each
file into place with ``os.replace`` only when it is complete; the manifest is written last, so a
folder without a manifest (or with a manifest whose hashes do not match) is never taken as done.
Staging folders carry the writer's pid (``.NAME.<pid>.<random>.partial``): the next run removes
those whose process is gone. Versions before the pid was added named them ``.NAME.<random>.partial``;
those are removed when nothing in them changed for `LEGACY_STAGING_AGE_S` (an hour). The rule assumes
no run of an older version writes the same destination at the same time (older versions take no lock):
one that did, and wrote nothing for an hour (a long TensorRT build), would lose its staging folder. Manifests are untrusted input when read: `read_manifest` checks their
JSON types, family, components, IO descriptions and paths (see `latentrt.manifest_checks`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import MissingComponent, OutputConflict, StaleArtifact
from .paths import check_tree

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SCHEMA = 1
ONNX_KIND = "latentrt.onnx"
ENGINE_KIND = "latentrt.engines"


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(folder: str | os.PathLike[str], include: Callable[[Path], bool] | None = None) -> str:
    """Hash of every file's relative path and content under a folder (or of a single file).

    `include`, when given, is called with each file's path relative to `folder` and keeps the file when true.
    """
    root = Path(folder)
    if root.is_file():
        return sha256_file(root)
    h = hashlib.sha256()
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        rel = p.relative_to(root)
        if include is not None and not include(rel):
            continue
        h.update(str(rel).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_modes(path: Path) -> None:
    """Give a file 0644 / a folder tree 0755 (minus umask): mkstemp/mkdtemp create private 0600/0700."""
    mask = _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        p.chmod((0o755 if p.is_dir() else 0o644) & ~mask)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def staging_pattern(name: str) -> re.Pattern[str]:
    """Names of the staging folders of a destination called `name`; group 1 is the writer's pid."""
    return re.compile(rf"^\.{re.escape(name)}\.(\d+)\.[a-z0-9_]{{8}}\.partial$")


LEGACY_STAGING_AGE_S = 3600.0


def legacy_staging_pattern(name: str) -> re.Pattern[str]:
    """Names of the staging folders older versions (no pid) made for a destination called `name`."""
    return re.compile(rf"^\.{re.escape(name)}\.[a-z0-9_]{{8}}\.partial$")


def _newest_mtime(folder: Path) -> float:
    """The latest modification time of `folder` and everything in it (symlinks not followed)."""
    newest = os.lstat(folder).st_mtime
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def _stale_legacy(path: Path, now: float) -> bool:
    """Whether `path`, named like an old-version staging folder, was left by a killed run (untouched an hour).

    A name that also reads as another destination's pid-named staging folder (`.a.b.<pid>.<random>.partial`
    for destination ``a.b``) of a live process is never taken.
    """
    m = re.match(r"^\..+\.(\d+)\.[a-z0-9_]{8}\.partial$", path.name)
    if m and pid_alive(int(m.group(1))):
        return False
    try:
        return now - _newest_mtime(path) > LEGACY_STAGING_AGE_S
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(dest: Path) -> list[Path]:
    """Remove the staging folders of `dest` left by killed runs; returns them.

    A pid-named one is stale when its writer process is gone; an old-version one (no pid) when nothing
    in it changed for `LEGACY_STAGING_AGE_S`.
    """
    pattern, legacy, removed = staging_pattern(dest.name), legacy_staging_pattern(dest.name), []
    now = time.time()
    with contextlib.suppress(FileNotFoundError):
        for p in dest.parent.iterdir():
            if not p.is_dir() or p.is_symlink():
                continue
            m = pattern.match(p.name)
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))) \
                    or not m and legacy.match(p.name) and _stale_legacy(p, now):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    for p in removed:
        log.info("removed %s, left by a killed run", p)
    return removed


@contextlib.contextmanager
def staging_dir(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder beside `dest` (same filesystem) that is removed unless moved away."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".partial", dir=dest.parent))
    tmp.chmod(0o755 & ~_umask())
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(src: Path, dest: Path) -> None:
    """Replace `dest` (file or folder) by `src` with renames only."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(dest):
        old = dest.with_name(f".{dest.name}.old")
        _remove(old)
        os.replace(dest, old)
        os.replace(src, dest)
        _remove(old)
    else:
        os.replace(src, dest)


def _remove(path: Path) -> None:
    """Remove a file, a symlink (never its target) or a folder tree, if present."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def check_writable(folder: str | os.PathLike[str]) -> Path:
    """Create `folder` if needed and check that files can be written into it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe.", delete=True)
        probe.close()
    except OSError as e:
        raise OutputConflict(f"cannot write to {folder}: {e.strerror or e}") from None
    return folder


def read_manifest(folder: str | os.PathLike[str], kind: str | None = None) -> dict[str, Any]:
    """Read a stage manifest and check it (types, family, components, IO, paths inside `folder`, no symlink out)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        what = {ONNX_KIND: "an ONNX export (run `latentrt export`)",
                ENGINE_KIND: "built engines (run `latentrt build`)"}.get(kind or "", "a LatentRT artifact folder")
        raise MissingComponent(f"{folder} has no {MANIFEST}: it is not {what}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StaleArtifact(f"{path} is unreadable ({e}); re-run the stage that wrote it") from None
    if not isinstance(data, dict):
        raise StaleArtifact(f"{path} should hold a JSON object, found {type(data).__name__}; re-run the stage "
                            "that wrote it")
    if kind is not None and data.get("kind") != kind:
        raise StaleArtifact(f"{path} describes {data.get('kind')!r}, expected {kind!r}")
    if data.get("schema") != SCHEMA:
        raise StaleArtifact(f"{path} has schema {data.get('schema')}, this LatentRT reads schema {SCHEMA}; re-run the stage")
    if data.get("kind") in (ONNX_KIND, ENGINE_KIND):
        from .manifest_checks import check_manifest

        check_tree(Path(folder))
        check_manifest(Path(folder), data)
    return data


def verify_files(folder: str | os.PathLike[str], files: dict[str, str]) -> None:
    """Check relative path -> sha256 entries; raise StaleArtifact naming the first mismatch."""
    for rel, digest in files.items():
        p = Path(folder) / rel
        if not p.exists():
            raise MissingComponent(f"{p} is listed in the manifest but missing")
        if sha256_tree(p) != digest:
            raise StaleArtifact(f"{p} changed since its manifest was written (hash mismatch); re-run the stage")


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("latentrt", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu",
                "polygraphy", "onnx-graphsurgeon", "tensorrt", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out
