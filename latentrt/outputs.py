"""Output folders: one writer at a time, leftovers of killed runs cleaned, nothing foreign ever replaced.

The rules every verb that writes an artifact folder follows (`export`, `build`, and `demo` / `bench`
through them):

* Lock. A writer holds an exclusive `flock` on ``.NAME.lock`` beside the folder for the whole run. A
  second run writing the same folder is refused at once with `OutputConflict` naming the holder's
  pid (it does not wait: a build can take an hour, and a clear refusal beats a silent queue). The
  lock dies with its process, so a killed run never blocks the next one.
* Leftovers. Staging folders are named ``.NAME.<pid>.<random>.partial``; the next run removes those
  whose process is gone, and old-version ones without a pid (``.NAME.<random>.partial``) untouched for
  an hour (`latentrt.manifest.remove_stale_staging`), and a previous version left as
  ``.NAME.old`` by a run killed mid-swap is put back (or dropped when the swap had finished).
* Ownership. A manifest records every file LatentRT wrote in its folder (``written``). A folder may
  be replaced only when each of its entries is one LatentRT wrote; a folder holding anything else
  (a foreign file, a symlink, a folder without a manifest) is refused with or without
  ``--overwrite``, naming the foreign entry. ``--overwrite`` only lifts the "another model" check.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import OutputConflict
from .manifest import ENGINE_KIND, MANIFEST, ONNX_KIND, sha256_tree

log = logging.getLogger(__name__)

LATENTRT_KINDS = (ONNX_KIND, ENGINE_KIND)
# temporary files a killed LatentRT run may leave inside a folder it wrote (atomic writes, write probes)
TEMP_FILE = re.compile(r"^\.(?:manifest\.json\.[a-z0-9_]+\.partial|write-probe\..+)$")
OVERWRITE_RULE = "--overwrite only replaces folders whose every file LatentRT wrote"


# ---------------------------------------------------------------------------- the lock


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive write lock of `out` (refused at once when another run holds it); cleans leftovers."""
    out = Path(os.path.abspath(out))  # "." has a name only once made absolute
    path = lock_path(out)
    fd = _acquire(path, out)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        clean_leftovers(out)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still locked: a waiter that opened it re-checks the inode and retries
        os.close(fd)


def _acquire(path: Path, out: Path) -> int:
    """An fd holding the flock of `path`, which is still the file at `path` (not one a releaser unlinked)."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # never truncate a symlink's target
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OutputConflict(f"{path} is a symlink LatentRT did not write; remove it") from None
            if e.errno == errno.EISDIR:
                raise OutputConflict(f"{path} is a folder, not a lock file LatentRT wrote; remove it") from None
            raise OutputConflict(f"cannot write to {path.parent}: {e.strerror or e}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputConflict(f"{path} is not a lock file LatentRT wrote; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputConflict(f"cannot lock {path}: {e.strerror or e}") from None
            raise OutputConflict(f"another LatentRT run{holder} is writing {out}; wait for it to finish or choose "
                                 "another folder") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file between our open and lock: lock the new one


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid = int(os.read(fd, 32).decode().strip())
    except (OSError, ValueError):
        return ""
    return f" (pid {pid})"


# ---------------------------------------------------------------------------- leftovers of killed runs


def clean_leftovers(out: Path) -> None:
    """Put back a previous version a killed swap left as `.NAME.old`, or drop it; drop temp files inside `out`."""
    old = out.with_name(f".{out.name}.old")
    if old.is_dir() and not old.is_symlink():
        if not os.path.lexists(out):
            os.replace(old, out)
            log.warning("restored %s: an earlier run was killed while replacing it", out)
        else:
            shutil.rmtree(old)
            log.info("removed %s, left by a killed run", old)
    if out.is_dir() and not out.is_symlink():
        for p in out.iterdir():
            if TEMP_FILE.match(p.name) and p.is_file() and not p.is_symlink():
                p.unlink()


def _missing_chain(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, deepest first."""
    chain: list[Path] = []
    for p in (folder, *folder.parents):
        if os.path.lexists(p):
            break
        chain.append(p)
    return chain


@contextlib.contextmanager
def removed_if_failed(*folders: str | os.PathLike[str] | None) -> Iterator[None]:
    """On an exception, remove those of `folders` (and their parents) this run created that are still empty.

    Only folders missing on entry are candidates and only `rmdir` is used, so nothing the user had,
    and nothing written meanwhile, is ever removed.
    """
    chains = [_missing_chain(Path(os.path.abspath(f))) for f in folders if f is not None]
    try:
        yield
    except BaseException:
        for chain in chains:
            for p in chain:
                try:
                    os.rmdir(p)
                except OSError:
                    break  # not empty (or gone): its parents are not empty either
        raise


# ---------------------------------------------------------------------------- ownership


def written_files(folder: Path) -> list[str]:
    """Every file under `folder` but the manifest, as sorted relative POSIX paths: the manifest's `written`."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not p.is_symlink() and p.relative_to(folder).as_posix() != MANIFEST)


def check_replaceable(out: Path, what: str) -> dict[str, Any] | None:
    """OutputConflict unless `out` is absent, empty, or holds only what LatentRT wrote; returns its manifest JSON.

    `what` names the artifact the caller writes ("export", "engines") for the messages.
    """
    if out.is_symlink():
        raise OutputConflict(f"output {out} is a symbolic link; name the real folder")
    if not out.exists():
        return None
    if not out.is_dir():
        raise OutputConflict(f"output {out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir() if not TEMP_FILE.match(p.name))
    if not entries:
        return None
    if MANIFEST not in entries:
        raise OutputConflict(f"{out} is not empty and holds no LatentRT {what} ({entries[0]} was not written by "
                             f"LatentRT); choose an empty folder or move it away ({OVERWRITE_RULE})")
    manifest = _manifest_json(out)
    foreign = _foreign_entry(out, manifest)
    if foreign is not None:
        raise OutputConflict(f"{out} holds {foreign}; {OVERWRITE_RULE}: move it away or choose another folder")
    return manifest


def _manifest_json(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    try:
        data = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        data, why = None, f"{type(e).__name__}: {e}"
    else:
        why = "not a LatentRT manifest"
    if not isinstance(data, dict) or data.get("kind") not in LATENTRT_KINDS:
        raise OutputConflict(f"{out} holds a {MANIFEST} LatentRT cannot read ({why}), so it cannot tell which files "
                             f"it wrote there; move the folder away or choose another ({OVERWRITE_RULE})")
    return data


def _foreign_entry(out: Path, manifest: Mapping[str, Any]) -> str | None:
    """A description of the first entry of `out` LatentRT did not write, or None."""
    written = manifest.get("written")
    if isinstance(written, list) and all(isinstance(w, str) for w in written):
        files = set(written)
    else:
        return _legacy_foreign_entry(out, manifest)
    folders = {parent.as_posix() for w in files for parent in Path(w).parents if parent != Path(".")}
    for dirpath, dirnames, filenames in os.walk(out):
        base = Path(dirpath)
        for name in sorted((*dirnames, *filenames)):
            rel = (base / name).relative_to(out).as_posix()
            mode = os.lstat(base / name).st_mode
            top_temp = base == out and TEMP_FILE.match(name)
            if stat.S_ISLNK(mode):
                return f"{rel}, a symlink LatentRT did not write"
            if stat.S_ISDIR(mode) and rel not in folders:
                return f"{rel}/, a folder LatentRT did not write"
            if stat.S_ISREG(mode) and rel not in files and rel != MANIFEST and not top_temp:
                return f"{rel}, which LatentRT did not write"
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                return f"{rel}, a special file LatentRT did not write"
    return None


def _legacy_foreign_entry(out: Path, manifest: Mapping[str, Any]) -> str | None:
    """For manifests written before `written` existed: top-level names it records, each matching its hash."""
    recorded: dict[str, Any] = {}
    for entry in (manifest.get("components") or {}).values():
        path = entry.get("path") if isinstance(entry, Mapping) else None
        if isinstance(path, str) and "/" in path:
            recorded[path.split("/")[0]] = entry.get("sha256")
    recorded.update({str(k): v for k, v in (manifest.get("files") or {}).items()})
    for p in sorted(out.iterdir()):
        if p.name == MANIFEST or TEMP_FILE.match(p.name):
            continue
        if p.name not in recorded or p.is_symlink():
            return f"{p.name}, which LatentRT did not write"
        if p.is_dir() and any(q.is_symlink() for q in p.rglob("*")):
            return f"{p.name}/, which holds a symlink LatentRT did not write"
        if sha256_tree(p) != recorded[p.name]:
            return f"{p.name}, which changed since LatentRT wrote it (it may hold files LatentRT did not write)"
    return None


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link (or copy, across filesystems) a folder's regular files into `dst`; symlinks are never followed."""
    for p in sorted(src.rglob("*")):
        target = dst / p.relative_to(src)
        if p.is_symlink():
            raise OutputConflict(f"{p} is a symlink LatentRT did not write; move it away")
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, target, follow_symlinks=False)
        except OSError:
            shutil.copy2(p, target, follow_symlinks=False)
