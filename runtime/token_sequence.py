"""The `token_sequence` provider: a cross-attention context the request gives as (tokens, width) sequences.

Rombach et al. 2022 (High-Resolution Image Synthesis with Latent Diffusion Models, sec. 4.3) condition
layout-to-image models on bounding boxes encoded as tokens and fed through cross-attention; any model
of that shape (a token sequence in, `encoder_hidden_states` of the UNet) declares
`latentrt.families.token_sequence(tokens)` and its requests give the encoded tokens themselves:

- `conditioning[name]`: one (tokens, width) sequence per prompt slot, as a list (of nested lists: JSON,
  `--condition NAME=file.npy`; or of arrays: the API) whose length is the slot count; one sequence (a
  list of one, or a (tokens, width) array) serves every slot;
- `conditioning["negative_<name>"]`, the same, for the unconditional half of classifier-free guidance
  (needed with guidance > 1: no spec can say what "no layout" is; it must have the same token count).
The width is the UNet's cross_attention_dim, the token count 1..the input's `tokens`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from latentrt.errors import InvalidRequest
from latentrt.families import ConditioningInput
from latentrt.tensors import Dim

from .backends.base import TORCH_DTYPES
from .condition_values import load_sequences
from .providers import FeedContext, register_provider


def _limits(inp: ConditioningInput, ctx: FeedContext) -> tuple[int | None, int | None]:
    """(most tokens, width) of the exported input (None where the context has no tensor)."""
    if ctx.tensor is None or len(ctx.tensor.shape) != 3:
        return None, None
    tokens, width = ctx.tensor.shape[1], ctx.tensor.shape[2]
    return (tokens.max if isinstance(tokens, Dim) else tokens if isinstance(tokens, int) else None,
            width if isinstance(width, int) else None)


def sequences(inp: ConditioningInput, key: str, ctx: FeedContext) -> np.ndarray:
    """conditioning[key] as float32 (slots, tokens, width), checked; InvalidRequest naming `key`."""
    value: Any = ctx.request.conditioning.get(key)
    slots = len(ctx.request.prompts)
    if isinstance(value, (str, os.PathLike)):  # a .npy file named on the CLI (the server takes numbers only)
        try:
            value = load_sequences(os.fspath(value))
        except ValueError as e:
            raise InvalidRequest(f"conditioning['{key}']: {e}") from None
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidRequest(f"conditioning['{key}'] must hold (tokens, width) sequences of numbers, one per prompt "
                             "slot") from None
    if array.ndim == 2 and not isinstance(value, (list, tuple)):  # one array for every slot
        array = array[None]
    if array.ndim == 3 and array.shape[0] == 1:  # one sequence for every slot
        array = np.broadcast_to(array, (slots, *array.shape[1:]))
    most, width = _limits(inp, ctx)
    if array.ndim != 3 or array.shape[0] != slots:
        raise InvalidRequest(f"conditioning['{key}'] must hold one (tokens, width) sequence per prompt slot ({slots}), "
                             f"got shape {tuple(array.shape)}")
    if width is not None and array.shape[2] != width:
        raise InvalidRequest(f"conditioning['{key}'] has tokens {array.shape[2]} wide; this model's cross-attention "
                             f"takes {width}")
    if not 1 <= array.shape[1] <= (most or array.shape[1]):
        raise InvalidRequest(f"conditioning['{key}'] has {array.shape[1]} tokens; this model takes 1 to {most}")
    if not np.isfinite(array).all():
        raise InvalidRequest(f"conditioning['{key}'] holds NaN or infinite values")
    return array


def check_token_sequence(inp: ConditioningInput, ctx: FeedContext) -> None:
    """The request gives the sequences and, with a CFG batch, unconditional ones of the same token count."""
    if inp.name not in ctx.request.conditioning:
        raise InvalidRequest(f"this model is conditioned on a token sequence: give conditioning['{inp.name}'] "
                             "(one (tokens, width) sequence per prompt slot)")
    positive = sequences(inp, inp.name, ctx)
    negative = f"negative_{inp.name}"
    if ctx.cfg and negative not in ctx.request.conditioning:
        raise InvalidRequest(f"guidance {ctx.request.guidance:g} > 1 runs classifier-free guidance, whose "
                             f"unconditional half needs conditioning['{negative}'] (the sequence the model was "
                             "trained with for 'no condition'), or guidance <= 1")
    if negative in ctx.request.conditioning and sequences(inp, negative, ctx).shape[1] != positive.shape[1]:
        raise InvalidRequest(f"conditioning['{negative}'] must have as many tokens as conditioning['{inp.name}'] "
                             f"({positive.shape[1]})")


def token_sequence_rows(inp: ConditioningInput, ctx: FeedContext) -> torch.Tensor:
    """encoder_hidden_states (rows, tokens, width): each slot's sequence repeated per image, unconditional first."""
    check_token_sequence(inp, ctx)
    dtype = TORCH_DTYPES[ctx.tensor.dtype if ctx.tensor is not None else inp.dtype]

    def rows(key: str) -> torch.Tensor:
        x = torch.from_numpy(np.array(sequences(inp, key, ctx)))  # a writable copy (broadcasts are read-only views)
        return x.repeat_interleave(ctx.request.num_images_per_prompt, dim=0).to(ctx.device, dtype)

    return ctx.rows(rows(inp.name), rows(f"negative_{inp.name}") if ctx.cfg else None)


register_provider("token_sequence", token_sequence_rows, check=check_token_sequence,
                  request_keys=("{name}", "negative_{name}"))
