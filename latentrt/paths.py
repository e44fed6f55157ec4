"""Paths read from untrusted files (manifests, checkpoint folders), resolved only inside their folder.

A manifest names its files relative to its own folder; a crafted one must never make LatentRT read
or write anywhere else. A path is refused (`UnsafePath`) when it is not a plain relative path
(absolute, empty, `~`, `..`, backslashes, NUL) or when it resolves, symlinks followed, outside the
folder. A folder LatentRT reads is refused when it holds a symlink that resolves outside it, or a
special file (FIFO, socket, device) whose read would hang or come from a device.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import UnsafePath

TINY_PREFIX = "tiny:"


def relative_path(text: Any, what: str) -> PurePosixPath:
    """`text` as a relative path that stays inside its folder; UnsafePath otherwise."""
    if not isinstance(text, str) or not text.strip() or "\x00" in text or "\\" in text:
        raise UnsafePath(f"{what}: {text!r} is not a relative path inside the folder")
    path = PurePosixPath(text)
    if path.is_absolute() or text.startswith("~") or not path.parts or ".." in path.parts:
        raise UnsafePath(f"{what}: {text!r} is absolute or leaves its folder ('..'); only paths inside the folder "
                         "are accepted")
    return path


def within(path: Path, root: Path) -> bool:
    """Whether resolved `path` is `root` or below it (both already resolved)."""
    return path == root or path.is_relative_to(root)


def inside(root: Path, text: Any, what: str) -> Path:
    """`root / text`, refused when `text` is not relative or resolves (through symlinks) outside `root`."""
    path = root / relative_path(text, what)
    real, base = path.resolve(), root.resolve()
    if not within(real, base):
        raise UnsafePath(f"{what}: {text!r} resolves to {real}, outside {root}; symlinks out of the folder are "
                         "refused")
    return path


def check_tree(root: Path, what: str = "", allowed: Path | None = None) -> None:
    """UnsafePath when `root` holds a symlink resolving outside `allowed` (default `root`) or a special file.

    `what`, when given, starts the message ("checkpoint: ...").
    """
    what = f"{what}: " if what else ""
    base = (allowed or root).resolve()
    for dirpath, dirnames, filenames in os.walk(root):  # symlinked folders are listed, not entered
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                continue  # removed while walking
            if stat.S_ISLNK(mode):
                target = path.resolve()
                if not within(target, base):
                    raise UnsafePath(f"{what}{path} is a symlink to {target}, outside {base}; LatentRT reads only "
                                     "files inside the folders it is given (copy the file in instead)")
            elif not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise UnsafePath(f"{what}{path} is not a regular file or folder (a FIFO, socket or device); "
                                 "remove it")


def checkpoint_root(folder: Path) -> Path:
    """The folder a checkpoint's symlinks may point into: a Hugging Face cache snapshot links into its repo's blobs."""
    snapshots = folder.resolve().parent
    if snapshots.name == "snapshots" and (snapshots.parent / "blobs").is_dir():
        return snapshots.parent
    return folder


def check_checkpoint(model: str | os.PathLike[str]) -> None:
    """Refuse a local checkpoint folder holding symlinks out of it or special files (other sources pass)."""
    text = os.fspath(model)
    path = Path(text).expanduser()
    if not text.startswith(TINY_PREFIX) and path.is_dir():
        check_tree(path, "checkpoint", allowed=checkpoint_root(path))
