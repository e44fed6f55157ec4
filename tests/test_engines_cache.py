"""Engine cache keys and stale-engine detection."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from latentrt.cache_keys import cache_key, check_engine, digest, key_fields
from latentrt.errors import StaleArtifact

BASE: dict[str, Any] = {
    "onnx_sha256": "a" * 64,
    "precision": "fp16",
    "profiles": [{"name": "all", "bounds": {"batch": [1, 1, 4], "latent_height": [64, 128, 256]}}],
    "builder_flags": {"fp16": True, "optimization_level": 3, "refittable": False},
    "trt_version": "10.13.0.35",
    "compute_capability": "8.9",
}

CHANGES = [
    ("onnx_sha256", "b" * 64),
    ("precision", "fp32"),
    ("profiles", [{"name": "all", "bounds": {"batch": [1, 1, 8], "latent_height": [64, 128, 256]}}]),
    ("profiles", [{"name": "all", "bounds": {"batch": [1, 2, 4], "latent_height": [64, 128, 256]}}]),
    ("builder_flags", {"fp16": True, "optimization_level": 5, "refittable": False}),
    ("builder_flags", {"fp16": True, "optimization_level": 3, "refittable": True}),
    ("trt_version", "10.14.1"),
    ("compute_capability", "9.0"),
]


def test_same_inputs_same_key_regardless_of_key_order_and_tuples() -> None:
    a = cache_key(**BASE)
    reordered = dict(BASE, builder_flags={"refittable": False, "optimization_level": 3, "fp16": True},
                     profiles=[{"bounds": {"latent_height": (64, 128, 256), "batch": (1, 1, 4)}, "name": "all"}])
    assert cache_key(**reordered) == a
    assert len(a) == 64 and int(a, 16) >= 0


def test_key_is_sha256_of_canonical_json() -> None:
    fields = key_fields(**BASE)
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    assert cache_key(**BASE) == hashlib.sha256(text.encode()).hexdigest() == digest(fields)


@pytest.mark.parametrize("field, value", CHANGES)
def test_any_change_gives_a_different_key(field: str, value: object) -> None:
    assert cache_key(**dict(BASE, **{field: value})) != cache_key(**BASE)


def entry() -> dict:
    fields = key_fields(**BASE)
    return {"path": "unet/engine.plan", "key": fields, "cache_key": digest(fields)}


def test_check_engine_accepts_a_matching_entry() -> None:
    check_engine(entry(), {"trt_version": "10.13.0.35", "compute_capability": "8.9", "cache_key": cache_key(**BASE)})


def test_check_engine_names_what_differs() -> None:
    with pytest.raises(StaleArtifact) as e:
        check_engine(entry(), {"trt_version": "10.14.1", "compute_capability": "9.0"})
    text = str(e.value)
    assert "unet/engine.plan" in text
    assert "trt_version: engine has '10.13.0.35', expected '10.14.1'" in text
    assert "compute_capability: engine has '8.9', expected '9.0'" in text
    assert "--overwrite" in text


def test_check_engine_detects_an_edited_manifest() -> None:
    e = entry()
    e["key"]["precision"] = "fp32"  # settings edited after the build: the digest no longer matches
    with pytest.raises(StaleArtifact, match="does not match the recorded build settings"):
        check_engine(e, {})


def test_check_engine_rejects_entries_without_key() -> None:
    with pytest.raises(StaleArtifact, match="no cache key"):
        check_engine({"path": "unet/engine.plan"}, {})
