"""Load every engine of one model from a folder, whatever produced it, behind one `EngineSet`.

Accepted folders: built engines (`latentrt.engines` manifest: TensorRT plans or ONNX Runtime models),
an ONNX export (`latentrt.onnx` manifest, run directly on ONNX Runtime), or, for the PyTorch
reference backend, a checkpoint (diffusers folder, single `.safetensors` file with its `config`, or
`tiny:<family>`), loaded as `latentrt export` loads it. Every component file is
checked against the hash in its manifest before it is used: a changed or foreign file is
`StaleArtifact`, an absent one `MissingComponent`. Manifests are untrusted: `read_manifest` checks
their types, family, components and IO, and every path they name must stay inside the folder
(`UnsafePath` otherwise, symlinks out of the folder included).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentrt.choices import Backend, values
from latentrt.errors import BackendUnavailable, InvalidRequest, MissingComponent, StaleArtifact
from latentrt.families import FAMILIES, FamilySpec, get_family
from latentrt.manifest import (
    ENGINE_KIND,
    MANIFEST,
    ONNX_KIND,
    read_manifest,
    sha256_file,
    sha256_tree,
    verify_files,
)
from latentrt.names import DIM_LATENT_HEIGHT, DIM_LATENT_WIDTH
from latentrt.paths import TINY_PREFIX, check_checkpoint, inside
from latentrt.step_cache import SHALLOW
from latentrt.tensors import ComponentIO, ModelDims, io_from_json
from latentrt.tiny_vae import TINY_VAE_DECODER

from .backends.base import Engine
from .unclip import load_image_processor

log = logging.getLogger(__name__)

BACKENDS = values(Backend)


@dataclass
class EngineSet:
    """One model's engines plus everything the pipeline needs besides them (tokenizers, configs, facts)."""

    folder: Path  # what was loaded (engine folder, ONNX folder or checkpoint folder)
    kind: str  # "engines", "onnx" or "checkpoint"
    backend: str  # "onnxruntime", "torch", "tensorrt" or "openvino"
    device: torch.device
    spec: FamilySpec
    info: dict[str, Any]  # manifest "model" section: vae_scaling_factor, force_zeros_for_empty_prompt, ...
    source: dict[str, Any]  # {"model": what was exported, "sha256": checkpoint hash}
    tokenizers: dict[str, Any]  # "tokenizer" / "tokenizer_2" -> transformers CLIPTokenizer
    scheduler_config: dict[str, Any]
    engines: dict[str, Engine]
    dims: ModelDims | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    image_processor: Any = None  # issue 12 (H4): the CLIP image processor of a family with an image encoder

    def __getitem__(self, component: str) -> Engine:
        if component not in self.engines:
            raise MissingComponent(f"{self.folder} has no '{component}' engine (it holds "
                                   f"{', '.join(self.engines) or 'none'}); re-run the export/build")
        return self.engines[component]

    def __contains__(self, component: object) -> bool:
        return component in self.engines

    @property
    def ios(self) -> dict[str, ComponentIO]:
        return {name: e.io for name, e in self.engines.items()}

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.info.get("vae_scaling_factor") or self.spec.vae_scaling_factor)

    @property
    def vae_shift_factor(self) -> float:
        return float(self.info.get("vae_shift_factor") or 0.0)

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return bool(self.info.get("force_zeros_for_empty_prompt", self.spec.zero_negative_for_empty_prompt))

    @property
    def requires_aesthetics_score(self) -> bool:
        """Whether the checkpoint's pipeline conditions on an aesthetic score (model_index.json, recorded at export).

        Manifests without the record fall back to the family's reference pipeline settings.
        """
        default = dict(self.spec.pipeline_options).get("requires_aesthetics_score", False)
        return bool(self.info.get("requires_aesthetics_score", default))

    @property
    def vae_scale_factor(self) -> int:
        return self.dims.vae_scale_factor if self.dims else self.spec.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.dims.latent_channels if self.dims else self.spec.latent_channels

    def latent_range(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(min, max) latent height and width every spatial engine accepts."""
        lo_h, hi_h, lo_w, hi_w = 0, 1 << 30, 0, 1 << 30
        for engine in self.engines.values():
            dims = engine.io.dims
            if DIM_LATENT_HEIGHT in dims:
                lo_h, hi_h = max(lo_h, dims[DIM_LATENT_HEIGHT].min), min(hi_h, dims[DIM_LATENT_HEIGHT].max)
            if DIM_LATENT_WIDTH in dims:
                lo_w, hi_w = max(lo_w, dims[DIM_LATENT_WIDTH].min), min(hi_w, dims[DIM_LATENT_WIDTH].max)
        return (lo_h, hi_h), (lo_w, hi_w)

    def covers(self, latent_height: int, latent_width: int) -> bool:
        """Whether every engine takes latents of this size."""
        sizes = {DIM_LATENT_HEIGHT: latent_height, DIM_LATENT_WIDTH: latent_width}
        return all(e.covers(sizes) for e in self.engines.values())

    def describe(self) -> list[str]:
        """One line per engine saying what actually runs."""
        return [e.describe() for e in self.engines.values()]

    def close(self) -> None:
        for e in self.engines.values():
            e.close()


# ---------------------------------------------------------------------------- loading


def parse_device(text: torch.device | str) -> torch.device:
    """A torch device from "cpu", "cuda" or "cuda:N"; InvalidRequest for anything else."""
    if isinstance(text, torch.device):
        device = text
    else:
        try:
            device = torch.device(str(text).strip())
        except (RuntimeError, ValueError):
            device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InvalidRequest(f"device must be cpu or cuda[:N] (e.g. cuda:0), got {str(text)!r}")
    return device


def load_engines(folder: str | os.PathLike[str], backend: str | None = None, device: torch.device | str = "cpu",
                 providers: Sequence[Any] | None = None, verify: bool = True,
                 config: str | os.PathLike[str] | None = None) -> EngineSet:
    """Load a model's engines: an engine folder, an ONNX export, or (backend "torch") a checkpoint.

    `config` (single-file checkpoints only, as `latentrt export --config`): the diffusers folder or hub
    id whose configs and tokenizers describe the file.
    """
    if backend is not None and backend not in BACKENDS:
        raise InvalidRequest(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    device = parse_device(device)
    text = os.fspath(folder)
    path = Path(text)
    if is_checkpoint(text):
        if backend not in (None, "torch"):
            raise InvalidRequest(f"{text} is a checkpoint; export it (`latentrt export`) to run it on {backend}, "
                                 "or pass --backend torch")
        return _load_reference(text, device, kind="checkpoint", manifest={}, config=config)
    if config is not None:
        raise InvalidRequest(f"--config applies to single-file checkpoints; {text} is not one")
    manifest = read_manifest(path)
    kind = manifest.get("kind")
    if kind == ONNX_KIND:
        return _load_onnx_dir(path, manifest, backend or "onnxruntime", device, providers, verify)
    if kind == ENGINE_KIND:
        return _load_engine_dir(path, manifest, backend, device, providers, verify)
    raise StaleArtifact(f"{path / MANIFEST} describes {kind!r}, not an ONNX export or built engines")


def is_checkpoint(text: str) -> bool:
    """Whether `text` names a checkpoint (tiny:<family>, a diffusers folder, a single weights file), not an export."""
    from latentrt.reference.single_file import is_single_file

    path = Path(text)
    if text.startswith(TINY_PREFIX) or is_single_file(text):
        return True
    return not (path / MANIFEST).is_file() and (path / "model_index.json").is_file()


def _load_onnx_dir(path: Path, manifest: dict[str, Any], backend: str, device: torch.device,
                   providers: Sequence[Any] | None, verify: bool) -> EngineSet:
    if backend == "torch":
        return _load_reference(_source_model(manifest, path), device, kind="onnx", manifest=manifest, folder=path)
    if backend == "openvino":
        return load_onnx_openvino(path, manifest, device, verify)
    if backend != "onnxruntime":
        raise InvalidRequest(f"{path} is an ONNX export; build {backend} engines from it first "
                             f"(`latentrt build {path} --backend {backend}`)")
    return _ort_set(path, manifest, "onnx", device, providers, verify)


def _load_engine_dir(path: Path, manifest: dict[str, Any], backend: str | None, device: torch.device,
                     providers: Sequence[Any] | None, verify: bool) -> EngineSet:
    built = str(manifest.get("backend", "onnxruntime"))
    backend = backend or built
    if backend == "torch":
        return _load_reference(_source_model(manifest, path), device, kind="engines", manifest=manifest, folder=path)
    if backend != built:
        raise InvalidRequest(f"{path} holds {built} engines, not {backend}; build {backend} engines "
                             f"(`latentrt build ONNX_DIR --backend {backend}`) or pass --backend {built}")
    if built == "onnxruntime":
        return _ort_set(path, manifest, "engines", device, providers, verify)
    if built == "tensorrt":
        return _trt_set(path, manifest, device, verify)
    if built == "openvino":
        return _ov_set(path, manifest, device, verify)
    raise StaleArtifact(f"{path / MANIFEST} names an unknown backend {built!r}")


def _components(path: Path, manifest: dict[str, Any], spec: FamilySpec) -> dict[str, dict[str, Any]]:
    """The manifest's component entries in pipeline order; MissingComponent naming any the family needs."""
    entries = manifest.get("components") or {}
    missing = [c for c in spec.components if c not in entries]
    if missing:
        raise MissingComponent(f"{path / MANIFEST} lists no {', '.join(missing)} (family {spec.name} needs "
                               f"{', '.join(spec.components)}); re-run the export/build")
    addons = [SHALLOW] if SHALLOW in entries else []  # `latentrt export --step-cache` (latentrt.step_cache)
    addons += [TINY_VAE_DECODER] if TINY_VAE_DECODER in entries else []  # `latentrt export --tiny-vae`
    return {c: entries[c] for c in (*spec.components, *addons)}


_HASH_CACHE: dict[tuple[str, tuple[tuple[str, int, int, int], ...]], str] = {}


def _stat_key(p: Path) -> tuple[tuple[str, int, int, int], ...]:
    """(relative path, size, mtime_ns, inode) of the file, or of every file under the folder."""
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    out = []
    for f in files:
        st = f.stat()
        out.append((f.relative_to(p).as_posix() if f != p else "", st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _digest(p: Path) -> str:
    """sha256 of a file (or folder tree), cached within the process until any file in it changes."""
    key = (str(p.resolve()), _stat_key(p))
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = sha256_file(p) if p.is_file() else sha256_tree(p)
    return _HASH_CACHE[key]


def component_file(path: Path, name: str, entry: dict[str, Any], verify: bool) -> Path:
    """The component's file, checked to exist and (when `verify`) to match the manifest's hash."""
    rel = entry.get("path")
    if not rel:
        raise StaleArtifact(f"{path / MANIFEST}: component '{name}' has no path")
    file = inside(path, rel, f"{path / MANIFEST} component {name!r}")
    if not file.is_file():
        raise MissingComponent(f"{name}: {file} is missing (listed in {path / MANIFEST}); re-run the export/build")
    digest = entry.get("sha256")
    if verify and digest and _digest(file.parent) != digest and _digest(file) != digest:
        raise StaleArtifact(f"{name}: {file} does not match the hash in {path / MANIFEST} (changed since it was "
                            "written, or copied from another model's export); re-run the export/build")
    return file


def _ort_set(path: Path, manifest: dict[str, Any], kind: str, device: torch.device,
             providers: Sequence[Any] | None, verify: bool) -> EngineSet:
    from .backends.onnxruntime import OrtEngine

    spec = _family(manifest, path)
    engines: dict[str, Engine] = {}
    for name, entry in _components(path, manifest, spec).items():
        file = component_file(path, name, entry, verify)
        ort_info = dict(entry.get("ort") or {})
        engines[name] = OrtEngine(file, io_from_json(entry["io"]), device, providers=_providers(providers, ort_info, device),
                                  session_options=session_options(ort_info))
    return _assemble(path, manifest, kind, "onnxruntime", device, spec, engines, verify)


def _providers(requested: Sequence[Any] | None, ort_info: dict[str, Any], device: torch.device) -> Sequence[Any] | None:
    """The caller's providers, else those the engine was built for when it was built for this device type."""
    if requested is not None:
        return requested
    built_for = ort_info.get("providers")
    if built_for and ort_info.get("device", "cpu") == device.type:
        return list(built_for)
    return None


def session_options(ort_info: dict[str, Any]) -> Any:
    """ONNX Runtime session options recorded by `latentrt build` (optimization level, threads)."""
    from .backends.onnxruntime import default_session_options

    opts = default_session_options()
    if not ort_info:
        return opts
    from latentrt.onnxruntime_support import ort_level

    opts.graph_optimization_level = ort_level(str(ort_info.get("session_graph_optimization_level", "all")))
    threads = dict(ort_info.get("threads") or {})
    if threads.get("intra_op"):
        opts.intra_op_num_threads = int(threads["intra_op"])
    if threads.get("inter_op"):
        opts.inter_op_num_threads = int(threads["inter_op"])
    return opts


def _ov_set(path: Path, manifest: dict[str, Any], device: torch.device, verify: bool) -> EngineSet:
    """OpenVINO IR engines (CPU), compiled with the settings the build recorded."""
    from .backends.openvino import OpenVinoEngine

    if device.type != "cpu":
        log.info("OpenVINO engines run on the CPU; using cpu instead of %s", device)
        device = torch.device("cpu")
    spec = _family(manifest, path)
    engines: dict[str, Engine] = {}
    for name, entry in _components(path, manifest, spec).items():
        file = component_file(path, name, entry, verify)
        info = entry.get("openvino")
        if not isinstance(info, dict):
            raise StaleArtifact(f"{path / MANIFEST}: component '{name}' has no 'openvino' settings; rebuild the engines")
        profiles = entry.get("profiles") or [{}]
        static = profiles[0].get("static") if isinstance(profiles[0], dict) else None
        engines[name] = OpenVinoEngine(file, io_from_json(entry["io"]),
                                       inference_precision=str(info.get("inference_precision", "f32")),
                                       threads=int(info.get("threads") or 0) or None,
                                       static_latents=static if isinstance(static, list) else ())
    return _assemble(path, manifest, "engines", "openvino", device, spec, engines, verify)


def load_onnx_openvino(path: Path, manifest: dict[str, Any], device: torch.device | str = "cpu", verify: bool = True,
                       inference_precision: str = "f32") -> EngineSet:
    """An ONNX export run directly on OpenVINO: one model per component compiled from its ONNX file with the
    plugin's default settings (no performance hint or thread count), at `inference_precision` ("f32" or "bf16")."""
    from .backends.openvino import OpenVinoEngine

    spec = _family(manifest, path)
    engines: dict[str, Engine] = {
        name: OpenVinoEngine(component_file(path, name, entry, verify), io_from_json(entry["io"]),
                             inference_precision=inference_precision, performance_hint=None)
        for name, entry in _components(path, manifest, spec).items()}
    return _assemble(path, manifest, "onnx", "openvino", torch.device("cpu"), spec, engines, verify)


def _trt_set(path: Path, manifest: dict[str, Any], device: torch.device, verify: bool) -> EngineSet:
    try:
        from .backends.tensorrt import load_engines as load_trt  # only here: needs TensorRT and a GPU
    except ImportError as e:
        raise BackendUnavailable(f"{path} holds TensorRT engines, but the TensorRT runtime is not available here "
                                 f"({e}); install TensorRT on a machine with an NVIDIA GPU, or run the ONNX export "
                                 "with --backend onnxruntime") from None
    if device.type != "cuda":
        log.info("TensorRT engines run on CUDA; using cuda instead of %s", device)
        device = torch.device("cuda")
    spec = _family(manifest, path)
    entries = _components(path, manifest, spec)
    for name, entry in entries.items():
        component_file(path, name, entry, verify)
    engines: dict[str, Engine] = dict(load_trt(path, list(entries), device=device, manifest=manifest))
    return _assemble(path, manifest, "engines", "tensorrt", device, spec, engines, verify)


def _family(manifest: dict[str, Any], path: Path) -> FamilySpec:
    family = manifest.get("family")
    if not family:
        raise StaleArtifact(f"{path / MANIFEST} names no family; re-run the export")
    return get_family(family)


def source_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint a folder comes from, {"model", "sha256"}, from an ONNX or an engine manifest."""
    source = dict(manifest.get("source") or {})
    inner = source.get("model")
    return dict(inner) if isinstance(inner, dict) else source  # engine manifests nest the ONNX source


def _source_model(manifest: dict[str, Any], path: Path) -> str:
    model = source_of(manifest).get("model")
    if not model:
        raise StaleArtifact(f"{path / MANIFEST} does not name its source checkpoint; cannot load the PyTorch reference")
    return str(model)


def _assemble(path: Path, manifest: dict[str, Any], kind: str, backend: str, device: torch.device,
              spec: FamilySpec, engines: dict[str, Engine], verify: bool) -> EngineSet:
    model = dict(manifest.get("model") or {})
    dims = _dims(model.get("dims"))
    if device.type != "cpu" and all(e.device.type == "cpu" for e in engines.values()):
        log.warning("no engine runs on %s (see the warnings above); the pipeline runs on the CPU", device)
        device = torch.device("cpu")
    if verify:
        verify_files(path, dict(manifest.get("files") or {}))
    return EngineSet(folder=path, kind=kind, backend=backend, device=device, spec=spec, info=model,
                     source=source_of(manifest), tokenizers=load_tokenizers(path, spec),
                     scheduler_config=load_scheduler_config(path), engines=engines, dims=dims, manifest=manifest,
                     image_processor=load_image_processor(path, spec))


def _dims(data: Any) -> ModelDims | None:
    if not isinstance(data, dict):
        return None
    fields: dict[str, Any] = {k: (tuple(v) if k in ("text_hidden", "text_vocab") else v) for k, v in data.items()
                              if k in ModelDims.__dataclass_fields__}
    try:
        return ModelDims(**fields)
    except TypeError:
        return None


def load_tokenizers(path: Path, spec: FamilySpec) -> dict[str, Any]:
    """The family's tokenizers, read from `path/tokenizer*` as diffusers does (CLIPTokenizer; LDM-BERT's BertTokenizer)."""
    import transformers

    out: dict[str, Any] = {}
    for te in spec.text_encoders:
        folder = path / te.tokenizer
        if not folder.is_dir():
            raise MissingComponent(f"{folder} is missing (the {te.component} tokenizer); re-run the export/build")
        kind = te.tower.tokenizer_class  # issue 12 (H2): the tower decides the tokenizer class
        try:
            out[te.tokenizer] = getattr(transformers, kind).from_pretrained(str(folder))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # malformed vocab / merges / config
            detail = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
            raise StaleArtifact(f"{folder} is not a readable {kind.removesuffix('Tokenizer')} tokenizer "
                                f"({type(e).__name__}: {detail}); re-run the export/build") from None
    return out


def load_scheduler_config(path: Path) -> dict[str, Any]:
    import json

    file = path / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise MissingComponent(f"{file} is missing (the scheduler config); re-run the export/build")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StaleArtifact(f"{file} is unreadable ({e}); re-run the export/build") from None
    if not isinstance(config, dict):
        raise StaleArtifact(f"{file} should hold a JSON object, found {type(config).__name__}; re-run the "
                            "export/build")
    return config


def _load_reference(model: str, device: torch.device, kind: str, manifest: dict[str, Any],
                    folder: Path | None = None, config: str | os.PathLike[str] | None = None) -> EngineSet:
    """The PyTorch reference backend: the checkpoint's own modules behind the engine interface.

    Loaded as the export loads it (`latentrt.reference.models.load_checkpoint`): a single file is
    converted once, with `config`, into a cached diffusers folder.
    """
    from latentrt.reference.models import load_checkpoint

    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("the torch backend was asked for CUDA, but PyTorch sees no CUDA device here; "
                                 "use --device cpu")

    from .backends.torch import TorchEngine

    family = manifest.get("family")
    check_checkpoint(model)
    loaded = load_checkpoint(model, family=family, config=None if config is None else os.fspath(config))
    ios = loaded.ios()
    engines: dict[str, Engine] = {c: TorchEngine.from_loaded(c, loaded, ios[c], device) for c in ios}
    if manifest and "vae_decoder" in ios:  # an export with --tiny-vae: its recorded AutoencoderTiny (TAESD)
        from .tiny_vae import torch_tiny_vae

        engines.update(torch_tiny_vae(manifest, ios["vae_decoder"], device))
    source = source_of(manifest) if manifest else {"model": model, "sha256": loaded.source_sha256}
    if manifest and source.get("sha256") and source["sha256"] != loaded.source_sha256:
        raise StaleArtifact(f"the checkpoint {model} changed since {folder} was exported (hash mismatch); "
                            "re-run the export")
    return EngineSet(folder=folder or loaded.folder, kind=kind, backend="torch", device=device, spec=loaded.spec,
                     info=dict(loaded.info), source=source, tokenizers=dict(loaded.tokenizers),
                     scheduler_config=dict(loaded.scheduler_config), engines=engines, dims=loaded.dims,
                     manifest=manifest, image_processor=load_image_processor(loaded.folder, loaded.spec))


# ---------------------------------------------------------------------------- pairing


def check_refiner(base: EngineSet, refiner: EngineSet) -> None:
    """InvalidRequest / StaleArtifact when `refiner` cannot continue `base`'s latents (its family's `refines`)."""
    bases = refiner.spec.refines
    if not bases:
        refiners = [spec.name for spec in FAMILIES.values() if spec.refines]
        raise InvalidRequest(f"--refiner {refiner.folder} is a {refiner.spec.name} model, not an SDXL refiner "
                             f"(refiners: {', '.join(refiners)})")
    if base.spec.name not in bases:
        raise InvalidRequest(f"a refiner continues {get_family(bases[0]).title} latents; {base.folder} is "
                             f"{base.spec.name} ({refiner.spec.name} continues {', '.join(bases)})")
    if base.latent_channels != refiner.latent_channels or base.vae_scale_factor != refiner.vae_scale_factor:
        raise StaleArtifact(f"base {base.folder} and refiner {refiner.folder} have different latent spaces "
                            f"({base.latent_channels} vs {refiner.latent_channels} channels, VAE factor "
                            f"{base.vae_scale_factor} vs {refiner.vae_scale_factor}); export both from one SDXL release")
    if abs(base.vae_scaling_factor - refiner.vae_scaling_factor) > 1e-9:
        raise StaleArtifact(f"base {base.folder} and refiner {refiner.folder} scale latents differently "
                            f"({base.vae_scaling_factor} vs {refiner.vae_scaling_factor}); export both from one "
                            "SDXL release")
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule"):
        a, b = base.scheduler_config.get(key), refiner.scheduler_config.get(key)
        if a is not None and b is not None and a != b:
            raise StaleArtifact(f"base and refiner use different noise schedules ({key}: {a} vs {b}); "
                                "the refiner cannot continue the base's latents")
