"""Aspect-ratio buckets: (height, width) pixel sizes and how requests snap to them."""

from __future__ import annotations

import math
from collections.abc import Iterable

from .errors import UnsupportedShape

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
