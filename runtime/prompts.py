"""Prompt text -> token windows: long prompts in 75-token windows, and the opt-in `(word:1.3)` weighting syntax.

Long prompts follow the popular UIs (AUTOMATIC1111's web UI, ComfyUI): the prompt's tokens are cut
into windows of `model_max_length - 2` (75) tokens, each window is wrapped in BOS ... EOS and padded
to 77 with the tokenizer's pad token, each window is encoded on its own, and the hidden states are
concatenated along the sequence (77 * windows tokens of context). Windows are cut every 75 tokens
(as ComfyUI does; A1111 moves a cut back to a nearby comma).

The weighting syntax is A1111's "attention" syntax: `(text)` multiplies the weight of its tokens
by 1.1, `[text]` divides it by 1.1, `(text:1.5)` multiplies it by 1.5, brackets nest (weights
multiply), `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal characters, unmatched closing brackets
are literal text and brackets left open apply to the end of the prompt. Unlike A1111, a backslash
before any other character is kept as a literal backslash (A1111 drops it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

ROUND_FACTOR = 1.1  # (text)
SQUARE_FACTOR = 1 / 1.1  # [text]
_WEIGHT = re.compile(r":\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)")  # ":1.3)" closing a "(text:1.3)"
_ESCAPABLE = "()[]\\"


def parse_weights(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs of a prompt in A1111's attention syntax; neighbouring runs of equal weight are merged."""
    runs: list[list[Any]] = []  # [text, weight], one per literal character until merged
    rounds: list[int] = []  # run index at which each open "(" starts
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    i = 0
    while i < len(text):
        c = text[i]
        weight = _WEIGHT.match(text, i) if c == ":" and rounds else None
        if c == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPABLE:
            runs.append([text[i + 1], 1.0])
            i += 2
            continue
        if weight is not None:
            scale(rounds.pop(), float(weight.group(1)))
            i = weight.end()
            continue
        if c == "(":
            rounds.append(len(runs))
        elif c == "[":
            squares.append(len(runs))
        elif c == ")" and rounds:
            scale(rounds.pop(), ROUND_FACTOR)
        elif c == "]" and squares:
            scale(squares.pop(), SQUARE_FACTOR)
        else:
            runs.append([c, 1.0])
        i += 1
    for start in rounds:
        scale(start, ROUND_FACTOR)
    for start in squares:
        scale(start, SQUARE_FACTOR)
    return _merge(runs)


def _merge(runs: list[list[Any]]) -> list[tuple[str, float]]:
    merged: list[tuple[str, float]] = []
    for text, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, float(weight)))
    return merged or [("", 1.0)]


@dataclass(frozen=True)
class PromptTokens:
    """A prompt's token ids without BOS/EOS, and the weight of each (all 1.0 unless weighted)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]

    def windows(self, size: int) -> int:
        """How many windows of `size` tokens the prompt fills (an empty prompt still takes one)."""
        return max(1, math.ceil(len(self.ids) / size))


def prompt_tokens(tokenizer: Any, text: str, weighting: bool = False) -> PromptTokens:
    """Token ids of a prompt (without BOS/EOS); with `weighting`, each weighted run is tokenized on its own."""
    runs = parse_weights(text) if weighting else [(text, 1.0)]
    pieces = tokenizer([t for t, _ in runs], add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    ids = tuple(i for piece in pieces for i in piece)
    weights = tuple(w for piece, (_, w) in zip(pieces, runs) for _ in piece)
    return PromptTokens(ids, weights)


def window_length(tokenizer: Any) -> int:
    """Tokens per window including BOS and EOS (the text encoder's 77)."""
    return int(tokenizer.model_max_length)


def window_ends(tokenizer: Any) -> tuple[int, int]:
    """The ids that open and close a window: CLIP's BOS / EOS, BERT's [CLS] / [SEP] (LDM-BERT, which has no BOS)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return int(bos), int(eos)


def to_windows(tokenizer: Any, tokens: PromptTokens, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 77) int64 ids and float32 weights: 75-token windows, each BOS ... EOS, padded with the pad token.

    Windows past the prompt's own are empty (BOS, EOS, padding): they pad a batch to one window count.
    """
    length = window_length(tokenizer)
    size = length - 2
    assert tokens.windows(size) <= count, "fewer windows than the prompt needs"
    ids = torch.full((count, length), int(tokenizer.pad_token_id), dtype=torch.int64)
    weights = torch.ones((count, length), dtype=torch.float32)
    bos, eos = window_ends(tokenizer)
    for w in range(count):
        chunk = tokens.ids[w * size:(w + 1) * size]
        ids[w, 0] = bos
        ids[w, 1:len(chunk) + 1] = torch.tensor(chunk, dtype=torch.int64)
        ids[w, len(chunk) + 1] = eos
        weights[w, 1:len(chunk) + 1] = torch.tensor(tokens.weights[w * size:(w + 1) * size], dtype=torch.float32)
    return ids, weights


def batch_windows(tokenizer: Any, prompts: Sequence[PromptTokens], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B * count, 77) ids and weights for B prompts, prompt-major (the windows of prompt 0, then of prompt 1, ...)."""
    parts = [to_windows(tokenizer, t, count) for t in prompts]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def emphasize(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: scale each token's hidden state by its weight, then restore each window's mean.

    hidden (W, 77, C) and weights (W, 77) for W windows. A1111 takes the mean over a whole chunk
    batch; here it is per window, so a prompt's conditioning does not depend on its batch.
    """
    if bool((weights == 1).all()):
        return hidden
    mean = hidden.mean(dim=(1, 2), keepdim=True)
    scaled = hidden * weights.to(hidden)[..., None]
    return scaled * (mean / scaled.mean(dim=(1, 2), keepdim=True))
