"""PIL <-> tensor conversions (exactly as diffusers' VaeImageProcessor does them) and PNG saving."""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from latentrt.errors import InvalidRequest, TooLarge
from latentrt.manifest import atomic_write_bytes

ImageInput = Image.Image | str | os.PathLike[str]
MAX_IMAGE_PIXELS = 8192 * 8192  # an init image or mask larger than this is refused before it is decoded
PARTIAL_NAME_EXTRA = len(".") + len(".XXXXXXXX.partial")  # atomic_write_bytes' temporary name around the file name


def load_image(image: ImageInput, what: str = "image", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A PIL image from a PIL image or a path; InvalidRequest when it cannot be read, TooLarge past `max_pixels`."""
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, os.PathLike)):
        raise InvalidRequest(f"the {what} must be a PIL image or a path, got {type(image).__name__}")
    try:
        if Path(image).exists() and not Path(image).is_file():
            raise InvalidRequest(f"the {what} {os.fspath(image)!r} is not a regular file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit applies
            im = Image.open(image)
        with im:
            return decoded(im, what, max_pixels)
    except Image.DecompressionBombError as e:
        raise TooLarge(f"the {what} {os.fspath(image)!r} is too large to decode safely ({e})") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise InvalidRequest(f"cannot read the {what} {os.fspath(image)!r}: {e}") from None


def decoded(im: Image.Image, what: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an opened image after checking its declared size (a few bytes can declare gigapixels)."""
    width, height = im.size
    if width * height > max_pixels:
        raise TooLarge(f"the {what} is too large: {width}x{height} px ({width * height / 1e6:.0f} MP); at most "
                       f"{max_pixels / 1e6:.0f} MP is accepted: resize it first")
    im.load()
    return im.copy()


def _resized(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize with Lanczos like diffusers (a same-size resize is a copy)."""
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def image_to_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """(1, 3, H, W) float32 in [-1, 1]: resize (Lanczos), RGB, /255, 2x-1 (VaeImageProcessor.preprocess)."""
    rgb = _resized(image, height, width).convert("RGB")
    arr = np.asarray(rgb).astype(np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())[None] * 2.0 - 1.0


def mask_to_tensor(mask: Image.Image, height: int, width: int) -> torch.Tensor:
    """(1, 1, H, W) float32 in {0, 1}: resize (Lanczos), grayscale, /255, binarize at 0.5 (1 = repaint)."""
    gray = _resized(mask, height, width).convert("L")
    arr = np.asarray(gray).astype(np.float32) / 255.0
    return torch.from_numpy((arr >= 0.5).astype(np.float32))[None, None]


def tensor_to_float(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) float32 in [0, 1] (diffusers output_type="np")."""
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def float_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) float in [0, 1] -> PIL images, rounding like diffusers' numpy_to_pil."""
    return [Image.fromarray(x) for x in (images * 255).round().astype(np.uint8)]


def png_bytes(image: Image.Image, metadata: Mapping[str, Any] | None = None) -> bytes:
    """PNG file content with each metadata item as a text chunk (non-strings as JSON)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a PNG atomically (never half-written) with metadata text chunks."""
    atomic_write_bytes(path, png_bytes(image, metadata))
    return Path(path)


def check_output_file(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Check before any work that a PNG can be written at `path` (nothing is created); InvalidRequest if not.

    Refused: an empty name, a name other than *.png, a folder or special file (device, FIFO) at the
    path, a name too long for the file system (with the temporary name of the atomic write), and a
    nearest existing parent that is not a folder or cannot be written.
    """
    text = os.fspath(path)
    out = Path(text)
    if not text.strip() or not out.name or text.endswith(os.sep):
        raise InvalidRequest(f"the {what} path {text!r} names no file; give e.g. out.png")
    if out.suffix.lower() != ".png":
        raise InvalidRequest(f"the {what} {text!r} must end in .png (LatentRT writes PNG files)")
    try:
        mode = out.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise InvalidRequest(f"cannot write the {what} {text!r}: {os.strerror(e.errno or 0)}") from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise InvalidRequest(f"the {what} {text!r} is {kind}; name a .png file")
    parent = _existing_parent(out)
    limit = _name_max(parent)
    if len(os.fsencode(out.name)) + PARTIAL_NAME_EXTRA > limit:
        raise InvalidRequest(f"the {what} file name is {len(os.fsencode(out.name))} bytes; this file system allows "
                             f"{limit - PARTIAL_NAME_EXTRA} for an output name: use a shorter one")
    if len(os.fsencode(os.path.abspath(out))) >= _path_max(parent):
        raise InvalidRequest(f"the {what} path is longer than this file system allows: use a shorter one")
    _check_writable_folder(parent, what)
    return out


def _existing_parent(path: Path) -> Path:
    """The nearest ancestor of `path` that exists (the folder the write will start in)."""
    parent = path.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    return parent


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def _path_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_PATH_MAX"))
    except (OSError, ValueError):
        return 4096


def _check_writable_folder(folder: Path, what: str) -> None:
    """InvalidRequest unless a file can be created in `folder` (probed: permission bits do not bind root)."""
    if not folder.is_dir():
        raise InvalidRequest(f"cannot write the {what}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".latentrt-probe.", suffix=".partial", dir=folder)
    except OSError as e:
        reason = {errno.EACCES: "permission denied", errno.EPERM: "not permitted", errno.EROFS: "read-only",
                  errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                  errno.ENOENT: "this file system takes no new files"}.get(
            e.errno or 0, os.strerror(e.errno or 0) if e.errno else str(e))
        raise InvalidRequest(f"cannot write the {what} in {folder}: {reason}; pick another folder") from None
    os.close(fd)
    os.unlink(probe)


def read_png_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The text chunks of a PNG file."""
    with Image.open(path) as im:
        return dict(getattr(im, "text", {}))
