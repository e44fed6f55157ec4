"""Conditioning values as the CLI (`--condition`) and the server (`"conditioning"`) accept them.

A value is a number or a non-empty list of numbers (one per prompt slot); which names a model takes
and what it makes of the values is for its providers to say (latentrt.runtime.providers).
"""

from __future__ import annotations

import math
from typing import Any

INT64 = 2**63


def is_number(value: Any) -> bool:
    """A finite float or an int that fits in 64 bits (JSON true/false are not numbers)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -INT64 <= value < INT64
    return isinstance(value, float) and math.isfinite(value)


def is_condition_value(value: Any) -> bool:
    """A number, a non-empty list of numbers, or a non-empty list of sequences (`is_sequence_list`)."""
    if isinstance(value, list):
        return bool(value) and (all(is_number(v) for v in value) or is_sequence_list(value))
    return is_number(value)


# issue 12 (H2): token sequences (latentrt.runtime.token_sequence), one (tokens, width) matrix per prompt slot
def is_sequence_list(value: Any) -> bool:
    """A non-empty list of non-empty (tokens, width) matrices of numbers, as nested lists."""
    def matrix(m: Any) -> bool:
        return isinstance(m, list) and bool(m) and all(
            isinstance(row, list) and bool(row) and all(is_number(v) for v in row) for row in m)

    return isinstance(value, list) and bool(value) and all(matrix(m) for m in value)


def load_sequences(path: str) -> list[Any]:
    """A `.npy` file of one (tokens, width) sequence or (slots, tokens, width) as nested lists (one per slot).

    ValueError naming the file when it cannot be read (pickled objects are refused) or has another rank.
    """
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read {path} as a .npy array ({type(e).__name__})") from None
    if array.ndim not in (2, 3) or not np.issubdtype(array.dtype, np.number) or not array.size:
        raise ValueError(f"{path} holds a {array.dtype} array of shape {array.shape}; give (tokens, width) or "
                         "(slots, tokens, width) numbers")
    return (array[None] if array.ndim == 2 else array).astype(float).tolist()
