"""The demo model's world: procedural 64x64 scenes with captions, and a detector that checks an image against one.

A scene is one flat-coloured shape (circle, square, triangle) of a palette colour at one of five
positions on a plain background; its caption follows the grammar "a <colour> <shape> <where>"
("a red circle on the left"). Scenes are drawn on the fly from a seed, so the training set needs
no download and is the same on every machine. `detect` reads a scene back from any RGB image
(no learning involved): the object is the pixels far from the background (the border's median
colour), its colour the nearest palette colour, its shape the best-fitting template inside its
bounding box (fill ratios: circle pi/4, square 1, triangle 1/2), its position the nearest anchor
to its centroid. `match` says whether a detection agrees with every attribute of a caption.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # image side in pixels
SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (160, 50, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (20, 20, 20), "grey": (120, 120, 120),
                                                "white": (235, 235, 235)}
POSITIONS: dict[str, tuple[float, float]] = {  # name -> (x, y) anchor of the object's centre, in pixels
    "left": (16.0, 32.0), "right": (48.0, 32.0), "top": (32.0, 16.0), "bottom": (32.0, 48.0), "centre": (32.0, 32.0),
}
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "centre": "in the centre"}
RADIUS = (9.0, 12.0)  # half the object's extent, pixels (uniform)
JITTER = 3.0  # centre offset from its anchor, pixels (uniform in +-JITTER)
OBJECT_DISTANCE = 60.0  # RGB distance from the background above which a pixel belongs to the object
MIN_PIXELS = 24  # fewer object pixels: nothing was drawn


@dataclass(frozen=True)
class Scene:
    """What a caption says (shape, colour, position) plus what it leaves free (background, exact size and place)."""

    shape: str
    colour: str
    position: str
    background: str = "black"
    radius: float = 10.5
    dx: float = 0.0
    dy: float = 0.0

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.position)


def caption(shape: str, colour: str, position: str) -> str:
    """The grammar: 'a <colour> <shape> <position phrase>'."""
    return f"a {colour} {shape} {PHRASES[position]}"


_CAPTION = re.compile(r"^a (\w+) (\w+) (.+)$")


def parse_caption(text: str) -> tuple[str, str, str]:
    """(shape, colour, position) of a grammar caption; ValueError for anything else."""
    m = _CAPTION.match(text.strip().lower())
    where = {phrase: name for name, phrase in PHRASES.items()}
    if not m or m.group(1) not in COLOURS or m.group(2) not in SHAPES or m.group(3) not in where:
        raise ValueError(f"not a demo scene caption: {text!r} (expected e.g. {caption('circle', 'red', 'left')!r})")
    return m.group(2), m.group(1), where[m.group(3)]


def all_captions() -> list[str]:
    """Every caption of the grammar, in a fixed order."""
    return [caption(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]


def sample_scene(rng: np.random.Generator) -> Scene:
    """A uniformly random scene."""
    return Scene(shape=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
                 position=list(POSITIONS)[rng.integers(len(POSITIONS))],
                 background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
                 radius=float(rng.uniform(*RADIUS)), dx=float(rng.uniform(-JITTER, JITTER)),
                 dy=float(rng.uniform(-JITTER, JITTER)))


def scenes(seed: int, count: int) -> list[Scene]:
    """`count` random scenes, the same for the same seed."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(count)]


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The polygon of a square or an upright triangle centred at (cx, cy) with half-extent r."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]


def draw(scene: Scene, size: int = SIZE) -> Image.Image:
    """Render a scene as an RGB image (4x supersampled, so edges are anti-aliased)."""
    k = 4
    image = Image.new("RGB", (size * k, size * k), BACKGROUNDS[scene.background])
    ax, ay = POSITIONS[scene.position]
    s = size / SIZE * k
    cx, cy, r = (ax + scene.dx) * s, (ay + scene.dy) * s, scene.radius * s
    pen = ImageDraw.Draw(image)
    if scene.shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[scene.colour])
    else:
        pen.polygon(_outline(scene.shape, cx, cy, r), fill=COLOURS[scene.colour])
    return image.resize((size, size), Image.Resampling.BOX)


def batch(scene_list: list[Scene]) -> np.ndarray:
    """Scenes as a float32 (N, 3, 64, 64) array in [-1, 1] (the VAE's pixel range)."""
    arr = np.stack([np.asarray(draw(s), dtype=np.float32) for s in scene_list])
    return (arr / 127.5 - 1.0).transpose(0, 3, 1, 2)


@dataclass(frozen=True)
class Detection:
    """What the detector read from an image; None fields: no object found."""

    shape: str | None
    colour: str | None
    position: str | None
    pixels: int  # object pixel count
    fit: float  # the best shape template's IoU with the object mask


def _template(shape: str, h: int, w: int) -> np.ndarray:
    """A boolean h x w mask of the shape filling its bounding box."""
    yy, xx = np.mgrid[0:h, 0:w]
    y, x = (yy + 0.5) / h, (xx + 0.5) / w  # cell centres in [0, 1]
    if shape == "circle":
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    if shape == "square":
        return np.ones((h, w), dtype=bool)
    return np.abs(x - 0.5) <= 0.5 * y  # upright triangle: apex at the top middle, base along the bottom


def background_colour(rgb: np.ndarray) -> np.ndarray:
    """The median colour of the image's outermost 2-pixel frame (objects never reach it)."""
    frame = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[:, :2].reshape(-1, 3),
                            rgb[:, -2:].reshape(-1, 3)])
    return np.median(frame, axis=0)


def detect(image: Image.Image | np.ndarray) -> Detection:
    """Read the scene's object from an RGB image (PIL or HxWx3 uint8), any size (resized to 64x64)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    rgb = np.asarray(image, dtype=np.float32)
    if rgb.shape != (SIZE, SIZE, 3):
        raise ValueError(f"expected a {SIZE}x{SIZE} RGB image, got an array of shape {rgb.shape}")
    mask = np.linalg.norm(rgb - background_colour(rgb), axis=-1) > OBJECT_DISTANCE
    count = int(mask.sum())
    if count < MIN_PIXELS:
        return Detection(None, None, None, count, 0.0)
    ys, xs = np.nonzero(mask)
    colour = rgb[mask].mean(axis=0)
    name = min(COLOURS, key=lambda c: float(np.linalg.norm(colour - np.asarray(COLOURS[c], dtype=np.float32))))
    box = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    ious = {s: _iou(box, _template(s, *box.shape)) for s in SHAPES}
    shape = max(ious, key=lambda s: ious[s])
    cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    if shape == "triangle":  # a triangle's centroid sits a third of the way up from its base, not at the box centre
        cy = (ys.min() + ys.max() + 1) / 2.0
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return Detection(shape, name, position, count, ious[shape])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


def match(text: str, image: Image.Image | np.ndarray) -> bool:
    """Whether the image shows the caption's shape, colour and position (all three)."""
    shape, colour, position = parse_caption(text)
    d = detect(image)
    return (d.shape, d.colour, d.position) == (shape, colour, position)


def score(captions: list[str], images: list[Image.Image] | list[np.ndarray]) -> float:
    """Scene-match score: the fraction of images that match their caption in every attribute."""
    if len(captions) != len(images) or not captions:
        raise ValueError("score needs one image per caption and at least one of each")
    return sum(match(t, im) for t, im in zip(captions, images)) / len(captions)


def attribute_scores(captions: list[str], images: list[Image.Image] | list[np.ndarray]) -> dict[str, float]:
    """Per-attribute agreement (shape, colour, position) and the all-three score."""
    hits = {"shape": 0, "colour": 0, "position": 0, "all": 0}
    for text, im in zip(captions, images):
        want, d = parse_caption(text), detect(im)
        got = (d.shape, d.colour, d.position)
        for key, a, b in zip(("shape", "colour", "position"), want, got):
            hits[key] += a == b
        hits["all"] += want == got
    return {k: v / max(len(captions), 1) for k, v in hits.items()}


def evaluation_prompts(count: int = 200, seed: int = 2026) -> list[str]:
    """The fixed prompt list the quality check scores over (a seeded draw from the grammar)."""
    return [s.caption for s in scenes(seed, count)]
