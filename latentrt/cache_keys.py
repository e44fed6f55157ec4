"""Engine cache keys and stale-engine detection (pure Python).

An engine is identified by everything that changes its bytes or its validity: the ONNX file's
hash, the precision, the optimization profiles, the builder flags, the TensorRT version and the
GPU's compute capability. The key is the sha256 of a canonical JSON of those fields; the engine
manifest stores both the fields (`key`) and the digest (`cache_key`), so a loader can say exactly
what differs instead of silently using a mismatched plan. The builder computes keys, the runtime checks
them (`check_engine`): this is the contract between the two stages.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import StaleArtifact

KEY_SCHEMA = 1


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys, no whitespace, tuples as lists: equal inputs give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def key_fields(onnx_sha256: str, precision: str, profiles: Sequence[Any], builder_flags: Mapping[str, Any],
               trt_version: str | None, compute_capability: str | None) -> dict[str, Any]:
    """The fields an engine's cache key is computed from, as JSON-ready data."""
    return json.loads(canonical_json({
        "schema": KEY_SCHEMA,
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "profiles": list(profiles),
        "builder_flags": dict(builder_flags),
        "trt_version": trt_version,
        "compute_capability": compute_capability,
    }))


def digest(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(dict(fields)).encode()).hexdigest()


def cache_key(onnx_sha256: str, precision: str, profiles: Sequence[Any], builder_flags: Mapping[str, Any],
              trt_version: str | None, compute_capability: str | None) -> str:
    """sha256 of the canonical JSON of everything that determines an engine."""
    return digest(key_fields(onnx_sha256, precision, profiles, builder_flags, trt_version, compute_capability))


def check_engine(manifest_entry: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raise StaleArtifact when a manifest entry does not match what this process expects.

    `manifest_entry` is an engine manifest component entry holding `key` (the fields) and
    `cache_key`; `expected` maps key fields (e.g. `trt_version`, `compute_capability`,
    `onnx_sha256`) or `cache_key` itself to the values required here.
    """
    name = manifest_entry.get("path", "engine")
    fields = manifest_entry.get("key")
    stored = manifest_entry.get("cache_key")
    if not isinstance(fields, Mapping) or not isinstance(stored, str):
        raise StaleArtifact(f"{name}: the engine manifest entry has no cache key; rebuild with `latentrt build`")
    problems = []
    if digest(fields) != stored:
        problems.append("the recorded cache key does not match the recorded build settings (edited manifest?)")
    for field, want in expected.items():
        have = stored if field == "cache_key" else fields.get(field)
        if _canon(have) != _canon(want):
            problems.append(f"{field}: engine has {_short(have)}, expected {_short(want)}")
    if problems:
        raise StaleArtifact(f"{name} is stale or was built for another setup: " + "; ".join(problems)
                            + ". Rebuild it with `latentrt build ... --overwrite`")


def _canon(value: Any) -> str:
    return canonical_json(value)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else canonical_json(value)
    return repr(text[:16] + "..." if len(text) > 40 else text)
