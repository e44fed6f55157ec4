"""Prompts -> UNet conditioning, computed exactly as the diffusers SD / SDXL pipelines compute it.

SD 1.x / 2.x: the text encoder's chosen hidden state is the context. SDXL: each encoder's
penultimate hidden state, concatenated on the channel axis, plus text_encoder_2's pooled
projection (`text_embeds`) and the size / crop / aesthetic `time_ids`. Prompts are padded to the
tokenizer's 77 tokens; longer prompts are encoded in 75-token windows and concatenated along the
sequence, as AUTOMATIC1111 and ComfyUI do (`latentrt.runtime.prompts`). Each distinct text is
encoded once per call (positives and negatives share one batch).
LCM-distilled UNets take the guidance scale as an embedding (`guidance_embedding`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from latentrt.errors import InvalidRequest
from latentrt.families import FamilySpec, TimeIds
from latentrt.names import DIM_BATCH
from latentrt.tensors import HIDDEN_STATES, INPUT_IDS, TEXT_EMBEDS

from .backends.base import Engine
from .prompts import PromptTokens, batch_windows, emphasize, prompt_tokens, window_length
from .timing import StageTimer

log = logging.getLogger(__name__)

Size = tuple[int, int]  # (height, width) pixels


@dataclass
class TextConditioning:
    """Per-image text conditioning, one row per image (prompts repeated `num_images_per_prompt` times)."""

    context: torch.Tensor  # (N, 77 * K, C) encoder_hidden_states, K prompt windows
    pooled: torch.Tensor | None  # (N, P) text_embeds (SDXL)
    negative_context: torch.Tensor | None  # (N, 77 * K, C), present when guidance runs
    negative_pooled: torch.Tensor | None

    def unet_batch(self, cfg: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(encoder_hidden_states, text_embeds) for the UNet: [uncond, cond] stacked when `cfg`."""
        if not cfg:
            return self.context, self.pooled
        assert self.negative_context is not None
        context = torch.cat([self.negative_context, self.context])
        pooled = None if self.pooled is None else torch.cat([self._neg_pooled(), self.pooled])
        return context, pooled

    def _neg_pooled(self) -> torch.Tensor:
        assert self.negative_pooled is not None
        return self.negative_pooled


def as_list(prompt: str | Sequence[str], what: str = "prompt") -> list[str]:
    """A prompt or list of prompts as a non-empty list of strings."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidRequest(f"{what} must be a string or a non-empty list of strings")
    return prompts


def check_windows(tokens: Sequence[PromptTokens], max_windows: int | None, window: int) -> int:
    """The window count K the texts need (the most any needs); InvalidRequest beyond what the UNet takes."""
    size = window - 2
    count = max(t.windows(size) for t in tokens)
    if max_windows is not None and count > max_windows:
        longest = max(len(t.ids) for t in tokens)
        raise InvalidRequest(f"the prompt is {longest} tokens ({count} windows of {size}); these engines take at most "
                             f"{max_windows * size} prompt tokens ({max_windows} windows of {size}, context "
                             f"{max_windows * window}): shorten the prompt, or rebuild the engines with "
                             f"`latentrt build --prompt-windows {count}` (from a fresh `latentrt export` if the "
                             "export predates long prompts)")
    return count


def _encode_batch(engine: Engine, ids: torch.Tensor, timer: StageTimer | None) -> dict[str, torch.Tensor]:
    """Run a text encoder on token ids, in chunks no larger than its batch range."""
    limit = engine.io.dims[DIM_BATCH].max if DIM_BATCH in engine.io.dims else ids.shape[0]
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, ids.shape[0], limit):
        chunk = ids[start:start + limit].to(engine.device)
        parts.append(engine.run({INPUT_IDS: chunk}, timer))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def encode_texts(spec: FamilySpec, engines: dict[str, Engine] | Any, tokenizers: dict[str, Any],
                 texts: Sequence[str], timer: StageTimer | None = None, *, weighting: bool = False,
                 max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context (B, 77 * K, C), pooled (B, P) or None) for a list of texts, one encoder call each.

    Every text is cut into the same number K of windows (see `latentrt.runtime.prompts`): the most
    any text needs, shorter texts padded with empty windows. The pooled projection is the first
    window's (as A1111 and ComfyUI take it). `weighting` reads the `(word:1.3)` syntax.
    """
    tokens = {te.tokenizer: [prompt_tokens(tokenizers[te.tokenizer], t, weighting) for t in texts]
              for te in spec.text_encoders}
    first = tokenizers[spec.text_encoders[0].tokenizer]
    count = check_windows([t for per in tokens.values() for t in per], max_windows, window_length(first))
    hidden: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for te in spec.text_encoders:
        tok = tokenizers[te.tokenizer]
        ids, weights = batch_windows(tok, tokens[te.tokenizer], count)
        out = _encode_batch(engines[te.component], ids, timer)
        states = out[HIDDEN_STATES]  # (B * K, 77, C_i)
        if weighting:
            states = emphasize(states, weights.to(states.device))
        hidden.append(states.reshape(len(texts), count * states.shape[1], states.shape[2]))
        if te.pooled:
            pooled = out[TEXT_EMBEDS].reshape(len(texts), count, -1)[:, 0]
    return torch.cat(hidden, dim=-1), pooled


def encode_prompts(spec: FamilySpec, engines: dict[str, Engine] | Any, tokenizers: dict[str, Any],
                   prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None, *, cfg: bool,
                   num_images_per_prompt: int = 1, zero_empty_negative: bool = False,
                   timer: StageTimer | None = None, weighting: bool = False,
                   max_windows: int | None = None) -> TextConditioning:
    """Conditioning for a batch of prompts, as diffusers' `encode_prompt` computes it (up to 75 tokens).

    `negative_prompt=None` means "no negative prompt": SDXL checkpoints with
    `force_zeros_for_empty_prompt` (`zero_empty_negative`) then use all-zero negative embeddings,
    others encode the empty string. Longer prompts are encoded in 75-token windows (negatives padded
    to the same window count); more than `max_windows` windows is an InvalidRequest. `weighting`
    reads the `(word:1.3)` syntax (`latentrt.runtime.prompts`).
    """
    prompts = as_list(prompt)
    zero_negative = cfg and negative_prompt is None and zero_empty_negative
    negatives: list[str] = []
    if cfg and not zero_negative:
        negatives = [""] * len(prompts) if negative_prompt is None else as_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise InvalidRequest(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give one, or one "
                                 "per prompt")
    unique = list(dict.fromkeys(prompts + negatives))  # each distinct text is encoded once
    context, pooled = encode_texts(spec, engines, tokenizers, unique, timer, weighting=weighting,
                                   max_windows=max_windows)
    rows = {text: i for i, text in enumerate(unique)}

    def pick(x: torch.Tensor | None, texts: list[str]) -> torch.Tensor | None:
        if x is None:
            return None
        index = torch.tensor([rows[t] for t in texts for _ in range(num_images_per_prompt)], device=x.device)
        return x.index_select(0, index)

    cond = TextConditioning(pick(context, prompts), pick(pooled, prompts), None, None)  # type: ignore[arg-type]
    if zero_negative:
        cond.negative_context = torch.zeros_like(cond.context)
        cond.negative_pooled = None if cond.pooled is None else torch.zeros_like(cond.pooled)
    elif cfg:
        cond.negative_context, cond.negative_pooled = pick(context, negatives), pick(pooled, negatives)
    return cond


def guidance_embedding(guidance: float, dim: int, batch: int) -> torch.Tensor:
    """(batch, dim) sinusoidal embedding of w = guidance - 1, the `timestep_cond` of LCM-distilled UNets.

    Luo et al. 2023 (Latent Consistency Models, arXiv:2310.04378) condition the UNet on the guidance
    scale; diffusers' LatentConsistencyModelPipeline embeds w * 1000 like a timestep (sin half, then
    cos half, frequencies 10000^(-i / (dim/2 - 1)), zero-padded to an odd dim) in float32.
    """
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)  # float32 throughout, as diffusers computes it
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    w = torch.tensor(guidance - 1, dtype=torch.float32) * 1000.0
    angles = w.expand(batch, 1) * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


# ---------------------------------------------------------------------------- SDXL time ids


@dataclass
class SizeConditioning:
    """SDXL micro-conditioning (all sizes (height, width) in pixels; None = the output size)."""

    original_size: Size | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: Size | None = None
    negative_original_size: Size | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: Size | None = None
    aesthetic_score: float = 6.0  # refiner only
    negative_aesthetic_score: float = 2.5  # refiner only


def size_crop_target_ids(size: Size, cond: SizeConditioning,
                         img2img: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) SDXL base time ids, each (1, 6): original (h, w), crop (y, x), target (h, w).

    The negative ids follow the diffusers pipeline of the mode. StableDiffusionXLPipeline (txt2img):
    separate ids only when both negative_original_size and negative_target_size are given (negative
    crop default (0, 0)), else the positive ids. StableDiffusionXLImg2ImgPipeline (`img2img`):
    negative sizes default to the positive ones, and the crop is the positive one.
    """
    orig, target = tuple(cond.original_size or size), tuple(cond.target_size or size)
    crop = tuple(cond.crops_coords_top_left)
    neg_orig, neg_target = tuple(cond.negative_original_size or orig), tuple(cond.negative_target_size or target)
    pos = [*orig, *crop, *target]
    if img2img:
        neg = [*neg_orig, *crop, *neg_target]
    elif cond.negative_original_size is not None and cond.negative_target_size is not None:
        neg = [*neg_orig, *tuple(cond.negative_crops_coords_top_left or (0, 0)), *neg_target]
    else:
        neg = pos
    return torch.tensor([pos], dtype=torch.float32), torch.tensor([neg], dtype=torch.float32)


def size_crop_aesthetic_ids(size: Size, cond: SizeConditioning) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) SDXL refiner time ids, each (1, 5): original (h, w), crop (y, x), aesthetic score.

    As StableDiffusionXLImg2ImgPipeline with `requires_aesthetics_score` (the refiner runs in no other
    pipeline): negative sizes default to the positive ones, the negative crop to (0, 0).
    """
    orig, crop = tuple(cond.original_size or size), tuple(cond.crops_coords_top_left)
    neg_orig = tuple(cond.negative_original_size or orig)
    neg_crop = tuple(cond.negative_crops_coords_top_left or (0, 0))
    pos = [*orig, *crop, cond.aesthetic_score]
    neg = [*neg_orig, *neg_crop, cond.negative_aesthetic_score]
    return torch.tensor([pos], dtype=torch.float32), torch.tensor([neg], dtype=torch.float32)


def time_ids(kind: TimeIds, size: Size, cond: SizeConditioning,
             img2img: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) time ids of a TimeIds kind: `size_crop_target_ids` or `size_crop_aesthetic_ids`.

    The pipeline's providers call those two directly (one per declared `time_ids` input); NONE gives
    empty (1, 0) ids.
    """
    if kind is TimeIds.SIZE_CROP_TARGET:
        return size_crop_target_ids(size, cond, img2img)
    if kind is TimeIds.SIZE_CROP_AESTHETIC:
        return size_crop_aesthetic_ids(size, cond)
    return torch.zeros(1, 0), torch.zeros(1, 0)
