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
    """A number or a non-empty list of numbers."""
    if isinstance(value, list):
        return bool(value) and all(is_number(v) for v in value)
    return is_number(value)
