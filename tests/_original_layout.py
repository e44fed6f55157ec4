"""Test-only: write a diffusers pipeline folder as one original-layout (CompVis / Stability) safetensors file.

diffusers converts original -> diffusers (loaders/single_file_utils.py) but has no converter back,
so this module is the reverse key map for the architectures the tiny checkpoints use:

- UNet2DConditionModel -> ``model.diffusion_model.*`` (LDM openaimodel: time_embed, label_emb,
  input_blocks, middle_block, output_blocks, out)
- AutoencoderKL -> ``first_stage_model.*`` (encoder.down.N.block, mid.block_1/attn_1, decoder.up
  in reverse order; attention q/k/v/proj_out as 1x1 convolutions)
- OpenAI CLIP-L -> ``<prefix>transformer.text_model.*`` (the HF layout, as the originals store it)
- OpenCLIP (SD 2 ViT-H, SDXL bigG) -> ``<prefix>model.*`` (resblocks, fused attention in_proj,
  positional_embedding, ln_final, text_projection stored transposed)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from latentrt.families import FamilyId
from latentrt.reference.models import detect_family

StateDict = dict[str, torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# family -> {diffusers component: (text tower layout, original key prefix)}
TEXT_LAYOUT: dict[FamilyId, dict[str, tuple[str, str]]] = {
    FamilyId.SD1: {"text_encoder": ("clip", "cond_stage_model.")},
    FamilyId.SD1_INPAINT: {"text_encoder": ("clip", "cond_stage_model.")},
    **{f: {"text_encoder": ("openclip", "cond_stage_model.")}
       for f in (FamilyId.SD2, FamilyId.SD2_V, FamilyId.SD2_INPAINT, FamilyId.SD_TURBO)},
    **{f: {"text_encoder": ("clip", "conditioner.embedders.0."), "text_encoder_2": ("openclip", "conditioner.embedders.1.")}
       for f in (FamilyId.SDXL, FamilyId.SDXL_TURBO)},
    FamilyId.SDXL_REFINER: {"text_encoder_2": ("openclip", "conditioner.embedders.0.")},
}


# ---------------------------------------------------------------------------- UNet


UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
               ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    for new, old in UNET_RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_key(key: str, layers_per_block: int, up_has_attention: Callable[[int], bool]) -> str:
    """One diffusers UNet2DConditionModel key -> its LDM openaimodel key (without the prefix)."""
    top, _, leaf = key.rpartition(".")
    if top in UNET_TOP:
        return f"{UNET_TOP[top]}.{leaf}"
    per_down, per_up = layers_per_block + 1, layers_per_block + 1
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + b * per_down + j}." + (f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}")
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * per_down + layers_per_block}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, j, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{b * per_up + j}." + (f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}")
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        b = int(m[1])
        slot = 2 if up_has_attention(b) else 1  # the upsampler follows the resnet (and the attention, if any)
        return f"output_blocks.{b * per_up + layers_per_block}.{slot}.conv.{m[2]}"
    raise KeyError(f"no original-layout name for UNet key {key!r}")


def unet_to_original(state: StateDict, config: dict) -> StateDict:
    """A diffusers UNet2DConditionModel state dict -> ``model.diffusion_model.*``."""
    layers = config["layers_per_block"]
    assert isinstance(layers, int), "per-block layers_per_block lists are not mapped"
    up_attn = {int(m[1]) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    return {UNET_PREFIX + unet_key(k, layers, lambda b: b in up_attn): v for k, v in state.items()}


# ---------------------------------------------------------------------------- VAE


VAE_TOP = {"conv_norm_out": "norm_out"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, num_up_blocks: int) -> str:
    """One diffusers AutoencoderKL key -> its LDM autoencoder key (without the prefix)."""
    shortcut = key.replace("conv_shortcut", "nin_shortcut")
    if m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", shortcut):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", shortcut):
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", shortcut):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def vae_to_original(state: StateDict, config: dict) -> StateDict:
    """A diffusers AutoencoderKL state dict -> ``first_stage_model.*`` (attention linears as 1x1 convs)."""
    out = {}
    for k, v in state.items():
        name = vae_key(k, len(config["up_block_types"]))
        if ".mid.attn_1." in name and name.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # the original attention projections are Conv2d(C, C, 1)
        out[VAE_PREFIX + name] = v
    return out


# ---------------------------------------------------------------------------- text encoders


def _strip_text_model(state: StateDict) -> StateDict:
    """transformers 5 CLIPTextModel keys have no `text_model.` prefix; WithProjection keys do."""
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def clip_to_original(state: StateDict, prefix: str) -> StateDict:
    """OpenAI CLIP-L (transformers CLIPTextModel) -> ``<prefix>transformer.text_model.*``."""
    return {f"{prefix}transformer.text_model.{k}": v for k, v in _strip_text_model(state).items()}


OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                "embeddings.position_embedding.weight": "positional_embedding",
                "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
OPENCLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                  ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


def openclip_to_original(state: StateDict, prefix: str) -> StateDict:
    """OpenCLIP text tower (transformers CLIPTextModel[WithProjection]) -> ``<prefix>model.*``."""
    src, out, base = _strip_text_model(state), {}, f"{prefix}model."
    for k, v in src.items():
        if k in OPENCLIP_TOP:
            out[base + OPENCLIP_TOP[k]] = v
        elif k == "text_projection.weight":
            out[base + "text_projection"] = v.T.contiguous()  # open_clip multiplies x @ text_projection
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.*)", k):
            layer, rest = m[1], m[2]
            if re.match(r"self_attn\.[qkv]_proj\.", rest):
                continue  # fused below
            new = next((rest.replace(a, b, 1) for a, b in OPENCLIP_LAYER if rest.startswith(a + ".")), None)
            if new is None:
                raise KeyError(f"no original-layout name for text encoder key {k!r}")
            out[f"{base}transformer.resblocks.{layer}.{new}"] = v
        else:
            raise KeyError(f"no original-layout name for text encoder key {k!r}")
    layers = sorted({int(m[1]) for k in src if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        attn = f"encoder.layers.{i}.self_attn"
        for leaf in ("weight", "bias"):
            qkv = [src[f"{attn}.{p}_proj.{leaf}"] for p in "qkv"]
            out[f"{base}transformer.resblocks.{i}.attn.in_proj_{leaf}"] = torch.cat(qkv, dim=0)
    return out


# ---------------------------------------------------------------------------- whole pipeline


def _part(folder: Path, part: str) -> tuple[StateDict, dict]:
    files = sorted((folder / part).glob("*.safetensors"))
    assert len(files) == 1, f"{folder / part}: expected one safetensors file, found {files}"
    return load_file(str(files[0])), json.loads((folder / part / "config.json").read_text())


def original_state_dict(folder: Path) -> StateDict:
    """All weights of a diffusers pipeline folder, renamed to the original single-file layout."""
    family = detect_family(folder).id
    unet, unet_cfg = _part(folder, "unet")
    vae, vae_cfg = _part(folder, "vae")
    out = {**unet_to_original(unet, unet_cfg), **vae_to_original(vae, vae_cfg)}
    for component, (layout, prefix) in TEXT_LAYOUT[family].items():
        state, _ = _part(folder, component)
        out.update(clip_to_original(state, prefix) if layout == "clip" else openclip_to_original(state, prefix))
    return out


def save_original_layout(folder: Path, out_file: Path, dtype: torch.dtype | None = None) -> Path:
    """Write a diffusers folder's weights as one original-layout safetensors file (as users download them)."""
    state = original_state_dict(folder)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_file))
    return out_file


def config_only_copy(folder: Path, dest: Path) -> Path:
    """A copy of a diffusers folder without weight files: diffusers then cannot fill gaps from it silently."""
    for p in folder.rglob("*"):
        if p.is_file() and p.suffix not in (".safetensors", ".bin"):
            target = dest / p.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())
    return dest
