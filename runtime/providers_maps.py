"""Issue 12 (H3) providers: maps and images concatenated to the latents, and the x4 upscaler's noise level.

- `depth_map` (SD 2 depth-to-image, diffusers `StableDiffusionDepth2ImgPipeline.prepare_depth_map`): the
  request's depth map, resized bicubically (align_corners=False) to latent resolution, then normalized to
  [-1, 1] per image: 2 (d - min) / (max - min) - 1. The same map for every image; both CFG halves.
- `concat_map` (the LDM paper's semantic maps, generic): the request's (C, h, w) map resized to latent
  resolution by nearest neighbour (`torch.nn.functional.interpolate`, mode "nearest", as diffusers resizes
  inpainting masks), its values used as given.
- `noise_level` and `noised_low_res_image` (diffusers `StableDiffusionUpscalePipeline`): the low-res image
  (bicubic-resized to latent resolution, RGB, [-1, 1]) noised by the pipeline's `low_res_scheduler` (DDPM
  q(x_t | x_0) at t = noise_level) with noise drawn before the initial latents, as diffusers draws it; the
  noise level is the UNet's class label on every row.

Map values (conditioning[name]) are untrusted: a path to a .png or .npy file, a numpy array, a torch tensor
or a PIL image. NPY headers are checked (shape, dtype) before the data is read (no pickles); sizes are
bounded; non-finite values, wrong channel counts and constant depth maps are refused with InvalidRequest.
PNG maps are read as their pixel values scaled to [0, 1] (8-bit / 255, 16-bit / 65535; 32-bit integer
and float modes as stored).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from latentrt.errors import InvalidRequest, TooLarge
from latentrt.families import ConcatInput, ConditioningInput, NoiseSchedule

from .images import MAX_IMAGE_PIXELS, load_image
from .providers import FeedContext, register_provider
from .samplers import SeededNoise
from .schedules import alphas_cumprod

MAP_SUFFIXES = (".png", ".npy")
NUMERIC_KINDS = "biuf"  # numpy dtype kinds a map may hold: bool, signed / unsigned integers, floats
PNG_SCALE = {"1": 1.0, "L": 255.0, "P": None, "RGB": 255.0, "RGBA": 255.0, "LA": 255.0, "I;16": 65535.0,
             "I": 1.0, "F": 1.0}  # None: a palette image has no values, refused
DEFAULT_NOISE_LEVEL = 20  # diffusers StableDiffusionUpscalePipeline's default
DEFAULT_MAX_NOISE_LEVEL = 350  # its model_index.json `max_noise_level`
NOISE_LEVEL_KEY = "noise_level"


# ---------------------------------------------------------------------------- reading maps


def _npy(path: Path, what: str, max_values: int) -> np.ndarray:
    """An .npy array after its header is checked: numeric dtype, at most `max_values` values, no pickles."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
            if dtype.kind not in NUMERIC_KINDS or dtype.hasobject:
                raise InvalidRequest(f"the {what} {os.fspath(path)!r} holds {dtype} values; give numbers")
            if int(np.prod(shape, dtype=np.int64)) > max_values:
                raise TooLarge(f"the {what} {os.fspath(path)!r} has shape {shape}: more than {max_values} values")
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InvalidRequest(f"cannot read the {what} {os.fspath(path)!r} as an NPY array: {e}") from None


def _png(image: Image.Image, what: str) -> np.ndarray:
    """(C, H, W) float32 pixel values scaled to [0, 1] by the image mode's range (`PNG_SCALE`)."""
    scale = PNG_SCALE.get(image.mode)
    if scale is None:
        raise InvalidRequest(f"the {what} is a {image.mode!r} image; give a grayscale, RGB or 16-bit PNG")
    arr = np.asarray(image).astype(np.float32) / np.float32(scale)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_map(value: Any, what: str, channels: int, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """A (channels, H, W) float32 map from a .png/.npy path, an array, a tensor or a PIL image; checked."""
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        suffix = path.suffix.lower()
        if suffix not in MAP_SUFFIXES:
            raise InvalidRequest(f"the {what} {os.fspath(value)!r} must be a .png or .npy file")
        if not path.is_file():
            raise InvalidRequest(f"the {what} {os.fspath(value)!r} is not a file")
        arr = _npy(path, what, channels * max_pixels) if suffix == ".npy" else \
            _png(load_image(path, what, max_pixels), what)
    elif isinstance(value, Image.Image):
        arr = _png(value, what)
    elif isinstance(value, (np.ndarray, torch.Tensor)):
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        if arr.dtype.kind not in NUMERIC_KINDS:
            raise InvalidRequest(f"the {what} holds {arr.dtype} values; give numbers")
    else:
        raise InvalidRequest(f"the {what} must be a .png/.npy path, an array or an image, got {type(value).__name__}")
    return _checked(np.asarray(arr), what, channels, max_pixels)


def _checked(arr: np.ndarray, what: str, channels: int, max_pixels: int) -> torch.Tensor:
    """(channels, H, W) float32 from a (H, W) or (C, H, W) array: channel count, size and finiteness checked."""
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] != channels:
        want = "(H, W) or (1, H, W)" if channels == 1 else f"({channels}, H, W)"
        raise InvalidRequest(f"the {what} has shape {tuple(arr.shape)}; give {want}")
    height, width = int(arr.shape[1]), int(arr.shape[2])
    if height < 1 or width < 1:
        raise InvalidRequest(f"the {what} is empty ({height}x{width})")
    if height * width > max_pixels:
        raise TooLarge(f"the {what} is {width}x{height}: more than {max_pixels / 1e6:.0f} MP")
    out = torch.from_numpy(arr.astype(np.float32, copy=True))
    if not bool(torch.isfinite(out).all()):
        raise InvalidRequest(f"the {what} holds NaN or infinite values")
    return out


def _value(inp: ConcatInput, ctx: FeedContext) -> Any:
    if inp.name not in ctx.request.conditioning:
        raise InvalidRequest(f"this model concatenates a {inp.name} to its latents: give conditioning"
                             f"['{inp.name}'] (CLI: --condition {inp.name}=FILE.png|.npy)")
    return ctx.request.conditioning[inp.name]


def _channels(inp: ConcatInput) -> int:
    if not isinstance(inp.channels, int):
        raise InvalidRequest(f"the map input {inp.name} needs a fixed channel count, not {inp.channels!r}")
    return inp.channels


def _latent_size(ctx: FeedContext) -> tuple[int, int]:
    """(h, w) of the latents being sampled (the pipeline gives the shape; request checks never resize)."""
    if len(ctx.latent_shape) != 4:
        raise ValueError("a map is resized to the latents' size: the feed context needs latent_shape (B, C, h, w)")
    return int(ctx.latent_shape[2]), int(ctx.latent_shape[3])


def _rows(piece: torch.Tensor, ctx: FeedContext) -> torch.Tensor:
    """(1, C, h, w) -> UNet-batch rows: the same piece for every image, both CFG halves."""
    return ctx.rows(piece.expand(ctx.batch, -1, -1, -1).to(ctx.device))


# ---------------------------------------------------------------------------- depth (SD 2 depth-to-image)


def depth_latent(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, 1, h, w) depth at latent size: bicubic resize, then 2 (d - min) / (max - min) - 1 (prepare_depth_map)."""
    small = torch.nn.functional.interpolate(depth[None], size=size, mode="bicubic", align_corners=False)
    low, high = small.amin(dim=(1, 2, 3), keepdim=True), small.amax(dim=(1, 2, 3), keepdim=True)
    return 2.0 * (small - low) / (high - low) - 1.0


def check_depth(inp: ConcatInput, ctx: FeedContext) -> None:
    """The request gives a readable, finite, non-constant one-channel depth map."""
    depth = read_map(_value(inp, ctx), f"depth map ({inp.name})", _channels(inp))
    if float(depth.max() - depth.min()) <= 0.0:
        raise InvalidRequest(f"the depth map ({inp.name}) is constant: it holds no depth to condition on "
                             "(normalizing it to [-1, 1] would divide by zero)")
    if ctx.request.image is None:
        raise InvalidRequest("depth-to-image starts from an image: give the init image (--image) with the depth map")


def depth_rows(inp: ConcatInput, ctx: FeedContext) -> torch.Tensor:
    """depth_map (rows, 1, h, w) in [-1, 1]. A depth estimator (DPT) is not run: the request gives the map."""
    check_depth(inp, ctx)
    depth = read_map(_value(inp, ctx), f"depth map ({inp.name})", _channels(inp))
    return _rows(depth_latent(depth, _latent_size(ctx)), ctx)


# ---------------------------------------------------------------------------- generic maps (semantic maps)


def map_latent(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, C, h, w): a (C, H, W) map resized to latent size by nearest neighbour, values unchanged."""
    return torch.nn.functional.interpolate(values[None], size=size, mode="nearest")


def check_map(inp: ConcatInput, ctx: FeedContext) -> None:
    read_map(_value(inp, ctx), f"map ({inp.name})", _channels(inp))


def map_rows(inp: ConcatInput, ctx: FeedContext) -> torch.Tensor:
    """<name> (rows, C, h, w): the request's map at latent resolution (nearest), the same for every row."""
    values = read_map(_value(inp, ctx), f"map ({inp.name})", _channels(inp))
    return _rows(map_latent(values, _latent_size(ctx)), ctx)


# ---------------------------------------------------------------------------- the x4 upscaler


def noise_level(ctx: FeedContext) -> int:
    """conditioning['noise_level'] (default 20), a whole number in [0, max_noise_level]; InvalidRequest otherwise."""
    value = ctx.request.conditioning.get(NOISE_LEVEL_KEY, DEFAULT_NOISE_LEVEL)
    limit = ctx.info.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= limit:
        raise InvalidRequest(f"conditioning['{NOISE_LEVEL_KEY}'] must be a whole number in [0, {limit}] "
                             f"(the pipeline's max_noise_level), got {value!r}")
    classes = ctx.tensor.high if ctx.tensor is not None and ctx.tensor.high else None
    if classes is not None and value >= classes:
        raise InvalidRequest(f"conditioning['{NOISE_LEVEL_KEY}'] = {value} is beyond the UNet's {classes} noise "
                             "level embeddings")
    return int(value)


def check_noise_level(inp: ConditioningInput, ctx: FeedContext) -> None:
    noise_level(ctx)


def noise_level_rows(inp: ConditioningInput, ctx: FeedContext) -> torch.Tensor:
    """class_labels (rows,): the noise level the low-res image was noised to, on every row (both CFG halves)."""
    rows = ctx.batch * (2 if ctx.cfg else 1)
    return torch.full((rows,), noise_level(ctx), dtype=torch.int64, device=ctx.device)


def low_res_schedule(info: Any) -> NoiseSchedule:
    """The low_res_scheduler's training schedule recorded with the model (model_dims extra), else its default."""
    s = info.get("low_res_schedule") or {}
    return NoiseSchedule(beta_start=float(s.get("beta_start", 0.0001)), beta_end=float(s.get("beta_end", 0.02)),
                         beta_schedule=str(s.get("beta_schedule", "scaled_linear")),
                         num_train_timesteps=int(s.get("num_train_timesteps", 1000)))


def low_res_pixels(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """(1, 3, h, w) in [-1, 1]: RGB, bicubic-resized to `size` (h, w) (VaeImageProcessor(resample="bicubic"))."""
    rgb = image.convert("RGB")
    if rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(rgb).astype(np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())[None] * 2.0 - 1.0


def q_sample(x0: torch.Tensor, noise: torch.Tensor, t: int, schedule: NoiseSchedule) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (Ho et al. 2020, eq. 4; DDPMScheduler.add_noise)."""
    abar = alphas_cumprod(schedule)[t]
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def check_low_res(inp: ConcatInput, ctx: FeedContext) -> None:
    if ctx.request.image is None:
        raise InvalidRequest("this model upscales an image: give the low-res image (--image)")


def prepare_low_res(inp: ConcatInput, ctx: FeedContext, noise: SeededNoise) -> torch.Tensor:
    """The low-res image at latent size noised to the request's level; its noise drawn before the initial latents."""
    check_low_res(inp, ctx)
    assert ctx.request.image is not None
    pixels = low_res_pixels(ctx.request.image, _latent_size(ctx)).to(ctx.device)
    eps = noise(tuple(pixels.shape)).to(pixels)
    return q_sample(pixels, eps, noise_level(ctx), low_res_schedule(ctx.info))


def low_res_rows(inp: ConcatInput, ctx: FeedContext) -> torch.Tensor:
    """low_res_image (rows, 3, h, w): the noised low-res image (prepared before sampling) for every row."""
    if inp.name not in ctx.images:
        raise InvalidRequest(f"the UNet input '{inp.name}' needs the low-res image (--image)")
    return _rows(ctx.images[inp.name], ctx)


register_provider("depth_map", depth_rows, check=check_depth, request_keys=("{name}",))
register_provider("concat_map", map_rows, check=check_map, request_keys=("{name}",))
register_provider("noise_level", noise_level_rows, check=check_noise_level, request_keys=(NOISE_LEVEL_KEY,))
register_provider("noised_low_res_image", low_res_rows, check=check_low_res, prepare=prepare_low_res)
