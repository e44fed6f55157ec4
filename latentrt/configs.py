"""Checkpoint config values read from untrusted JSON, checked for type and range (shared by export and runtime)."""

from __future__ import annotations

import json
from typing import Any

from .errors import CheckpointError


def config_int(config: dict[str, Any], key: str, where: str, default: int | None = None, minimum: int = 1) -> int:
    """An integer config value >= `minimum`; CheckpointError naming the file and key otherwise."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CheckpointError(f"{where}: '{key}' must be an integer >= {minimum}, got {json.dumps(value)}")
    return value


def config_ints(config: dict[str, Any], key: str, where: str, default: list[int] | None = None) -> list[int]:
    """A non-empty list of positive integers from a config; CheckpointError otherwise."""
    value = config.get(key, default)
    if not isinstance(value, (list, tuple)) or not value or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise CheckpointError(f"{where}: '{key}' must be a non-empty list of positive integers, got "
                              f"{json.dumps(value)}")
    return list(value)


def check_scheduler_config(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The scheduler settings LatentRT reads, checked for type and range; CheckpointError naming the first bad one."""
    def bad(key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{where}: '{key}' must be {what}, got {json.dumps(config.get(key))[:80]}")

    config_int(config, "num_train_timesteps", where, 1000)
    config_int(config, "steps_offset", where, 0, minimum=0)
    for key in ("beta_start", "beta_end"):
        value = config.get(key, 0.001)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise bad(key, "a number in [0, 1)")
    for key in ("beta_schedule", "prediction_type", "timestep_spacing", "_class_name"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise bad(key, "a string")
    for key in ("use_karras_sigmas", "set_alpha_to_one", "clip_sample", "rescale_betas_zero_snr"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise bad(key, "true or false")
    return config
