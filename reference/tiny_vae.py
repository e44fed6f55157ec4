"""The tiny VAE (TAESD, Bohan 2023; diffusers `AutoencoderTiny`): locate, check, load and wrap its decoder.

A tiny VAE is a diffusers model folder (config.json naming `AutoencoderTiny` + weights), local or on the
hub (madebyollin/taesd for SD 1.x / 2.x, madebyollin/taesdxl for SDXL). Every config key is either
honoured or refused by name (`check_config`): architecture keys build the graph diffusers builds,
`scaling_factor` divides the latents before decoding (as diffusers' pipelines do), `latent_magnitude` /
`latent_shift` only pack encoder latents into bytes (`AutoencoderTiny.forward`, never `decode`), and
keys a Stable Diffusion pipeline would not apply to a tiny VAE (a non-zero `shift_factor`,
`latents_mean` / `latents_std`) or that LatentRT does not know are refused.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentrt.errors import CheckpointError
from latentrt.manifest import sha256_tree
from latentrt.paths import check_checkpoint
from latentrt.tiny_vae import TinyVaeSpec

from .models import download, looks_like_hub_id, quiet_progress, read_json

log = logging.getLogger(__name__)

TINY_VAE_CLASS = "AutoencoderTiny"
HUB_PATTERNS = ("config.json", "*.safetensors")  # a single model's repository: files at its root
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Config keys diffusers builds the model from (the exported graph is the model diffusers builds); `force_upcast`
# only matters to fp16 pipelines, `block_out_channels` is diffusers' copy of decoder_block_out_channels.
ARCHITECTURE_KEYS = frozenset({
    "in_channels", "out_channels", "encoder_block_out_channels", "decoder_block_out_channels", "act_fn",
    "upsample_fn", "latent_channels", "upsampling_scaling_factor", "num_encoder_blocks", "num_decoder_blocks",
    "block_out_channels", "force_upcast"})
ENCODE_ONLY_KEYS = frozenset({"latent_magnitude", "latent_shift"})  # scale_latents / unscale_latents: not decode
SCALING_KEYS = frozenset({"scaling_factor", "shift_factor"})  # scaling honoured; shift_factor must be 0
UNSCALED_KEYS = ("latents_mean", "latents_std")  # SDXL pipelines would standardize with these: must be absent/null
KNOWN_KEYS = ARCHITECTURE_KEYS | ENCODE_ONLY_KEYS | SCALING_KEYS | frozenset(UNSCALED_KEYS)
IMAGE_CHANNELS = 3


@dataclass(frozen=True)
class TinyVaeRef:
    """A located, checked tiny VAE folder whose weights are not loaded yet."""

    folder: Path
    config: dict[str, Any]
    spec: TinyVaeSpec


def resolve_tiny_vae(source: str | os.PathLike[str]) -> tuple[Path, str]:
    """(local folder, what to record as its source): a folder (recorded absolute) or a hub id (fetched)."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"--tiny-vae {text} is a file; give a diffusers AutoencoderTiny folder (config.json "
                                  "+ weights) or a hub id like madebyollin/taesd")
        return path, str(path.resolve())
    if looks_like_hub_id(text):
        return download(text, HUB_PATTERNS), text
    raise CheckpointError(f"--tiny-vae {text} does not exist (expected a diffusers AutoencoderTiny folder or a hub id "
                          "like madebyollin/taesd)")


def decoder_factor(config: Mapping[str, Any]) -> int:
    """Pixels per latent of the decoder: one upsampling between consecutive decoder levels (diffusers DecoderTiny)."""
    levels = config.get("num_decoder_blocks", (3, 3, 3, 1))
    up = config.get("upsampling_scaling_factor", 2)
    if not isinstance(levels, (list, tuple)) or not levels or not isinstance(up, int) or isinstance(up, bool) or up < 1:
        raise CheckpointError(f"tiny VAE config: num_decoder_blocks {levels!r} / upsampling_scaling_factor {up!r} "
                              "should be a non-empty list and a positive integer")
    return up ** (len(levels) - 1)


def check_config(config: Mapping[str, Any], where: str, latent_channels: int, scale_factor: int) -> float:
    """CheckpointError naming the first key LatentRT cannot honour; returns the scaling_factor to divide by."""
    if config.get("_class_name") != TINY_VAE_CLASS:
        raise CheckpointError(f"{where} describes a {config.get('_class_name')!r}, not a diffusers {TINY_VAE_CLASS} "
                              "(TAESD); give a tiny VAE folder such as madebyollin/taesd")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in KNOWN_KEYS)
    if unknown:
        raise CheckpointError(f"{where}: config key(s) {', '.join(unknown)} are not supported for a tiny VAE "
                              f"(known: {', '.join(sorted(KNOWN_KEYS))})")
    channels = config.get("latent_channels", 4)
    if channels != latent_channels:
        raise CheckpointError(f"{where}: the tiny VAE's latent_channels {channels!r} do not match the model's "
                              f"{latent_channels} latent channels; use the tiny VAE of this model's family "
                              "(taesd: SD 1.x / 2.x, taesdxl: SDXL)")
    if config.get("out_channels", IMAGE_CHANNELS) != IMAGE_CHANNELS:
        raise CheckpointError(f"{where}: out_channels {config.get('out_channels')!r} is not supported (RGB images: "
                              f"{IMAGE_CHANNELS})")
    factor = decoder_factor(config)
    if factor != scale_factor:
        raise CheckpointError(f"{where}: the tiny VAE decodes {factor} pixels per latent (upsampling_scaling_factor "
                              f"** (decoder levels - 1)); the model's VAE factor is {scale_factor}")
    shift = config.get("shift_factor")
    if shift not in (None, 0, 0.0):
        raise CheckpointError(f"{where}: shift_factor {shift!r} is not supported (the Stable Diffusion pipelines "
                              "decode latents / scaling_factor with no shift); use a tiny VAE with shift_factor 0")
    for key in UNSCALED_KEYS:
        if config.get(key) is not None:
            raise CheckpointError(f"{where}: {key} is not supported for a tiny VAE (latents are divided by "
                                  "scaling_factor only); remove it or use madebyollin's taesd / taesdxl")
    scale = config.get("scaling_factor", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise CheckpointError(f"{where}: scaling_factor {scale!r} should be a positive number")
    return float(scale)


def locate_tiny_vae(source: str | os.PathLike[str], latent_channels: int, scale_factor: int) -> TinyVaeRef:
    """Resolve, check (configs only, against the model's latent channels and VAE factor) and hash a tiny VAE."""
    folder, recorded = resolve_tiny_vae(source)
    check_checkpoint(folder)
    config = read_json(folder / "config.json", TINY_VAE_CLASS)
    scale = check_config(config, str(folder / "config.json"), latent_channels, scale_factor)
    if not any(p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) for p in folder.iterdir()):
        raise CheckpointError(f"{folder} has no weights (diffusion_pytorch_model.safetensors); not a complete "
                              f"{TINY_VAE_CLASS} folder")
    digest = sha256_tree(folder, include=lambda rel: len(rel.parts) == 1 and (
        rel.name == "config.json" or rel.name.endswith(WEIGHT_SUFFIXES)))
    return TinyVaeRef(folder, dict(config), TinyVaeSpec(recorded, digest, scale, latent_channels, scale_factor))


def load_tiny_vae(ref: TinyVaeRef) -> nn.Module:
    """The AutoencoderTiny, float32 on the CPU, in eval mode (no tiling or slicing: one decode per batch)."""
    from diffusers import AutoencoderTiny

    try:
        with quiet_progress():
            vae: Any = AutoencoderTiny.from_pretrained(str(ref.folder), torch_dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - damaged weights or configs surface as many types (SafetensorError, ...)
        detail = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(f"{ref.folder}: cannot load the tiny VAE ({TINY_VAE_CLASS}): {detail[:300]}") from None
    log.info("loaded tiny VAE %s from %s", ref.spec.source, ref.folder)
    return vae.to("cpu").float().eval()


class TinyVaeDecoderWrapper(nn.Module):
    """latent (already divided by the tiny VAE's scaling_factor) -> images in [-1, 1] (not clamped).

    diffusers' `AutoencoderTiny.decode` (TAESD): tanh(latent / 3) * 3, the decoder, then 2x - 1.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae: Any = vae  # diffusers AutoencoderTiny

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.decode(latent, return_dict=False)[0],)


# ---------------------------------------------------------------------------- a random one for tests


def make_tiny_vae(folder: str | os.PathLike[str], latent_channels: int = 4, seed: int = 0,
                  **config: Any) -> Path:
    """Save a random-weight AutoencoderTiny (8 channels, one block per level, factor 8) as a diffusers folder."""
    from diffusers import AutoencoderTiny

    settings: dict[str, Any] = dict(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                                    latent_channels=latent_channels)
    torch.manual_seed(seed)
    vae = _spread_output(AutoencoderTiny(**(settings | config)).eval(), seed)
    out = Path(folder)
    vae.save_pretrained(str(out), safe_serialization=True)
    return out


def _spread_output(vae: Any, seed: int, std: float = 0.25) -> Any:
    """Rescale the last decoder conv so that random latents decode around 0 with `std` (random weights alone decode
    to nearly one colour, mostly clamped away: a comparison of such images would show little)."""
    g = torch.Generator().manual_seed(seed + 1)
    probe = torch.randn((4, vae.config.latent_channels, 8, 8), generator=g)
    last = vae.decoder.layers[-1]  # Conv2d to RGB (with bias); the decoder returns 2 * conv - 1
    with torch.no_grad():
        conv = (vae.decode(probe, return_dict=False)[0] + 1) / 2
        a = std / 2 / float(conv.std())
        last.weight.mul_(a)
        last.bias.copy_(a * (last.bias - conv.mean()) + 0.5)
    return vae
