"""A mid-size Stable Diffusion 1.5-topology checkpoint with random weights, for CPU speed measurements.

The real SD 1.5 UNet (block_out_channels 320/640/1280/1280, 860M parameters) takes tens of seconds
per step on two CPU cores; the tiny test models are so small that fixed costs dominate. This
configuration keeps SD 1.5's exact structure (4 levels, 2 layers per block, cross-attention at
the first three levels, 8 heads, 768-wide context, CLIP ViT-L/14-shaped text tower with 6 of its
12 layers) at 0.4x the channel width: a 142M-parameter UNet that takes ~0.35 s per CFG step for
a 256x256 image (32x32 latents) on our 2 cores, so the UNet dominates the end-to-end time as it
does in the real model.

It is saved through diffusers' `save_pretrained` as a complete StableDiffusionPipeline folder
(with the real CLIP BPE tokenizer and an Euler scheduler), so it is loaded by exactly the code
path a user's checkpoint takes:

    python -m benchmarks.midsize /tmp/midsize        # or make_midsize(Path("/tmp/midsize"))
    latentrt bench /tmp/midsize --size 256x256 --steps 10 --precision int8 -o out/
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from latentrt.families import get_family
from latentrt.reference.tiny import TinyText, make_scheduler, make_text_encoder
from latentrt.reference.tokenizers import EOS, save_clip_tokenizer

log = logging.getLogger(__name__)

SEED = 2024
FAMILY = "sd1"
TEXT = TinyText(hidden=768, act="quick_gelu", layers=6, heads=12, projection=768)  # CLIP ViT-L/14 text, 6 layers

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=32,  # 256x256 pixels
    in_channels=4, out_channels=4,
    block_out_channels=(128, 256, 512, 512),  # SD 1.5: (320, 640, 1280, 1280)
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,  # diffusers' SD 1.5 config: 8 heads
    norm_num_groups=32,
)

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(64, 128, 256, 256),  # SD: (128, 256, 512, 512)
    layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=0.18215,
)


def _init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded default init, then norm scales / biases jittered so none is a trivial 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def make_midsize(folder: Path) -> Path:
    """Build the mid-size SD 1.5-topology checkpoint and save it as a diffusers folder at `folder`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    spec = get_family(FAMILY)
    folder = Path(folder)
    tok_dir = save_clip_tokenizer(folder.parent / f".{folder.name}.tokenizer", EOS)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    text_encoder = make_text_encoder(TEXT, pooled=False, pad_id=int(tokenizer.pad_token_id), seed=SEED)
    torch.manual_seed(SEED + 1)
    unet = _init(UNet2DConditionModel(**UNET_CONFIG), SEED + 1)
    torch.manual_seed(SEED + 2)
    vae = _init(AutoencoderKL(**VAE_CONFIG), SEED + 2)
    parts: dict[str, Any] = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                 scheduler=make_scheduler(spec), safety_checker=None, feature_extractor=None)
    pipe = StableDiffusionPipeline(requires_safety_checker=False, **parts)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    shutil.rmtree(tok_dir, ignore_errors=True)
    n = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in
         (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    log.info("mid-size checkpoint in %s: %s M parameters", folder, {k: round(v, 1) for k, v in n.items()})
    return folder


def midsize_folder(folder: Path) -> Path:
    """`folder` holding the mid-size checkpoint, built if it is not there yet."""
    if not (Path(folder) / "model_index.json").is_file():
        make_midsize(Path(folder))
    return Path(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("folder", type=Path, help="where to write the diffusers folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    midsize_folder(args.folder)


if __name__ == "__main__":
    main()
