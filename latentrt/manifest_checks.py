"""Stage manifests are checked, not trusted: JSON types, family, components, IO descriptions and paths.

`check_manifest` runs on every read of an ONNX-export or engine manifest (`read_manifest`). It
refuses, with one `StaleArtifact` line (or `UnsafePath` for a path out of the folder):
  * wrong JSON types anywhere LatentRT reads (never an AttributeError later);
  * an unknown family, or components the family does not have;
  * component paths that are not `<component>/<file>` inside the folder, support files the family
    does not have;
  * IO descriptions that are malformed or that differ from the IO the family derives from the
    recorded model widths (`latentrt.tensors.component_ios`), and widths that do not fit the family
    (e.g. a family edited from sd1 to sdxl or sd1-inpaint);
  * a manifest whose `seal` no longer matches: LatentRT seals what a folder is (family, model
    widths, component paths and IO) when it writes the manifest, so a hand edit of any of them (sd1
    edited to sd2) is caught. The seal detects edits, it does not authenticate the writer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from .choices import Device, values
from .errors import StaleArtifact, UnknownFamily
from .families import FamilySpec, get_family
from .manifest import MANIFEST, ONNX_KIND
from .names import ENCODER_HIDDEN_STATES_KEYWORD, TEXT_EMBEDS, TIME_IDS
from .paths import inside, relative_path
from .step_cache import SHALLOW, expected_ios, spec_from_manifest
from .tensors import DTYPES, ComponentIO, Dim, ModelDims, Scaled, component_ios, dims_value, io_from_json
from .tiny_vae import TINY_VAE_DECODER
from .tiny_vae import expected_ios as tiny_vae_ios
from .tiny_vae import spec_from_manifest as tiny_vae_spec

SEAL = "seal"
# JSON types of the engine-entry fields the runtime reads (when present)
ENTRY_TYPES: dict[str, type] = {"precision": str, "profiles": list, "key": dict, "cache_key": str, "ort": dict,
                                "size_bytes": int}
_TYPE_NAMES = {str: "string", list: "list", dict: "JSON object", int: "integer"}
ORT_LEVELS = ("disable", "basic", "extended", "all")
INT_DIMS = tuple(f.name for f in fields(ModelDims)
                 if f.name not in ("text_hidden", "unet_config", "extra", "text_vocab"))  # the integer widths


def seal_of(manifest: Mapping[str, Any]) -> str:
    """sha256 of what a manifest says its folder is: family, model widths, each component's path and IO."""
    components = manifest.get("components") or {}
    body = {"family": manifest.get("family"), "dims": (manifest.get("model") or {}).get("dims"),
            "components": {c: {"path": e.get("path"), "io": e.get("io")} for c, e in components.items()}}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest with its `seal` (see `seal_of`), ready to be written."""
    return {**manifest, SEAL: seal_of(manifest)}


class _Check:
    """Raises StaleArtifact naming the manifest and the stage to re-run."""

    def __init__(self, folder: Path, kind: str):
        self.where = folder / MANIFEST
        self.stage = "export" if kind == ONNX_KIND else "build"

    def fail(self, problem: str) -> StaleArtifact:
        return StaleArtifact(f"{self.where}: {problem}; re-run `latentrt {self.stage}`")

    def require(self, ok: bool, problem: str) -> None:
        if not ok:
            raise self.fail(problem)


def check_manifest(folder: Path, data: Mapping[str, Any]) -> None:
    """Check an ONNX-export or engine manifest read from `folder` (see the module docstring)."""
    check = _Check(folder, str(data.get("kind")))
    spec = _family(check, data.get("family"))
    for key in ("model", "source", "files", "tools"):
        check.require(data.get(key) is None or isinstance(data[key], dict),
                      f"'{key}' should be a JSON object, found {type(data.get(key)).__name__}")
    check.require(data.get("backend") is None or isinstance(data["backend"], str), "'backend' should be a string")
    components = data.get("components")
    if not isinstance(components, dict) or not components:
        raise check.fail(f"'components' should be a non-empty JSON object, found {type(components).__name__}")
    step_cache = spec_from_manifest(data)  # an export with step caching adds unet_shallow (latentrt.step_cache)
    tiny_vae = tiny_vae_spec(data)  # an export with --tiny-vae adds tiny_vae_decoder (latentrt.tiny_vae)
    known = [*spec.components, *([SHALLOW] if step_cache is not None else []),
             *([TINY_VAE_DECODER] if tiny_vae is not None else [])]
    unknown = [c for c in components if c not in known]
    check.require(not unknown, f"lists component(s) {', '.join(map(repr, unknown))}, which family {spec.name} "
                               f"does not have (it has {', '.join(known)})")
    _files(check, folder, spec, data.get("files") or {})
    dims = _dims(check, spec, (data.get("model") or {}).get("dims"))
    expected = tiny_vae_ios(expected_ios(component_ios(spec, dims), step_cache), tiny_vae) if dims is not None else {}
    for name, entry in components.items():
        _component(check, folder, name, entry, expected.get(name), spec)
    written = data.get("written")
    if written is not None:
        check.require(isinstance(written, list) and all(isinstance(w, str) for w in written),
                      "'written' should be a list of relative paths")
        for w in written:
            relative_path(w, f"{check.where} written")
    seal = data.get(SEAL)
    if seal is not None:
        check.require(seal == seal_of(data), "its family, model widths, component paths or IO descriptions differ "
                                             "from what LatentRT wrote (the manifest was edited)")


def _family(check: _Check, family: Any) -> FamilySpec:
    check.require(isinstance(family, str), f"'family' should be a family id string, found {type(family).__name__}")
    try:
        return get_family(family)
    except UnknownFamily as e:
        raise check.fail(str(e)) from None


def _files(check: _Check, folder: Path, spec: FamilySpec, files: Mapping[str, Any]) -> None:
    known = [te.tokenizer for te in spec.text_encoders] + ["scheduler"]
    known += [spec.image_encoder.processor] if spec.image_encoder is not None else []  # issue 12 (H4)
    for rel, digest in files.items():
        inside(folder, rel, f"{check.where} files")
        check.require(rel in known, f"lists support file {rel!r}; family {spec.name} has {', '.join(known)}")
        check.require(isinstance(digest, str), f"files[{rel!r}] should be a sha256 string")


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _dims(check: _Check, spec: FamilySpec, raw: Any) -> ModelDims | None:
    """The recorded model widths, checked against the family; None when the manifest records none."""
    if raw is None:
        return None
    check.require(isinstance(raw, dict), "'model.dims' should be a JSON object")
    hidden = raw.get("text_hidden")
    check.require(isinstance(hidden, list) and all(_is_int(h, 1) for h in hidden),
                  "'model.dims.text_hidden' should be a list of positive integers")
    for key in INT_DIMS:
        check.require(key not in raw or _is_int(raw[key]), f"'model.dims.{key}' should be a non-negative integer")
    check.require(isinstance(raw.get("extra", {}), dict), "'model.dims.extra' should be a JSON object")
    vocab = raw.get("text_vocab", [])  # issue 12 (H2): token id bounds (LDM-BERT); absent in older manifests
    check.require(isinstance(vocab, list) and all(_is_int(v) for v in vocab),
                  "'model.dims.text_vocab' should be a list of non-negative integers")
    unet = raw.get("unet_config", {})
    check.require(isinstance(unet, dict) and all(isinstance(k, str) and _is_int(v) for k, v in unet.items()),
                  "'model.dims.unet_config' should map UNet config keys to non-negative integers")
    try:
        dims = ModelDims(text_hidden=tuple(hidden), **{k: raw[k] for k in INT_DIMS if k in raw},
                         unet_config=dict(unet), extra=dict(raw.get("extra", {})), text_vocab=tuple(vocab))
    except TypeError as e:
        raise check.fail(f"'model.dims' is incomplete ({e})") from None
    problems = structure_problems(spec, dims)
    check.require(not problems, f"family {spec.name} does not fit the model it describes ({'; '.join(problems)}; "
                                "family edited?)")
    return dims


def structure_problems(spec: FamilySpec, dims: ModelDims) -> list[str]:
    """How recorded model widths contradict the family's structure ('unet in_channels 4 != 9'); empty if they fit."""
    denoiser = spec.denoiser
    time_ids = denoiser.conditioning_input(TIME_IDS)
    declared = {key for c in denoiser.conditioning for key in c.config_keys}  # the "unet:<key>" widths and bounds
    return [f"{what} {have} != {want}" for what, have, want in (
        ("text encoders", len(dims.text_hidden), len(spec.text_encoders)),
        ("unet in_channels", dims.unet_in_channels, denoiser.in_channels(dims.latent_channels)),
        ("time ids", dims.time_ids, dims_value(time_ids.width, dims) if time_ids is not None else 0),
        ("pooled projection", dims.pooled_dim > 0, denoiser.takes(TEXT_EMBEDS)),
        ("cross-attention context", dims.context_dim > 0,
         denoiser.keyword_input(ENCODER_HIDDEN_STATES_KEYWORD) is not None)) if have != want] + [
        f"unet has no {key}, which input {c.name} reads" for c in denoiser.conditioning if not c.optional
        for key in c.config_keys if not dims.unet_value(key)] + [
        f"unet {key} {value}, which no declared input reads" for key, value in dims.unet_config.items()
        if key not in declared]


def _component(check: _Check, folder: Path, name: str, entry: Any, expected: ComponentIO | None,
               spec: FamilySpec) -> None:
    check.require(isinstance(entry, dict), f"component {name!r} should be a JSON object")
    path = entry.get("path")
    inside(folder, path, f"{check.where} component {name!r} path")
    check.require(relative_path(path, name).parts[0] == name and len(relative_path(path, name).parts) > 1,
                  f"component {name!r} path {path!r} is not inside its folder {name}/")
    check.require(isinstance(entry.get("sha256"), str), f"component {name!r} has no sha256 string")
    for key, kind in ENTRY_TYPES.items():
        check.require(entry.get(key) is None or isinstance(entry[key], kind),
                      f"component {name!r}: '{key}' should be a {_TYPE_NAMES[kind]}, found {type(entry.get(key)).__name__}")
    _ort(check, name, entry.get("ort") or {})
    io = _io(check, name, entry.get("io"))
    if expected is not None and signature(io) != signature(expected):
        raise check.fail(f"component {name!r} IO {_describe(io)} differs from family {spec.name}'s "
                         f"{_describe(expected)} for the recorded model widths (family or IO edited?)")


def _ort(check: _Check, name: str, ort: Mapping[str, Any]) -> None:
    """The ONNX Runtime session settings an engine entry records (read when its session is created)."""
    threads = ort.get("threads") or {}
    check.require(isinstance(threads, dict) and all(threads.get(k) is None or _is_int(threads[k])
                                                    for k in ("intra_op", "inter_op")),
                  f"component {name!r}: 'ort.threads' intra_op / inter_op should be integers")
    level = ort.get("session_graph_optimization_level")
    check.require(level is None or level in ORT_LEVELS,
                  f"component {name!r}: 'ort.session_graph_optimization_level' should be one of {', '.join(ORT_LEVELS)}")
    providers = ort.get("providers")
    check.require(providers is None or isinstance(providers, list) and all(_provider_ok(p) for p in providers),
                  f"component {name!r}: 'ort.providers' should list provider names (or [name, options] pairs)")
    check.require(ort.get("device") is None or ort["device"] in values(Device),
                  f"component {name!r}: 'ort.device' should be one of {', '.join(values(Device))}")


def _provider_ok(provider: Any) -> bool:
    if isinstance(provider, str):
        return True
    return isinstance(provider, list) and len(provider) == 2 and isinstance(provider[0], str) \
        and isinstance(provider[1], dict)


def _io(check: _Check, name: str, raw: Any) -> ComponentIO:
    """Parse an IO description after checking every JSON type `io_from_json` relies on."""
    bad = f"component {name!r} has a malformed IO description"
    check.require(isinstance(raw, dict) and raw.get("component") == name, f"{bad} (its 'component' is not {name!r})")
    for side in ("inputs", "outputs"):
        tensors = raw.get(side)
        if not isinstance(tensors, list) or not tensors:
            raise check.fail(f"{bad} ('{side}' should be a non-empty list)")
        names = [t.get("name") if isinstance(t, dict) else None for t in tensors]
        check.require(all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names),
                      f"{bad} ({side} need distinct string names)")
        for t in tensors:
            check.require(t.get("dtype") in DTYPES, f"{bad} ({t['name']}: dtype {t.get('dtype')!r} is not one of "
                                                   f"{', '.join(DTYPES)})")
            check.require(t.get("high") is None or _is_int(t["high"], 1),
                          f"{bad} ({t['name']}: 'high' should be a positive integer)")
            shape = t.get("shape")
            check.require(isinstance(shape, list) and all(_axis_ok(a) for a in shape),
                          f"{bad} ({t['name']}: shape should list sizes or dims with integer min <= opt <= max)")
    return io_from_json(raw)


def _axis_ok(axis: Any) -> bool:
    if _is_int(axis, 1):
        return True
    if not isinstance(axis, dict) or not isinstance(axis.get("name"), str):
        return False
    if "base" in axis:
        return _is_int(axis.get("factor"), 1) and "base" not in axis["base"] and _axis_ok(axis["base"])
    lo, opt, hi = axis.get("min"), axis.get("opt"), axis.get("max")
    return _is_int(lo) and _is_int(opt) and _is_int(hi) and lo <= opt <= hi  # type: ignore[operator]


def _axis_signature(axis: Any) -> Any:
    if isinstance(axis, Scaled):
        return (axis.name, axis.base.name, axis.factor)
    return axis.name if isinstance(axis, Dim) else axis


def signature(io: ComponentIO) -> tuple[Any, ...]:
    """Names, dtypes, axes (sizes or dim names; not ranges, which builds narrow) and integer bounds of its tensors."""
    return tuple(tuple((t.name, t.dtype, tuple(_axis_signature(a) for a in t.shape), t.high) for t in side)
                 for side in (io.inputs, io.outputs))


def _describe(io: ComponentIO) -> str:
    def one(t: Any) -> str:
        return f"{t.name}[{','.join(str(_axis_signature(a) if not isinstance(a, Scaled) else a.name) for a in t.shape)}]"

    return f"({', '.join(map(one, io.inputs))}) -> ({', '.join(map(one, io.outputs))})"
