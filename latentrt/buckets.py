"""Aspect-ratio buckets: (height, width) pixel sizes and how requests snap to them."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .errors import UnsupportedShape

if TYPE_CHECKING:
    from .families import FamilySpec
    from .tensors import ModelDims

log = logging.getLogger(__name__)

Size = tuple[int, int]  # (height, width) in pixels
SideRanges = tuple[tuple[int, int], tuple[int, int]]  # ((min_h, max_h), (min_w, max_w)) in pixels

# SDXL multi-aspect buckets as commonly reproduced from the SDXL paper, appendix I (H x W, ~1024^2 px,
# multiples of 64). Not symmetric: 704x1344 is in it, 1344x704 is not.
_SDXL_TEXT = """
512x2048 512x1984 512x1920 512x1856 576x1792 576x1728 576x1664 640x1600 640x1536 704x1472 704x1408 704x1344
768x1344 768x1280 832x1216 832x1152 896x1152 896x1088 960x1088 960x1024 1024x1024 1024x960 1088x960 1088x896
1152x896 1152x832 1216x832 1280x768 1344x768 1408x704 1472x704 1536x640 1600x640 1664x576 1728x576 1792x576
1856x512 1920x512 1984x512 2048x512
"""


def parse_sizes(text: str) -> tuple[Size, ...]:
    """Parse 'HxW HxW,...' into (height, width) tuples."""
    sizes = []
    for token in text.replace(",", " ").split():
        h, _, w = token.lower().partition("x")
        if not h.isdigit() or not w.isdigit():
            raise UnsupportedShape(f"cannot read size {token!r}: expected HEIGHTxWIDTH, e.g. 768x1344")
        sizes.append((int(h), int(w)))
    return tuple(sizes)


SDXL_BUCKETS: tuple[Size, ...] = parse_sizes(_SDXL_TEXT)


def scaled_buckets(native: int, step: int = 64, max_ratio: float = 2.0) -> tuple[Size, ...]:
    """Buckets of about native^2 pixels, sides multiples of `step`, aspect within [1/max_ratio, max_ratio]."""
    area = native * native
    out: set[Size] = set()
    h = step * max(1, round(native / math.sqrt(max_ratio) / step))
    while h <= native * math.sqrt(max_ratio) + 1e-9:
        w = step * max(1, round(area / h / step))
        if 1 / max_ratio <= h / w <= max_ratio:
            out.update({(h, w), (w, h)})
        h += step
    return tuple(sorted(out))


MAX_NATIVE_SIDE = 2048  # pixels: the largest side an export covers (tensors.LATENT_H/W max x the VAE factor)


def native_size(spec: FamilySpec, dims: ModelDims | None, multiple: int = 64) -> Size:
    """The checkpoint's native (height, width) from its recorded widths (`ModelDims.extra['unet_sample_size']`),
    else the family's: see `checkpoint_native_size`."""
    if dims is None or not isinstance(dims.extra, dict):
        return spec.native_size
    return checkpoint_native_size(spec, dims.extra.get("unet_sample_size"), dims.vae_scale_factor, multiple)


def checkpoint_native_size(spec: FamilySpec, sample_size: Any, vae_scale_factor: Any, multiple: int = 64) -> Size:
    """UNet `sample_size` x the VAE factor, the size diffusers' pipelines default to
    (`unet.config.sample_size * vae_scale_factor`); the family's native size when it is missing or not a size.

    `sample_size` is an int or an [h, w] pair in diffusers configs (read from untrusted files: checked here);
    sides are rounded to multiples of `multiple` (the runtime's pixel step), at most MAX_NATIVE_SIDE."""
    sides = _sample_sides(sample_size)
    factor = vae_scale_factor
    if sides is None or not (isinstance(factor, int) and not isinstance(factor, bool) and factor > 0):
        if sample_size is not None:
            log.warning("unet sample_size %r (VAE factor %r) is not a size: using the %s native size %s", sample_size,
                        factor, spec.name, format_size(spec.native_size))
        return spec.native_size
    pixels = (sides[0] * factor, sides[1] * factor)
    if max(pixels) > MAX_NATIVE_SIDE:
        log.warning("unet sample_size %r x %d is larger than the %d px an export covers: using the %s native size "
                    "%s", sample_size, factor, MAX_NATIVE_SIDE, spec.name, format_size(spec.native_size))
        return spec.native_size
    h, w = (max(multiple, round(p / multiple) * multiple) for p in pixels)
    if (h, w) != pixels:
        log.info("native size %s rounded to %s (sides are multiples of %d)", format_size(pixels),
                 format_size((h, w)), multiple)
    return h, w


def _sample_sides(raw: Any) -> tuple[int, int] | None:
    """(h, w) latents of a diffusers `sample_size` (an int or an [h, w] pair); None when it is neither."""
    def ok(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if ok(raw):
        return raw, raw
    if isinstance(raw, (list, tuple)) and len(raw) == 2 and all(ok(v) for v in raw):
        return raw[0], raw[1]
    return None


def buckets_for(spec: FamilySpec, native: Size, step: int = 64) -> tuple[Size, ...]:
    """The family's buckets, or, for a checkpoint of another native size, buckets of about its pixel count
    (`scaled_buckets`, always including the native size itself)."""
    if native == spec.native_size:
        return spec.buckets
    side = max(step, round(math.sqrt(native[0] * native[1]) / step) * step)
    return tuple(sorted({*scaled_buckets(side, step), native}))


def is_valid_size(size: Size, multiple: int = 64) -> bool:
    return size[0] > 0 and size[1] > 0 and size[0] % multiple == 0 and size[1] % multiple == 0


def nearest_valid(size: Size, multiple: int = 64, ranges: SideRanges | None = None) -> list[Size]:
    """The valid sizes around an invalid one (rounded down and up per side), each a positive multiple of
    `multiple` and, given `ranges` ((min_h, max_h), (min_w, max_w) pixels), inside them."""
    def options(v: int, lo: int, hi: int) -> list[int]:
        down = (v // multiple) * multiple
        near = {v} if v % multiple == 0 else {down, down + multiple}
        return sorted({min(max(o, lo), hi) for o in near})

    (h_lo, h_hi), (w_lo, w_hi) = _grid(ranges or ((multiple, 1 << 30), (multiple, 1 << 30)), multiple)
    return [(h, w) for h in options(size[0], h_lo, h_hi) for w in options(size[1], w_lo, w_hi)]


def _grid(ranges: SideRanges, multiple: int) -> SideRanges:
    """Side ranges shrunk to multiples of `multiple` (at least one multiple each)."""
    def side(lo: int, hi: int) -> tuple[int, int]:
        lo = max(multiple, -(-lo // multiple) * multiple)
        return lo, max(lo, (hi // multiple) * multiple)

    return side(*ranges[0]), side(*ranges[1])


def check_multiple(size: Size, multiple: int = 64, ranges: SideRanges | None = None) -> None:
    """Raise UnsupportedShape naming the nearest valid sizes when a side is not a positive multiple."""
    if not is_valid_size(size, multiple):
        near = ", ".join(f"{h}x{w}" for h, w in nearest_valid(size, multiple, ranges))
        raise UnsupportedShape(
            f"size {size[0]}x{size[1]} (HxW) is not a positive multiple of {multiple} on each side; nearest valid: "
            f"{near}"
        )


def nearest_bucket(size: Size, buckets: Iterable[Size]) -> Size:
    """The bucket closest in aspect ratio (log scale), then in pixel count."""
    h, w = size
    target = math.log(h / w)

    def distance(b: Size) -> tuple[float, float]:
        return (round(abs(math.log(b[0] / b[1]) - target), 9), abs(math.log(b[0] * b[1] / (h * w))))

    return min(buckets, key=distance)


def format_size(size: Size) -> str:
    return f"{size[0]}x{size[1]}"
