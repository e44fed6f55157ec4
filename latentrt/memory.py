"""Memory a generate call will need, estimated before it is spent, and the memory this machine has.

The estimate counts what dominates a Stable Diffusion step (measured on ONNX Runtime CPU, see
tests/test_hardening_cli.py): the UNet's highest-resolution self-attention, whose scores and
softmax are (rows, heads, N, N) for N latent tokens, and the VAE decoder, whose mid-block attention
is (N, N) per image and whose last block holds full-resolution feature maps. Weights are already
resident when a request arrives, so they are not counted again. The estimate is meant to refuse
requests that cannot fit, not to predict usage to the byte: on tiny sd1 (ONNX Runtime CPU, 512-768
px, batch 1-2, with and without CFG) it was within -6%..+28% of the measured peak RSS increase.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import TooLarge
from .families import FamilySpec, ReferenceWidths, get_family

GIB = 1 << 30


Architecture = ReferenceWidths  # the few widths the estimate needs (the manifest's, else the family's reference)


def architecture(spec: FamilySpec | str, extra: Mapping[str, Any] | None) -> Architecture:
    """The widths recorded at export (`dims.extra`), else the family's reference ones (`spec.reference_widths`)."""
    ref = (get_family(spec) if isinstance(spec, str) else spec).reference_widths
    extra = extra or {}
    attention = extra.get("unet_attention")
    values = {
        "attention_factor": attention[0] if isinstance(attention, list) and len(attention) == 2 else None,
        "attention_heads": attention[1] if isinstance(attention, list) and len(attention) == 2 else None,
        "unet_channels": extra.get("unet_channels"), "vae_channels": extra.get("vae_channels"),
    }
    def pick(key: str) -> int:
        v = values[key]
        return v if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 16 else getattr(ref, key)

    return Architecture(pick("attention_factor"), pick("attention_heads"), pick("unet_channels"), pick("vae_channels"))


def estimate_bytes(arch: Architecture, *, unet_rows: int, decode_batch: int, latent_height: int, latent_width: int,
                   bytes_per_value: int = 4, fused_attention: bool = False) -> dict[str, int]:
    """Peak activation bytes of the UNet step and the VAE decode (they run one after the other)."""
    tokens = latent_height * latent_width
    attn_tokens = (latent_height // arch.attention_factor) * (latent_width // arch.attention_factor)
    scores = 0 if fused_attention else 2 * unet_rows * arch.attention_heads * attn_tokens ** 2  # scores + softmax
    unet_maps = 12 * unet_rows * arch.unet_channels * tokens  # skip connections and block temporaries
    vae_attention = 0 if fused_attention else 3 * decode_batch * tokens ** 2  # scores, scaled, softmax
    vae_maps = 4 * decode_batch * arch.vae_channels * tokens * 64  # full-resolution maps: 8x8 px per latent
    return {"unet": (scores + unet_maps) * bytes_per_value, "vae_decoder": (vae_attention + vae_maps) * bytes_per_value}


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes left under a cgroup v2 (memory.max) or v1 (memory.limit_in_bytes) limit; None without a limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            return max(0, limit - usage)
    return None


def available_bytes(device: str = "cpu") -> int | None:
    """Memory free for a new request: host RAM (MemAvailable, capped by a cgroup limit) or a CUDA device's free
    memory. `LATENTRT_MEMORY_BUDGET_MB` caps it (e.g. to leave room for other programs). None: unknown."""
    found: list[int] = []
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            found.append(int(torch.cuda.mem_get_info(torch.device(device))[0]))
    else:
        found += [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    budget = os.environ.get("LATENTRT_MEMORY_BUDGET_MB", "").strip()
    if budget.isdigit():
        found.append(int(budget) << 20)
    return min(found) if found else None


def format_bytes(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.0f} MiB"


def check_fits(need: Mapping[str, int], available: int | None, what: str,
               largest: Callable[[], str | None] | None = None) -> None:
    """TooLarge when the peak of `need` exceeds `available`, with the estimate and (if any) a size that fits."""
    peak = max(need.values(), default=0)
    if available is None or peak <= available:
        return
    stage = max(need, key=lambda k: need[k])
    hint = largest() if largest is not None else None
    raise TooLarge(f"{what} needs about {format_bytes(peak)} of memory ({stage}) but {format_bytes(available)} is "
                   f"available: {'try ' + hint if hint else 'use a smaller size or batch'}")
