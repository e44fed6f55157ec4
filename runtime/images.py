"""PIL <-> tensor conversions (exactly as diffusers' VaeImageProcessor does them) and PNG saving."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from latentrt.errors import InvalidRequest
from latentrt.manifest import atomic_write_bytes

ImageInput = Image.Image | str | os.PathLike[str]


def load_image(image: ImageInput, what: str = "image") -> Image.Image:
    """A PIL image from a PIL image or a path; InvalidRequest when it cannot be read."""
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as im:
            im.load()
            return im.copy()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise InvalidRequest(f"cannot read the {what} {os.fspath(image)!r}: {e}") from None


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


def read_png_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The text chunks of a PNG file."""
    with Image.open(path) as im:
        return dict(getattr(im, "text", {}))
