"""Tiled generation for image-conditioned models (the x4 upscaler): large inputs in overlapping tiles.

The input image is cut into overlapping square tiles of `tile` input pixels (the last tile of a row or
column is moved back to end at the image's edge, so every tile has the same size); each tile runs the
whole pipeline (same request, same seed) and its output (`tile` x f pixels) is blended into the result
with weights that ramp linearly over `overlap` x f output pixels at every edge a tile shares with a
neighbour (1 elsewhere): out = sum_k w_k * image_k / sum_k w_k. The final latents are blended the same
way at latent resolution (the input's). A tile that covers the whole image is exactly the untiled run.

Seams: across a blend, out' = w a' + (1 - w) b' + w' (a - b) with |w'| <= 1 / (overlap x f), so the step
between adjacent output pixels in a blended band is at most the larger step inside the tiles plus
max |a - b| / (overlap x f) (tests/test_upscale_depth.py measures it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from latentrt.errors import InvalidRequest

from .images import float_to_pil, load_image
from .request import PIXEL_MULTIPLE, GenerationRequest, check_request
from .timing import TimingRecord

if TYPE_CHECKING:
    from .pipeline import GenerationResult, Pipeline, ProgressCallback


def tile_starts(side: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one side: every `tile - overlap` pixels, the last one ending at the edge."""
    if side <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, side - tile, stride))
    return [*starts, side - tile]


def ramp(length: int, ramp_px: int, left: bool, right: bool) -> np.ndarray:
    """(length,) weights: a linear ramp (i + 0.5) / ramp_px over the first / last `ramp_px` where a neighbour is."""
    w = np.ones(length, dtype=np.float64)
    if ramp_px > 0:
        up = np.minimum(1.0, (np.arange(length) + 0.5) / ramp_px)
        if left:
            w = np.minimum(w, up)
        if right:
            w = np.minimum(w, up[::-1])
    return w


def tile_weights(box: tuple[int, int, int, int], size: tuple[int, int], overlap: int, scale: int) -> np.ndarray:
    """(tile h * scale, tile w * scale) blend weights of the tile (top, left, h, w) in an image of `size` (h, w)."""
    top, left, h, w = box
    rows = ramp(h * scale, overlap * scale, top > 0, top + h < size[0])
    cols = ramp(w * scale, overlap * scale, left > 0, left + w < size[1])
    return rows[:, None] * cols[None, :]


def tile_boxes(size: tuple[int, int], tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of every tile of an image of `size` (h, w) pixels, row by row."""
    th, tw = min(tile, size[0]), min(tile, size[1])
    return [(top, left, th, tw) for top in tile_starts(size[0], tile, overlap)
            for left in tile_starts(size[1], tile, overlap)]


def tile_settings(pipe: Pipeline, request: GenerationRequest, tile: Any, overlap: Any) -> tuple[Image.Image, int, int]:
    """(the input image, sides a multiple of the tile multiple, tile, overlap), checked before any work."""
    spec = pipe.spec
    if not spec.image_conditioned:
        raise InvalidRequest(f"--tile upscales the input image in tiles; {spec.name} is not conditioned on an image "
                             "(use it with the x4 upscaler)")
    check_request(request)
    if request.image is None:
        raise InvalidRequest("tiled generation needs the image to upscale (--image)")
    if request.width is not None or request.height is not None or request.aspect is not None:
        raise InvalidRequest("tiled generation upscales the image at its own size: drop --width/--height/--aspect")
    multiple = max(1, PIXEL_MULTIPLE // pipe.engines.vae_scale_factor)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < multiple or tile % multiple:
        raise InvalidRequest(f"the tile size must be a whole multiple of {multiple} input pixels (outputs are "
                             f"multiples of {PIXEL_MULTIPLE}), got {tile!r}")
    overlap = tile // 4 if overlap is None else overlap
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise InvalidRequest(f"the tile overlap must be a whole number in [0, {tile}), got {overlap!r}")
    image = load_image(request.image, "image to upscale")
    width, height = image.size
    sides = [max(multiple, round(s / multiple) * multiple) for s in (height, width)]
    if sides != [height, width]:
        image = image.resize((sides[1], sides[0]), resample=Image.Resampling.BICUBIC)
    return image, tile, overlap


def tile_request(request: GenerationRequest, image: Image.Image, box: tuple[int, int, int, int],
                 seed: int) -> GenerationRequest:
    top, left, h, w = box
    return replace(request, image=image.crop((left, top, left + w, top + h)), seed=seed)


def check_tiled(pipe: Pipeline, request: GenerationRequest, tile: Any, overlap: Any = None) -> None:
    """Raise what `generate_tiled` would raise for its settings or its (first) tile, without doing any work."""
    image, tile, overlap = tile_settings(pipe, request, tile, overlap)
    box = tile_boxes((image.size[1], image.size[0]), tile, overlap)[0]
    pipe.check(tile_request(request, image, box, 0 if request.seed is None else int(request.seed)))


def generate_tiled(pipe: Pipeline, request: GenerationRequest, tile: int, overlap: int | None = None,
                   callback: ProgressCallback | None = None) -> GenerationResult:
    """Upscale `request.image` tile by tile (module doc) and blend the tiles; one result of the whole image."""
    import random

    from .pipeline import GenerationResult

    image, tile, overlap = tile_settings(pipe, request, tile, overlap)
    seed = random.SystemRandom().randrange(2**32) if request.seed is None else int(request.seed)
    size = (image.size[1], image.size[0])
    f = pipe.engines.vae_scale_factor
    boxes = tile_boxes(size, tile, overlap)
    for box in boxes[:1]:
        pipe.check(tile_request(request, image, box, seed))
    canvas: np.ndarray | None = None
    latents: torch.Tensor | None = None
    total = np.zeros((size[0] * f, size[1] * f))
    latent_total = torch.zeros(size, dtype=torch.float64)
    timing, notes, first = TimingRecord(), [], None
    for box in boxes:
        result = pipe.generate(tile_request(request, image, box, seed), callback=callback)
        first = first or result
        timing.extend(result.timing)
        notes += [n for n in result.notes if n not in notes]
        top, left, h, w = box
        weight = tile_weights(box, size, overlap, f)
        if result.array is not None:
            if canvas is None:
                canvas = np.zeros((result.array.shape[0], size[0] * f, size[1] * f, 3))
            canvas[:, top * f:(top + h) * f, left * f:(left + w) * f] += weight[None, :, :, None] * result.array
        total[top * f:(top + h) * f, left * f:(left + w) * f] += weight
        small = torch.from_numpy(tile_weights(box, size, overlap, 1))
        if latents is None:
            latents = torch.zeros((*result.latents.shape[:2], *size), dtype=torch.float64)
        latents[..., top:top + h, left:left + w] += small * result.latents.double()
        latent_total[top:top + h, left:left + w] += small
    assert first is not None and latents is not None
    array = None if canvas is None else (canvas / total[None, :, :, None]).astype(np.float32)
    settings = first.settings | {"height": size[0] * f, "width": size[1] * f, "tile": tile, "tile_overlap": overlap,
                                 "tiles": len(boxes)}
    return GenerationResult(float_to_pil(array) if array is not None else [], (latents / latent_total).float(), array,
                            timing, settings, seed, [*notes, f"upscaled in {len(boxes)} tiles of {tile} px "
                                                              f"(overlap {overlap} px)"])
