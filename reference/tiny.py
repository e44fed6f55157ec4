"""Built-in tiny checkpoints: the real architectures of every family with small widths and random weights.

`make_tiny(family, folder)` saves a complete diffusers pipeline folder through diffusers' own
`save_pretrained` (model_index.json, safetensors weights, configs, CLIP tokenizers with the real
vocabulary, an Euler scheduler with the family's defaults), so a tiny model is loaded by exactly
the code path a user's checkpoint takes. The structure is kept: cross-attention down/up blocks,
SDXL's text-time add-embedding, 9-channel inpainting input, v-prediction config, two-encoder
SDXL context, a VAE with a scale factor of 8. Weights are seeded, so the files are identical
from run to run. Variants (`VARIANTS`, e.g. `tiny:sd1-lcm`) are a family's architecture with a
distilled release's config changes (LCM: the UNet's `time_cond_proj_dim`, an LCMScheduler).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from latentrt.families import UNET_2D, AutoencoderKind, FamilySpec, Prediction, TextTower, get_family
from latentrt.manifest import staging_dir
from latentrt.names import ENCODER_HIDDEN_STATES_KEYWORD, TIME_IDS

from .parts import pipeline_part
from .structure import ADDITION_KEYS, AUTOENCODER_CLASSES
from .tokenizers import EOS, save_clip_tokenizer
from .unclip import tiny_image_parts

log = logging.getLogger(__name__)

TINY_VERSION = 2  # bump when the recipe changes: cached folders are keyed by it
SEED = 1234
TIME_EMBED_DIM = 8  # SDXL addition_time_embed_dim (256 in the real model)


@dataclass(frozen=True)
class TinyText:
    """A small CLIP text tower: `quick_gelu` = OpenAI CLIP-L flavour, `gelu` = OpenCLIP (SD 2, SDXL-G)."""

    hidden: int
    act: str
    layers: int = 3
    heads: int = 4
    projection: int = 40  # pooled width of CLIPTextModelWithProjection


CLIP_L = TinyText(hidden=32, act="quick_gelu")
OPENCLIP = TinyText(hidden=48, act="gelu")
LDM_BERT = TinyText(hidden=32, act="gelu", layers=2)  # issue 12 (H2): diffusers' LDMBertModel (no projection)
TOWERS = {TextTower.CLIP_L: CLIP_L, TextTower.OPENCLIP_H: OPENCLIP, TextTower.OPENCLIP_BIGG: OPENCLIP,
          TextTower.LDM_BERT: LDM_BERT}
CONV_PROJECTION_TOWERS = (TextTower.CLIP_L, TextTower.LDM_BERT)  # UNets whose attention projects with 1x1 convs


def cache_root() -> Path:
    """Where built-in tiny models live: $LATENTRT_CACHE or ~/.cache/latentrt."""
    return Path(os.environ.get("LATENTRT_CACHE") or Path.home() / ".cache" / "latentrt")


@dataclass(frozen=True)
class TinyVariant:
    """A tiny checkpoint that is a family's architecture with a distilled release's config changes."""

    family: str
    unet: tuple[tuple[str, Any], ...]  # UNet config overrides
    scheduler: str  # diffusers scheduler class
    scheduler_config: tuple[tuple[str, Any], ...]
    pipeline_class: str  # model_index.json `_class_name`


LCM_TIME_COND_DIM = 32  # time_cond_proj_dim (256 in LCM-Dreamshaper-v7)
VARIANTS = {
    # latent-consistency SD 1.5 (LCM-Dreamshaper-v7 layout): guidance-embedding UNet input, LCMScheduler
    "sd1-lcm": TinyVariant("sd1", (("time_cond_proj_dim", LCM_TIME_COND_DIM),), "LCMScheduler",
                           (("original_inference_steps", 50), ("timestep_scaling", 10.0), ("set_alpha_to_one", True),
                            ("clip_sample", False)), "LatentConsistencyModelPipeline"),
}


def tiny_folder(family: str) -> Path:
    """The cached tiny checkpoint folder of a family (or variant, e.g. 'sd1-lcm'), built on first use."""
    name = family if family in VARIANTS else get_family(family).name
    dest = cache_root() / "tiny" / f"{name}-v{TINY_VERSION}"
    if (dest / "model_index.json").is_file():
        return dest
    with staging_dir(dest) as tmp:
        make_tiny(name, tmp / "model")
        try:
            os.replace(tmp / "model", dest)
        except OSError:  # another process finished first: keep its (identical) folder
            if not (dest / "model_index.json").is_file():
                raise
    log.info("built tiny %s checkpoint in %s", name, dest)
    return dest


def text_recipes(spec: FamilySpec) -> list[TinyText]:
    """The tiny text tower of each of the family's encoders, in spec order."""
    return [TOWERS[te.tower] for te in spec.text_encoders]


def make_text_encoder(t: TinyText, pooled: bool, pad_id: int, seed: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=t.hidden, intermediate_size=2 * t.hidden, num_hidden_layers=t.layers,
        num_attention_heads=t.heads, max_position_embeddings=77, hidden_act=t.act, projection_dim=t.projection,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_id,
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if pooled else CLIPTextModel)(config)
    return _jitter(model, seed)


@dataclass(frozen=True)
class TinyUNetLayout:
    """Where a two-level tiny UNet attends, after the real model's layout (SDXL has no attention at full resolution)."""

    attention_level: int = 0  # 0: the first (full-resolution) level attends (SD 1.x / 2.x), 1: the second (SDXL)
    transformer_layers_per_block: tuple[int, ...] | None = None


_XL_LAYOUT = TinyUNetLayout(attention_level=1, transformer_layers_per_block=(1, 2))
UNET_LAYOUTS: dict[str, TinyUNetLayout] = {"sdxl": _XL_LAYOUT, "sdxl-turbo": _XL_LAYOUT, "sdxl-refiner": _XL_LAYOUT}
UNET_LAYOUTS["sd-x4-upscaler"] = TinyUNetLayout(attention_level=1)  # issue 12 (H3): no attention at full resolution


def _blocks(attends: bool, level: int, kind: str) -> tuple[str, str]:
    """("CrossAttnDownBlock2D", "DownBlock2D")-style block types of a two-level UNet (up blocks mirror down)."""
    blocks = [f"{kind}Block2D", f"{kind}Block2D"]
    if attends:
        blocks[level if kind == "Down" else 1 - level] = f"CrossAttn{kind}Block2D"
    return blocks[0], blocks[1]


def unet_config(spec: FamilySpec, context_dim: int, pooled_dim: int) -> dict[str, Any]:
    """A two-level UNet2DConditionModel config with the structure the family declares (and its real layout)."""
    denoiser = spec.denoiser
    layout = UNET_LAYOUTS.get(spec.name, TinyUNetLayout())
    context = denoiser.keyword_input(ENCODER_HIDDEN_STATES_KEYWORD) is not None
    cfg: dict[str, Any] = dict(
        sample_size=spec.native_size[0] // spec.vae_scale_factor,
        in_channels=denoiser.in_channels(spec.latent_channels), out_channels=spec.latent_channels,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=(2, 4),
        down_block_types=_blocks(context, layout.attention_level, "Down"),
        up_block_types=_blocks(context, layout.attention_level, "Up"),
        # SD 1.x UNets (CLIP-L context only) and LDM's project attention with 1x1 convs, SD 2 and SDXL with linear layers
        use_linear_projection=any(te.tower not in CONV_PROJECTION_TOWERS for te in spec.text_encoders),
        upcast_attention=spec.prediction is Prediction.V,
    )
    if context:
        cfg.update(cross_attention_dim=context_dim)
    else:  # no cross-attention anywhere: the mid block attends to itself only
        cfg.update(mid_block_type="UNetMidBlock2D")
    if layout.transformer_layers_per_block is not None:
        cfg.update(transformer_layers_per_block=layout.transformer_layers_per_block)
    if denoiser.added_conditions:
        cfg.update(_addition_config(spec, pooled_dim))
    for c in denoiser.conditioning:  # the config settings each declared input comes with (a class count, ...)
        cfg.update(dict(c.unet_config), **dict(c.tiny_config))
    return cfg


def _addition_config(spec: FamilySpec, pooled_dim: int) -> dict[str, Any]:
    """The addition embedding that reads the family's added conditions (SDXL's text_time: pooled text + time ids)."""
    added = set(spec.denoiser.added_conditions)
    kind = next((k for k, keys in ADDITION_KEYS.items() if k is not None and set(keys) == added), None)
    if kind is None:
        raise ValueError(f"no diffusers addition embedding reads {', '.join(sorted(added))} (family {spec.name})")
    ids = spec.denoiser.conditioning_input(TIME_IDS)
    width = ids.width if ids is not None and isinstance(ids.width, int) else 0
    return dict(addition_embed_type=kind, addition_time_embed_dim=TIME_EMBED_DIM,
                projection_class_embeddings_input_dim=pooled_dim + width * TIME_EMBED_DIM)


# ---------------------------------------------------------------------------- issue 12, H1: UNet2DModel denoisers
TINY_LDM_SIDE = 64  # pixels: a tiny UNet2DModel's sample_size x the factor (LDMPipeline samples at sample_size)
LDM_SCHEDULER = ("DDIMScheduler", (("clip_sample", False),))  # what CompVis LDM releases ship


def unet2d_config(spec: FamilySpec) -> dict[str, Any]:
    """A two-level UNet2DModel config (self-attention at the second level, no cross-attention), as CompVis LDM."""
    cfg: dict[str, Any] = dict(
        sample_size=TINY_LDM_SIDE // spec.vae_scale_factor,
        in_channels=spec.denoiser.in_channels(spec.latent_channels), out_channels=spec.latent_channels,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    for c in spec.denoiser.conditioning:  # the config settings each declared input comes with (a class count, ...)
        cfg.update(dict(c.unet_config), **dict(c.tiny_config))
    return cfg


def make_unet(spec: FamilySpec, context_dim: int, pooled_dim: int, seed: int,
              overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel, UNet2DModel

    torch.manual_seed(seed)
    if spec.denoiser.model == UNET_2D:  # issue 12, H1
        return _jitter(UNet2DModel(**unet2d_config(spec), **(overrides or {})), seed)
    return _jitter(UNet2DConditionModel(**unet_config(spec, context_dim, pooled_dim), **(overrides or {})), seed)


VAE_CHANNELS = (16, 32, 32, 32)  # block_out_channels of the tiny VAE at a factor of 8 (fewer levels for less)
VQ_CODEBOOK = 64  # num_vq_embeddings of a tiny VQ autoencoder


def vae_config(spec: FamilySpec) -> dict[str, Any]:
    """A small autoencoder config of the family's kind and downsampling factor."""
    levels = spec.vae_scale_factor.bit_length()  # factor 2 ** (levels - 1)
    channels = (VAE_CHANNELS + (VAE_CHANNELS[-1],) * levels)[:levels]
    config: dict[str, Any] = dict(
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=channels, layers_per_block=1, norm_num_groups=8,
        latent_channels=spec.latent_channels, sample_size=spec.native_size[0],
        scaling_factor=spec.vae_scaling_factor, force_upcast=spec.fp16_vae_overflows,
    )
    if spec.autoencoder.kind is AutoencoderKind.VQ:
        config.update(num_vq_embeddings=VQ_CODEBOOK, vq_embed_dim=spec.latent_channels)
    return config


def make_vae(spec: FamilySpec, seed: int) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(seed)
    cls = getattr(diffusers, AUTOENCODER_CLASSES[spec.autoencoder.kind])
    vae = cls(**vae_config(spec))
    if spec.autoencoder.kind is AutoencoderKind.VQ:  # issue 12, H1: codes spread like the latents (N(0, 1)),
        with torch.no_grad():  # not diffusers' +-1/n init, whose near ties flip codes at float noise
            vae.quantize.embedding.weight.normal_(generator=torch.Generator().manual_seed(seed + 2))
    return _jitter(vae, seed)


# issue 12 (H2): families whose released checkpoints ship another scheduler than Euler: (class, config settings)
RELEASED_SCHEDULERS: dict[str, tuple[str, tuple[tuple[str, Any], ...]]] = {
    "ldm-text2img": ("DDIMScheduler", (("clip_sample", False), ("set_alpha_to_one", False))),  # ldm-text2im-large-256
}


def make_scheduler(spec: FamilySpec, variant: TinyVariant | None = None) -> Any:
    import diffusers

    s = spec.schedule
    default = LDM_SCHEDULER if spec.denoiser.model == UNET_2D else ("EulerDiscreteScheduler", ())  # issue 12, H1: LDM
    released = RELEASED_SCHEDULERS.get(spec.name, default)
    cls = getattr(diffusers, variant.scheduler if variant else released[0])
    return cls(
        num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
        beta_schedule=s.beta_schedule, prediction_type=spec.prediction.value,
        timestep_spacing=spec.sampling.spacing.value, steps_offset=1,
        **dict(variant.scheduler_config if variant else released[1]),
    )


def _jitter(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb 1-D parameters (norm scales, biases) so that none is a trivial 0 or 1."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_tiny(family: str, folder: Path) -> Path:
    """Build the tiny checkpoint of `family` (or a variant, e.g. 'sd1-lcm') as a diffusers pipeline folder."""
    variant = VARIANTS.get(family)
    spec = get_family(variant.family if variant else family)
    folder = Path(folder)
    texts = text_recipes(spec)
    encoders: dict[str, torch.nn.Module] = {}
    tokenizers: dict[str, Any] = {}
    for i, (te, t) in enumerate(zip(spec.text_encoders, texts)):
        if not te.tower.is_clip:  # issue 12 (H2): LDM-BERT and its WordPiece tokenizer
            tokenizers[te.tokenizer], encoders[te.component] = _ldm_bert(folder / ".tmp" / te.tokenizer, t, SEED + i)
            continue
        pad = "!" if te.tokenizer == "tokenizer_2" else EOS  # SDXL's OpenCLIP tokenizer pads with "!" (id 0)
        tokenizers[te.tokenizer] = _tokenizer(folder / ".tmp" / te.tokenizer, pad)
        encoders[te.component] = make_text_encoder(t, te.pooled, tokenizers[te.tokenizer].pad_token_id, SEED + i)
    context_dim = sum(t.hidden for t in texts)
    pooled_dim = next((t.projection for te, t in zip(spec.text_encoders, texts) if te.pooled), 0)
    image_parts, image_unet = tiny_image_parts(spec, SEED + 30)  # issue 12 (H4): Stable unCLIP's image side
    parts = dict(
        unet=make_unet(spec, context_dim, pooled_dim, SEED + 10, {**dict(variant.unet if variant else ()), **image_unet}),
        vae=make_vae(spec, SEED + 20), scheduler=make_scheduler(spec, variant), **encoders, **tokenizers,
        **image_parts,
    )
    parts.update(pipeline_parts(spec))  # issue 12 (H3): parts the pipeline class owns besides the model
    from .models import quiet_progress

    with quiet_progress():
        _save_pipeline(spec, parts, folder, variant.pipeline_class if variant else None)
    shutil.rmtree(folder / ".tmp", ignore_errors=True)
    if variant is None:  # distilled releases ship their own scheduler's config
        _add_released_scheduler_keys(folder / "scheduler" / "scheduler_config.json")
    return folder


# ---- issue 12 (H3): parts a pipeline class owns besides the model parts, keyed by the class
def _upscaler_parts() -> dict[str, Any]:
    """StableDiffusionUpscalePipeline's `low_res_scheduler`: the DDPM schedule that noises the low-res image."""
    from diffusers import DDPMScheduler

    return {"low_res_scheduler": DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                               beta_schedule="scaled_linear", clip_sample=False)}


PIPELINE_PARTS = {"StableDiffusionUpscalePipeline": _upscaler_parts}


def pipeline_parts(spec: FamilySpec) -> dict[str, Any]:
    """The extra parts of the family's pipeline class (none for most)."""
    make = PIPELINE_PARTS.get(spec.pipeline_class)
    return make() if make is not None else {}


def _add_released_scheduler_keys(path: Path) -> None:
    """Add the DDIM/PNDM keys that the released SD/SDXL scheduler configs carry (clip_sample: false, ...).

    The released configs were saved from PNDM/DDIM schedulers, so they hold these keys even when
    their class is Euler; without them a DDIM scheduler built from the config would clip x0.
    """
    config = json.loads(path.read_text())
    config.update({k: v for k, v in RELEASED_SCHEDULER_KEYS.items() if k not in config})
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


RELEASED_SCHEDULER_KEYS = {"clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True}


def _ldm_bert(folder: Path, t: TinyText, seed: int) -> tuple[Any, torch.nn.Module]:
    """issue 12 (H2): a tiny BertTokenizer and the LDMBertModel reading its ids."""
    from .ldm_text import make_ldm_bert, save_bert_tokenizer

    tok = save_bert_tokenizer(folder)
    return tok, _jitter(make_ldm_bert(t.hidden, t.layers, t.heads, len(tok), tok.pad_token_id, seed), seed)


def _tokenizer(folder: Path, pad_token: str) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(save_clip_tokenizer(folder, pad_token)))


def _save_pipeline(spec: FamilySpec, parts: dict[str, Any], folder: Path, class_name: str | None = None) -> None:
    """Save the parts as a diffusers pipeline folder, through the pipeline class the family is saved as.

    A family whose pipeline class does not take these parts (`DiffusionPipeline`: no dedicated diffusers
    pipeline) gets the generic pipeline's model_index.json and each part saved by its own `save_pretrained`.
    """
    import diffusers

    cls = getattr(diffusers, class_name or spec.pipeline_class)
    params = inspect.signature(cls.__init__).parameters
    parts = {pipeline_part(name, params): part for name, part in parts.items()}  # LDM: vqvae, bert (issue 12, H2)
    if set(parts) <= params.keys():
        _pipeline(spec, cls, params, parts).save_pretrained(str(folder), safe_serialization=True)
        return
    generic = diffusers.DiffusionPipeline()
    generic.register_modules(**parts)
    for name, part in parts.items():
        weights = {"safe_serialization": True} if isinstance(part, torch.nn.Module) else {}
        cast(Any, part).save_pretrained(str(folder / name), **weights)
    generic.save_config(str(folder))  # model_index.json: the generic class and each part's library and class


def _pipeline(spec: FamilySpec, cls: Any, params: Mapping[str, inspect.Parameter], parts: dict[str, Any]) -> Any:
    """The diffusers pipeline object that owns these parts (its class goes into model_index.json)."""
    extra: dict[str, Any] = {k: None for k in ("safety_checker", "feature_extractor") if k in params and k not in parts}
    extra.update({k: False for k in ("requires_safety_checker", "add_watermarker") if k in params})
    # parts the pipeline requires but the family does not have (the refiner's first text encoder)
    extra.update({k: None for k, p in params.items() if k != "self" and p.default is inspect.Parameter.empty
                  and p.kind is p.POSITIONAL_OR_KEYWORD and k not in parts and k not in extra})
    extra.update(dict(spec.pipeline_options))
    return cls(**extra, **parts)
