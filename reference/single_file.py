"""Single-file checkpoints in the original (CompVis / Stability) key layout, as users download them.

A `.safetensors` file holding `model.diffusion_model.*`, `first_stage_model.*` and the text
encoder(s) is converted once by diffusers' own `from_single_file` into a diffusers folder in the
cache, content-addressed by the file's sha256 (and the config it was read with) and written
atomically; from there on it takes exactly the path of a diffusers folder (export, torch backend).
The architecture comes from `config`: a local diffusers folder of the same family (only its
configs and tokenizers are read; fully offline) or a hub id whose configs are fetched. Without
`config`, a previous conversion of the same file is reused, else the family's reference configs
are fetched from the hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentrt.errors import CheckpointError, UnknownFamily
from latentrt.families import FAMILIES, FamilyId, FamilySpec, TextTower, get_family
from latentrt.manifest import atomic_write_json, sha256_file, sha256_tree, staging_dir
from latentrt.paths import check_checkpoint

from .models import (
    CheckpointRef,
    LoadedModel,
    check_folder,
    detect_family,
    load_checkpoint,
    looks_like_hub_id,
    quiet_progress,
)
from .structure import CheckpointFacts, mismatches, nearest_mismatch
from .tiny import cache_root

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # refused: unpickling runs code
CONVERT_VERSION = 1  # bump when the conversion recipe changes: cached conversions are keyed by it
MARKER = "latentrt_single_file.json"  # written into each converted folder
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".msgpack", ".h5")
HUB_CONFIG_PATTERNS = ["*.json", "*/*.json", "*/*.txt"]
MAX_HEADER_BYTES = 100 * 2**20

UNET = "model.diffusion_model."
UNET_IN = UNET + "input_blocks.0.0.weight"
UNET_OUT = UNET + "out.2.weight"
UNET_CLASS_EMBEDDING = UNET + "label_emb.weight"  # nn.Embedding(num_classes, time_embed_dim): class labels
UNET_ADDITION = UNET + "label_emb.0.0.weight"  # SDXL's ADM: Linear(adm_in_channels, time_embed_dim)
# the key prefix of a file's last text tower -> what it says and the tower each diffusers text encoder is
TEXT_GROUPS: tuple[tuple[str, str, dict[str, TextTower]], ...] = (
    ("conditioner.embedders.1.model.", "SDXL base (CLIP-L + OpenCLIP bigG)",
     {"text_encoder": TextTower.CLIP_L, "text_encoder_2": TextTower.OPENCLIP_BIGG}),
    ("conditioner.embedders.0.model.", "SDXL refiner (OpenCLIP bigG)", {"text_encoder_2": TextTower.OPENCLIP_BIGG}),
    ("cond_stage_model.transformer.", "SD 1.x (CLIP-L)", {"text_encoder": TextTower.CLIP_L}),
    ("cond_stage_model.model.", "SD 2.x (OpenCLIP ViT-H)", {"text_encoder": TextTower.OPENCLIP_H}),
)
# where each diffusers text encoder sits in an original-layout file
TEXT_HOLDERS = {"text_encoder": ("cond_stage_model.", "conditioner.embedders.0.transformer."),
                "text_encoder_2": ("conditioner.embedders.1.model.", "conditioner.embedders.0.model.")}
VAE_PREFIXES = ("first_stage_model.", "vae.")
# look-alikes whose files carry the same keys and whose difference (eps / v, timestep spacing) matters: a
# config or --family must decide. SDXL-Turbo files also look like SDXL base; those default to SDXL.
AMBIGUOUS = {FamilyId.SD2, FamilyId.SD2_V, FamilyId.SD_TURBO}
DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
CONFIG_HINT = ("pass --config <diffusers folder> (a local diffusers pipeline folder of the same family; only its "
               "configs and tokenizers are read, its weights are not needed)")


@dataclass(frozen=True)
class SingleFile:
    """What the header of an original-layout safetensors file says (no tensor is read)."""

    path: Path
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape
    dtypes: frozenset[str]  # safetensors dtype names of the floating tensors ("F16", "F32", ...)

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.shapes)

    @property
    def unet_in_channels(self) -> int | None:
        shape = self.shapes.get(UNET_IN)
        return shape[1] if shape and len(shape) == 4 else None

    def facts(self, text_encoders: dict[str, TextTower] | None) -> CheckpointFacts:
        """The structural facts the tensor names and shapes tell (widths of the configs are not known here)."""
        out, labels, adm = (self.shapes.get(k) for k in (UNET_OUT, UNET_CLASS_EMBEDDING, UNET_ADDITION))
        return CheckpointFacts(
            text_encoders={c: t.value for c, t in text_encoders.items()} if text_encoders is not None else None,
            unet_in_channels=self.unet_in_channels, unet_out_channels=out[0] if out and len(out) == 4 else None,
            cross_attention=any(k.startswith(UNET) and ".attn2." in k for k in self.shapes),
            unet_config={"num_class_embeds": labels[0] if labels and len(labels) == 2 else None},
            unet_config_keys=frozenset({"num_class_embeds"}),  # label_emb: the original layout's class embedding
            addition_embed_type="text_time" if adm else None,  # the original layout's ADM is SDXL's
            addition_input_dim=adm[1] if adm and len(adm) == 2 else None)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype to convert in: the file's own when all its floats share one, else float32 (lossless)."""
        return DTYPES[next(iter(self.dtypes))] if len(self.dtypes) == 1 and self.dtypes <= DTYPES.keys() else torch.float32


# ---------------------------------------------------------------------------- the file


def is_single_file(model: str | Path) -> bool:
    """Whether `model` names a single-file checkpoint (an existing file, or a weights-file name)."""
    path = Path(str(model)).expanduser()
    if path.is_dir():
        return False
    return path.is_file() or path.suffix.lower() in SINGLE_FILE_SUFFIXES + PICKLE_SUFFIXES


def read_single_file(path: str | Path) -> SingleFile:
    """Validate a single-file checkpoint and read its tensor names and shapes from the safetensors header."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"single-file checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path} is a pickle checkpoint ({path.suffix}); LatentRT reads only .safetensors "
                              "(loading a pickle runs code): convert it to safetensors first")
    header = _header(path)
    shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    dtypes = frozenset(str(v["dtype"]) for k, v in header.items()
                       if k != "__metadata__" and str(v["dtype"]).startswith(("F", "BF")))
    if not any(k.startswith(UNET) for k in shapes):
        raise CheckpointError(f"{path} holds no '{UNET}*' tensors: not an original-layout Stable Diffusion "
                              "checkpoint (a diffusers component file, a LoRA or a VAE alone cannot be exported; "
                              "pass the diffusers folder instead)")
    return SingleFile(path, shapes, dtypes)


def _header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file; CheckpointError when the file is not one."""
    not_st = f"{path} is not a safetensors file"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{not_st} (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{not_st} (no valid header)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{not_st} (its header is not JSON)") from None
    valid = isinstance(header, dict) and all(
        k == "__metadata__" or isinstance(v, dict) and {"dtype", "shape"} <= v.keys() for k, v in header.items())
    if not valid:
        raise CheckpointError(f"{not_st} (unexpected header layout)")
    return header


def file_sha256(path: Path) -> str:
    """sha256 of a (large) file, remembered in the cache by path, size and mtime so it is computed once."""
    st = path.stat()
    index_path = cache_root() / "single-file" / "sha256-index.json"
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    entry = index.get(key) if isinstance(index, dict) else None
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    log.info("hashing %s (%.1f GB)", path, st.st_size / 1e9)
    digest = sha256_file(path)
    index = index if isinstance(index, dict) else {}
    index[key] = {"stamp": stamp, "sha256": digest}
    atomic_write_json(index_path, index)
    return digest


# ---------------------------------------------------------------------------- the family


@dataclass(frozen=True)
class FamilyChoice:
    """The family a file is converted as, and what its keys allow."""

    spec: FamilySpec
    what: str  # what the keys say, for messages
    fits: tuple[FamilyId | str, ...]  # the families the keys allow (empty: unknown text encoder)
    ambiguous: bool  # the keys alone chose among look-alikes: only a config may decide


def candidate_families(sf: SingleFile) -> tuple[str, tuple[FamilyId | str, ...]]:
    """What the file's keys say: a description and the registered families they fit (usual one first)."""
    in_ch = sf.unet_in_channels
    what, towers = next(((w, t) for prefix, w, t in TEXT_GROUPS if sf.has(prefix)), ("no known text encoder", {}))
    desc = f"{what}, UNet in_channels={in_ch}"
    facts = sf.facts(towers)
    fits = tuple(s.id for s in FAMILIES.values() if not mismatches(s, facts))  # registry order: the usual one first
    if fits or not towers:  # unknown text encoders: only --family / --config can tell
        return desc, fits
    raise UnknownFamily(f"{sf.path} holds {desc}: no supported family has that structure ({nearest_mismatch(facts)})")


def choose_family(sf: SingleFile, config: Path | None, family: str | None) -> FamilyChoice:
    """The family: --family, else the local config folder's, else the file's keys."""
    what, fits = candidate_families(sf)
    if family:
        spec, given = get_family(family), f"--family {family}"
    elif config is not None:
        spec = detect_family(config)
        given = f"--config {config} (a {spec.name} pipeline)"
    elif not fits:
        raise UnknownFamily(f"{sf.path}: cannot tell the family from the weights ({what}); pass --family and "
                            f"--config <diffusers folder>")
    else:
        spec, given = get_family(fits[0]), ""
    check_fits(sf, spec, what, fits, given)
    return FamilyChoice(spec, what, fits, ambiguous=not given and len(set(fits) & AMBIGUOUS) > 1)


def check_fits(sf: SingleFile, spec: FamilySpec, what: str, fits: tuple[FamilyId | str, ...], given: str) -> None:
    """CheckpointError when the chosen family is not one the file's keys allow."""
    if fits and spec.id not in fits:
        raise CheckpointError(f"{sf.path} holds {what}, which {given} does not fit; expected one of "
                              f"{', '.join(get_family(f).name for f in fits)}")


def ambiguity_error(sf: SingleFile, choice: FamilyChoice) -> UnknownFamily:
    names = ", ".join(get_family(f).name for f in choice.fits if f in AMBIGUOUS)
    return UnknownFamily(f"{sf.path} is {choice.what}: {names} cannot be told apart from the weights; "
                         f"{CONFIG_HINT}, or pass --family")


# ---------------------------------------------------------------------------- the config


def config_folder(config: str | Path | None, spec: FamilySpec) -> tuple[Path, str]:
    """A local diffusers folder holding the configs (fetched from the hub for a hub id or None) and its name."""
    if config is not None:
        path = Path(str(config)).expanduser()
        if path.is_dir():
            check_folder(path, spec.name)
            return path, str(path)
        if path.exists() or not looks_like_hub_id(str(config)):
            raise CheckpointError(f"--config {config} is not a diffusers folder; {CONFIG_HINT}")
        repo = str(config)
    elif spec.reference_repo is None:
        raise CheckpointError(f"family {spec.name} names no reference checkpoint to fetch configs from; "
                              f"{CONFIG_HINT}")
    else:
        repo = spec.reference_repo  # the family's reference diffusers configs on the Hugging Face hub
    return _fetch_configs(repo), repo


def _fetch_configs(repo: str) -> Path:
    """Download only the configs and tokenizer files of a hub pipeline."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=HUB_CONFIG_PATTERNS))
    except Exception as e:  # noqa: BLE001 - any hub failure (offline, 404, auth) has the same remedy
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        raise CheckpointError(f"cannot fetch the diffusers configs of {repo!r} from the Hugging Face hub "
                              f"({type(e).__name__}: {detail}); {CONFIG_HINT}") from None


def config_sha256(folder: Path) -> str:
    """Hash of the files the conversion reads from a config folder (all but weights)."""
    return sha256_tree(folder, include=lambda rel: rel.suffix not in WEIGHT_SUFFIXES)


# ---------------------------------------------------------------------------- conversion


def converted_folder(sha256: str, key: str) -> Path:
    """Where the conversion of a file (by content) with one config (by `key`) lives in the cache."""
    return cache_root() / "single-file" / f"{sha256[:16]}-{key[:12]}"


def previous_conversion(sha256: str, pipeline: str) -> Path | None:
    """The newest cached conversion of this file for this pipeline class, whatever config it used."""
    found = []
    for marker in (cache_root() / "single-file").glob(f"{sha256[:16]}-*/{MARKER}"):
        try:
            meta = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("sha256") == sha256 and meta.get("pipeline_class") == pipeline:
            found.append((marker.stat().st_mtime, marker.parent))
    return max(found)[1] if found else None


@dataclass(frozen=True)
class Conversion:
    """A single file converted into a cached diffusers folder."""

    folder: Path
    sha256: str  # of the single file
    choice: FamilyChoice


def convert_single_file(path: str | Path, *, config: str | Path | None = None,
                        family: str | None = None) -> Conversion:
    """Convert an original-layout file into a cached diffusers folder (or find the cached one)."""
    sf = read_single_file(path)
    local = Path(str(config)).expanduser() if config is not None else None
    if local is not None:
        check_checkpoint(local)  # its configs and tokenizers are read: no symlink out of it
    choice = choose_family(sf, local if local is not None and local.is_dir() else None, family)
    check_parts(sf, choice.spec)
    pipeline = choice.spec.pipeline_class
    sha256 = file_sha256(sf.path)
    if config is None and (done := previous_conversion(sha256, pipeline)) is not None:
        log.info("reusing the conversion of %s in %s", sf.path, done)
        return Conversion(done, sha256, choice)
    if config is None and choice.ambiguous:
        raise ambiguity_error(sf, choice)
    cfg, cfg_name = config_folder(config, choice.spec)
    key = hashlib.sha256(json.dumps([CONVERT_VERSION, pipeline, str(sf.torch_dtype),
                                     config_sha256(cfg)]).encode()).hexdigest()
    dest = converted_folder(sha256, key)
    if not ((dest / MARKER).is_file() and (dest / "model_index.json").is_file()):
        write_conversion(sf, sha256, cfg, cfg_name, pipeline, dest)
    return Conversion(dest, sha256, choice)


def write_conversion(sf: SingleFile, sha256: str, cfg: Path, cfg_name: str, pipeline: str, dest: Path) -> None:
    """Convert in a staging folder and move the finished diffusers folder (marker included) into place."""
    with staging_dir(dest) as tmp:
        _convert(sf, cfg, pipeline, tmp / "model")
        atomic_write_json(tmp / "model" / MARKER, {
            "source": str(sf.path.resolve()), "sha256": sha256, "pipeline_class": pipeline, "config": cfg_name,
            "dtype": str(sf.torch_dtype), "version": CONVERT_VERSION})
        try:
            os.replace(tmp / "model", dest)
        except OSError:  # another process finished first: keep its (identical) folder
            if not (dest / MARKER).is_file():
                raise
    log.info("converted %s (%s) into %s", sf.path, pipeline, dest)


def check_parts(sf: SingleFile, spec: FamilySpec) -> None:
    """CheckpointError naming the part (VAE, a text encoder) the file lacks; diffusers would not fill it in."""
    needed = {"vae": VAE_PREFIXES, **{te.component: TEXT_HOLDERS[te.component] for te in spec.text_encoders}}
    for part, prefixes in needed.items():
        if not any(sf.has(prefix) for prefix in prefixes):
            raise CheckpointError(f"{sf.path} has no {part} weights ({' or '.join(p + '*' for p in prefixes)}), "
                                  f"which {spec.name} needs; export the full pipeline's file or its diffusers folder")


def _convert(sf: SingleFile, cfg: Path, pipeline: str, out: Path) -> None:
    """diffusers `from_single_file` (offline: `config` is a local folder) and `save_pretrained` into `out`."""
    import diffusers

    cls = getattr(diffusers, pipeline)
    params = inspect.signature(cls.__init__).parameters
    extra: dict[str, Any] = {k: None for k in ("safety_checker", "feature_extractor", "image_encoder") if k in params}
    extra.update({k: False for k in ("requires_safety_checker", "add_watermarker") if k in params})
    log.info("converting %s with diffusers %s.from_single_file (config %s)", sf.path, pipeline, cfg)
    try:
        with quiet_progress(), quiet_diffusers():
            pipe = cls.from_single_file(str(sf.path), config=str(cfg), torch_dtype=sf.torch_dtype,
                                        local_files_only=True, **extra)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for a file that does not fit the config
        raise CheckpointError(f"cannot read {sf.path} as a {pipeline} with the configs of {cfg} ({_why(e)}); "
                              "check that --config is a pipeline of the same family and size") from None
    check_complete(pipe, sf.path)
    with quiet_progress():
        pipe.save_pretrained(str(out), safe_serialization=True)


def _why(e: Exception) -> str:
    """One line on a diffusers loading failure; a `meta` tensor error means weights were missing."""
    text = str(e).strip()
    if "meta tensor" in text:
        return "some weights are missing from the file: diffusers left them unfilled"
    return f"{type(e).__name__}: {text.splitlines()[0] if text else 'no detail'}"


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Keep diffusers' loader warnings (float32 casting notes, unused-key lists) out of the CLI output."""
    import diffusers.utils.logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def check_complete(pipe: Any, path: Path) -> None:
    """CheckpointError when a module kept weights diffusers never filled (left on the `meta` device)."""
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            empty = [n for n, p in [*module.named_parameters(), *module.named_buffers()] if p.is_meta]
            if empty:
                raise CheckpointError(f"{path} lacks {len(empty)} weights of {name} (e.g. {empty[0]}); the file is "
                                      "incomplete or does not match the config")


# ---------------------------------------------------------------------------- entry points


def locate_single_file(path: str | Path, *, config: str | Path | None = None,
                       family: str | None = None) -> CheckpointRef:
    """Convert (or reuse the cached conversion of) a single file; the ref names the file and its sha256.

    Without `family`, the family is the converted folder's (its config decides SD 2 eps / v / Turbo).
    """
    done = convert_single_file(path, config=config, family=family)
    spec = check_folder(done.folder, family)
    check_fits(read_single_file(path), spec, done.choice.what, done.choice.fits,
               f"the config {done.folder} (a {spec.name} pipeline)")
    return CheckpointRef(folder=done.folder, source=str(Path(path).expanduser().resolve()), spec=spec,
                         sha256=done.sha256)


def load_single_file(path: str | Path, *, config: str | Path | None = None,
                     family: str | None = None) -> LoadedModel:
    """Load an original-layout `.safetensors` checkpoint as a `LoadedModel` (see `locate_single_file`).

    Args:
        path: the single file.
        config: a local diffusers folder of the same family (offline) or a hub id; None reuses an earlier
            conversion of the same file or fetches the family's reference configs from the hub.
        family: the family id, when the weights and the config do not tell (SD 2 eps / v / Turbo, SDXL-Turbo).
    """
    return load_checkpoint(locate_single_file(path, config=config, family=family))
