"""ONNX export -> engine folder: one engine per component, tokenizers and scheduler copied, manifest last.

Everything is built into a hidden staging folder beside the destination and moved into place
only when every component succeeded, so a failed or interrupted build never leaves a manifest
(or half an engine) behind. Components whose cache key is unchanged are reused from the previous
build of the same export instead of being rebuilt. One run at a time writes a folder
(`latentrt.outputs.output_lock`), and only a folder LatentRT wrote is replaced, with or without
--overwrite (`latentrt.outputs.check_replaceable`). The export is untrusted input: its manifest
is checked on read, and its ONNX graphs must have the inputs and outputs the manifest describes,
with external weights inside their component folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from latentrt.buckets import Size
from latentrt.errors import BuildError, MissingComponent, OutputConflict, StaleArtifact
from latentrt.families import FamilySpec, get_family
from latentrt.manifest import (
    ENGINE_KIND,
    MANIFEST,
    ONNX_KIND,
    SCHEMA,
    atomic_write_json,
    check_writable,
    move_into_place,
    publish_modes,
    read_manifest,
    sha256_file,
    sha256_tree,
    staging_dir,
    tool_versions,
    verify_files,
)
from latentrt.manifest_checks import sealed
from latentrt.outputs import check_replaceable, link_tree, output_lock, removed_if_failed, written_files
from latentrt.paths import inside
from latentrt.tensors import PROMPT_WINDOWS, ComponentIO, io_from_json, io_to_json

from .cache import digest, key_fields
from .onnx_checks import check_onnx_files
from .profiles import ProfilePlan, format_plan, plan_profiles
from .tensorrt import LayerFilter, attention_core

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt")
ENGINE_FILES = {"onnxruntime": "model.onnx", "tensorrt": "engine.plan"}
VAE_COMPONENTS = ("vae_encoder", "vae_decoder")
PRECISIONS = ("fp16", "fp32", "int8")
INT8_CALIBRATION_STEPS = 4
INT8_CALIBRATION_MAX_SIDE = 256  # default calibration size: the family's native size scaled down to this


@dataclass(frozen=True)
class OnnxExport:
    """An ONNX export folder as read from its manifest."""

    folder: Path
    manifest: Mapping[str, Any]
    manifest_sha256: str
    spec: FamilySpec
    ios: Mapping[str, ComponentIO]

    def model_path(self, component: str) -> Path:
        return self.folder / self.manifest["components"][component]["path"]

    def component_folder(self, component: str) -> str:
        """The manifest-relative path whose tree hash is the component's `sha256`."""
        parent = Path(self.manifest["components"][component]["path"]).parent
        return str(parent) if str(parent) != "." else self.manifest["components"][component]["path"]


@dataclass(frozen=True)
class ComponentPrecision:
    precision: str  # "fp16" or "fp32"
    fp32_layers: LayerFilter | None = None  # layers kept in fp32 inside an fp16 engine
    note: str = ""  # why, for the manifest and the progress line


@dataclass
class BuildEvent:
    """Progress of one component: stage is 'start', 'done' or 'reused'."""

    component: str
    index: int
    total: int
    stage: str
    backend: str
    precision: str
    detail: Mapping[str, Any] = field(default_factory=dict)


Progress = Callable[[BuildEvent], None]


def read_onnx_export(onnx_dir: str | os.PathLike[str]) -> OnnxExport:
    """Read an ONNX export's manifest, family and component IO (no file hashing)."""
    folder = Path(onnx_dir)
    manifest = read_manifest(folder, ONNX_KIND)
    try:
        spec = get_family(manifest["family"])
        ios = {c: io_from_json(e["io"]) for c, e in manifest["components"].items()}
    except (KeyError, TypeError) as e:
        raise StaleArtifact(f"{folder / MANIFEST} is incomplete ({e}); re-run `latentrt export`") from None
    order = [c for c in spec.components if c in ios] + [c for c in ios if c not in spec.components]
    return OnnxExport(folder, manifest, sha256_file(folder / MANIFEST), spec, {c: ios[c] for c in order})


def plan_for_export(export: OnnxExport, *, sizes: Sequence[Size] | None = None, batch: tuple[int, int] = (1, 4),
                    strategy: str = "grouped", groups: int = 3, cfg: bool | None = None,
                    opt_batch: int | None = None, components: Sequence[str] | None = None,
                    prompt_windows: int = PROMPT_WINDOWS) -> ProfilePlan:
    """The optimization-profile plan of an export's components."""
    ios = {c: export.ios[c] for c in select_components(export, components)}
    return plan_profiles(export.spec, ios, sizes=sizes, batch=batch, cfg=cfg, strategy=strategy, groups=groups,
                         opt_batch=opt_batch, prompt_windows=prompt_windows)


def select_components(export: OnnxExport, components: Sequence[str] | None) -> list[str]:
    if components is None:
        return list(export.ios)
    unknown = [c for c in components if c not in export.ios]
    if unknown:
        raise MissingComponent(f"{export.folder} has no component(s) {', '.join(unknown)}; it has "
                               f"{', '.join(export.ios)}")
    return [c for c in export.ios if c in components]


def component_precision(spec: FamilySpec, component: str, requested: str, *,
                        fp16_fixed_vae: bool = False) -> ComponentPrecision:
    """The precision a component is built in, with the fp32 islands its family needs."""
    if requested not in ("fp16", "fp32"):
        raise BuildError(f"unknown precision {requested!r}; choose fp16 or fp32")
    if requested == "fp32":
        return ComponentPrecision("fp32")
    # Known fp16 failures (FIELD-NOTES): the SDXL VAE overflows to NaN; SD 2.x attention gives black images.
    if component in VAE_COMPONENTS and spec.fp16_vae_overflows and not fp16_fixed_vae:
        return ComponentPrecision("fp32", note="the SDXL VAE overflows in fp16: built fp32/TF32 "
                                               "(pass --fp16-fixed-vae for an fp16-fixed VAE)")
    if component == "unet" and spec.fp32_attention:
        return ComponentPrecision("fp16", attention_core, "attention softmax/matmul kept fp32 (SD 2.x fp16 overflow)")
    return ComponentPrecision("fp16")


def default_precision(backend: str, device: str) -> str:
    return "fp16" if backend == "tensorrt" or device == "cuda" else "fp32"


@dataclass(frozen=True)
class Int8Options:
    """How an int8 UNet is made: an `engines.quantize.RECIPES` name and, for static recipes, the calibration run."""

    recipe: str
    calibration_size: Size | None  # (height, width) px of the fp32 sampling runs; None: no calibration (dynamic)
    calibration_steps: int | None = INT8_CALIBRATION_STEPS

    def as_json(self) -> dict[str, Any]:
        size = self.calibration_size
        return {"recipe": self.recipe, "calibration_size": f"{size[0]}x{size[1]}" if size else None,
                "calibration_steps": self.calibration_steps}


def default_calibration_size(spec: FamilySpec) -> Size:
    """The family's native size, scaled so its long side is at most 256 px (multiples of 64)."""
    h, w = spec.native_size
    scale = min(1.0, INT8_CALIBRATION_MAX_SIDE / max(h, w))
    return max(64, int(h * scale) // 64 * 64), max(64, int(w * scale) // 64 * 64)


def int8_options(spec: FamilySpec, backend: str, device: str, recipe: str | None, calibration_size: Size | None,
                 calibration_steps: int) -> Int8Options:
    """Check that an int8 build is possible here and fill in its defaults (BuildError otherwise)."""
    from .quantize import DEFAULT_RECIPE, RECIPES

    if backend != "onnxruntime" or device != "cpu":
        raise BuildError(f"--precision int8 is for --backend onnxruntime on the CPU (got backend {backend}, device "
                         f"{device}); TensorRT and the CUDA EP build fp16 or fp32 engines")
    name = recipe or DEFAULT_RECIPE
    if name not in RECIPES:
        raise BuildError(f"unknown int8 recipe {name!r}; choose one of {', '.join(RECIPES)}")
    size = calibration_size or default_calibration_size(spec)
    if min(size) < 8 or any(s % 8 for s in size) or calibration_steps < 1:
        raise BuildError(f"int8 calibration at {size[0]}x{size[1]} px with {calibration_steps} step(s) is not "
                         "possible: sizes must be multiples of 8 and steps at least 1")
    if RECIPES[name].method != "static":
        return Int8Options(name, None, None)
    return Int8Options(name, size, calibration_steps)


# ---------------------------------------------------------------------------- the build


@dataclass
class BuildOptions:
    """The backend settings of one build (those that change an engine also go into its cache key)."""

    backend: str
    precision: str
    device: str = "cpu"  # ONNX Runtime: cpu | cuda
    threads: int | None = None
    graph_optimization_level: str = "extended"
    fp16_fixed_vae: bool = False
    optimization_level: int = 3
    refittable: bool = False
    strongly_typed: bool = False
    workspace_mb: int | None = None
    timing_cache: str | os.PathLike[str] | None = None
    verify: bool = True


def build_engines(onnx_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                  backend: str = "onnxruntime", sizes: Sequence[Size] | None = None,
                  batch: tuple[int, int] = (1, 4), strategy: str = "grouped", groups: int = 3,
                  cfg: bool | None = None, opt_batch: int | None = None, precision: str | None = None,
                  plan_only: bool = False, components: Sequence[str] | None = None,
                  progress: Progress | None = None, overwrite: bool = False, device: str = "cpu",
                  threads: int | None = None, graph_optimization_level: str = "extended",
                  fp16_fixed_vae: bool = False, optimization_level: int = 3, refittable: bool = False,
                  strongly_typed: bool = False, workspace_mb: int | None = None,
                  timing_cache: str | os.PathLike[str] | None = None, verify: bool = True,
                  int8_recipe: str | None = None, calibration_size: Size | None = None,
                  calibration_steps: int = INT8_CALIBRATION_STEPS, prompt_windows: int = PROMPT_WINDOWS) -> Path:
    """Build engines for an ONNX export into `out_dir` and return it.

    Args:
        onnx_dir: folder written by `latentrt export` (manifest.json + one folder per component).
        out_dir: engine folder to write (replaced atomically when the build succeeds).
        backend: "onnxruntime" (CPU / CUDA EP) or "tensorrt".
        sizes: (height, width) pixel sizes the TensorRT profiles cover (default: the family's buckets).
        batch: (min, max) images per prompt.
        strategy / groups: profile strategy ("dynamic", "per-bucket", "grouped") and group count.
        cfg: plan the UNet batch for classifier-free guidance (default: the family's default).
        opt_batch: per-prompt batch the TensorRT kernels are tuned for.
        precision: "fp16", "fp32" or "int8" (default: fp16 for TensorRT and the CUDA EP, fp32 on the CPU).
            "int8" (ONNX Runtime on the CPU only): fp32 engines with an int8 UNet quantized from the export.
        plan_only: plan and log the profiles, write nothing.
        components: build only these (others are kept from a previous build of the same export).
        progress: called with a BuildEvent when each component starts and ends.
        overwrite: rebuild the selected components even when unchanged, and replace an output folder that
            holds something else.
        device / threads / graph_optimization_level: ONNX Runtime settings.
        fp16_fixed_vae: the SDXL VAE is an fp16-fixed one: build it in fp16.
        optimization_level / refittable / strongly_typed / workspace_mb / timing_cache: TensorRT settings.
        verify: run each ONNX Runtime engine once against its source graph.
        int8_recipe: with precision "int8", a name from `engines.quantize.RECIPES` (default "static-qdq-mha").
        calibration_size / calibration_steps: static int8 recipes record UNet inputs by sampling with the fp32
            engines at this (height, width) (default: the native size capped to 256 px) and step count (4).
        prompt_windows: the most 75-token prompt windows the TensorRT profiles cover (UNet context
            77 x windows; default 3). ONNX Runtime engines take any number the export does.
    """
    if backend not in BACKENDS:
        raise BuildError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if precision is not None and precision not in PRECISIONS:
        raise BuildError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "int8" and int8_recipe is not None:
        raise BuildError("an int8 recipe needs --precision int8")
    export = read_onnx_export(onnx_dir)
    int8 = None if precision != "int8" else int8_options(export.spec, backend, device, int8_recipe,
                                                           calibration_size, calibration_steps)
    plan = plan_for_export(export, sizes=sizes, batch=batch, strategy=strategy, groups=groups, cfg=cfg,
                           opt_batch=opt_batch, components=components, prompt_windows=prompt_windows)
    if plan_only:
        log.info("%s", format_plan(plan))
        return Path(out_dir)
    base = "fp32" if int8 is not None else precision or default_precision(backend, device)
    opts = BuildOptions(backend, base, device, threads,
                        graph_optimization_level, fp16_fixed_vae, optimization_level, refittable, strongly_typed,
                        workspace_mb, timing_cache, verify)
    gpu = _check_backend(opts)
    out = Path(os.path.abspath(out_dir))  # "." has no name to stage or lock beside
    if out.resolve() == export.folder.resolve():
        raise OutputConflict(f"the engine folder {out} is the ONNX folder; choose another -o")
    with removed_if_failed(out.parent), output_lock(check_writable(out.parent) / out.name):
        _build_locked(export, out, plan, opts, gpu, int8, overwrite, progress,
                      dict(sizes=sizes, batch=batch, strategy=strategy, groups=groups, cfg=cfg, opt_batch=opt_batch,
                           prompt_windows=prompt_windows))
    log.info("wrote %s engines for %s to %s", backend, export.spec.name, out)
    return out


def _build_locked(export: OnnxExport, out: Path, plan: ProfilePlan, opts: BuildOptions, gpu: dict[str, str] | None,
                  int8: Int8Options | None, overwrite: bool, progress: Progress | None,
                  planning: dict[str, Any]) -> None:
    """The build proper, run while holding the output folder's lock."""
    previous = _previous_build(export, out, overwrite)
    outdated = _outdated_kept(previous, export, opts, gpu, plan.components, out)
    if int8 is not None and "unet" in export.ios and "unet" not in plan.components \
            and not _same_int8(previous, int8):
        outdated.append("unet")  # the kept UNet is not the int8 UNet asked for
    if outdated:
        plan = plan_for_export(export, **planning, components=[*plan.components, *outdated])
    verify_export(export, plan.components)
    check_onnx_files(export, plan.components)
    with staging_dir(out) as tmp:
        entries = _kept_entries(previous, opts.backend, plan.components, list(export.ios), out, tmp)
        reusable = None if overwrite else previous
        quantize = int8 is not None and "unet" in plan.components
        total = len(plan.components) + quantize
        for i, c in enumerate(plan.components):
            entries[c] = _build_component(export, plan, c, tmp, opts, gpu, reusable, out, (i, total), progress)
        files = _copy_files(export, tmp)
        ordered = {c: entries[c] for c in export.ios if c in entries}
        manifest = engine_manifest(export, plan, opts, gpu, ordered, files)
        if int8 is not None:
            manifest = _int8_manifest(export, manifest, tmp, int8, quantize, previous, (total - 1, total), progress)
        atomic_write_json(tmp / MANIFEST, sealed({**manifest, "written": written_files(tmp)}))
        publish_modes(tmp)
        move_into_place(tmp, out)


def _same_int8(manifest: Mapping[str, Any] | None, int8: Int8Options) -> bool:
    """Whether an engine manifest's UNet is int8 made with these settings."""
    unet = ((manifest or {}).get("components") or {}).get("unet") or {}
    made = unet.get("int8_build") if unet.get("precision") == "int8" else None
    return isinstance(made, Mapping) and all(made.get(k) == v for k, v in int8.as_json().items())


def _int8_manifest(export: OnnxExport, manifest: dict[str, Any], tmp: Path, int8: Int8Options, quantize: bool,
                   previous: Mapping[str, Any] | None, position: tuple[int, int],
                   progress: Progress | None) -> dict[str, Any]:
    """The manifest of an int8 build: the fp32 UNet in `tmp` replaced by an int8 one (or the kept int8 UNet)."""
    if "unet" not in manifest["components"]:
        raise BuildError(f"{export.folder} has no unet: --precision int8 quantizes the UNet")
    unet = manifest["components"]["unet"]
    if quantize:
        unet = _quantize_unet(export, manifest, tmp, int8, position, progress)
    info = (previous or {}).get("int8") if not quantize else None
    return dict(manifest, precision="int8", components={**manifest["components"], "unet": unet},
                int8=info or {"component": "unet", "recipe": int8.recipe, **unet["int8_build"],
                              "fp32_unet": str(export.model_path("unet").resolve())})


def _quantize_unet(export: OnnxExport, manifest: dict[str, Any], tmp: Path, int8: Int8Options,
                   position: tuple[int, int], progress: Progress | None) -> dict[str, Any]:
    """Calibrate with the fp32 engines in `tmp` (static recipes), then replace `tmp/unet` by the int8 UNet."""
    from .quantize import quantize_recipe

    calibration = int8.as_json()
    event = BuildEvent("unet", position[0], position[1], "start", "onnxruntime", "int8")
    _emit(progress, event, "start", {"recipe": int8.recipe, "calibration": calibration})
    start = time.perf_counter()
    feeds: list[Any] = []
    if int8.calibration_size is not None and int8.calibration_steps is not None:
        h, w = int8.calibration_size
        # Lazy import: runtime.bench pulls in torch and the pipeline, which only int8 builds need here.
        from latentrt.runtime.bench import calibration_feeds  # pyright: ignore[reportMissingImports]

        atomic_write_json(tmp / MANIFEST, manifest)  # the staged fp32 engines sample the calibration inputs
        feeds = calibration_feeds(tmp, height=h, width=w, steps=int8.calibration_steps)
        (tmp / MANIFEST).unlink()
    calibrate_s = time.perf_counter() - start
    dest = tmp / "unet"
    shutil.rmtree(dest)  # unlink the fp32 files (they may be hard links into the previous build), never overwrite
    info = quantize_recipe(export.model_path("unet"), dest / "model.onnx", int8.recipe, feeds)
    entry = dict(manifest["components"]["unet"], path="unet/model.onnx", precision="int8", fp32_islands="",
                 sha256=sha256_tree(dest), size_mb=round(_tree_bytes(dest) / 2**20, 3),
                 size_bytes=(dest / "model.onnx").stat().st_size, build_s=round(time.perf_counter() - start, 3),
                 cache_key=f"int8:{info['recipe_name']}", int8=info,
                 int8_build={**calibration, "calibration_s": round(calibrate_s, 3), "calibration_feeds": len(feeds)},
                 ort={"device": "cpu", "graph_optimization_level": "none (optimized at session start)"})
    _emit(progress, event, "done", entry)
    return entry


def verify_export(export: OnnxExport, components: Sequence[str]) -> None:
    """Check the export's files against its manifest (StaleArtifact / MissingComponent on mismatch)."""
    entries = export.manifest["components"]
    verify_files(export.folder, {export.component_folder(c): entries[c]["sha256"] for c in components})
    verify_files(export.folder, dict(export.manifest.get("files", {})))


def _check_backend(opts: BuildOptions) -> dict[str, str] | None:
    """Raise BackendUnavailable unless the backend can build here; return the GPU it builds for."""
    from .tensorrt import gpu_info, require_tensorrt

    if opts.backend == "tensorrt":
        require_tensorrt()
        return gpu_info()
    from .onnxruntime import require_ort

    require_ort()
    return gpu_info() if opts.device == "cuda" else None


def _previous_build(export: OnnxExport, out: Path, overwrite: bool) -> Mapping[str, Any] | None:
    """The output folder's engine manifest when it holds a build of the same model, else None.

    A folder holding anything LatentRT did not write is an OutputConflict, with or without `overwrite`; one
    holding another model's engines (or an unusable engine folder) is an OutputConflict unless `overwrite`.
    """
    if check_replaceable(out, "engines") is None:
        return None
    try:
        old = read_manifest(out, ENGINE_KIND)
    except (MissingComponent, StaleArtifact) as e:
        if overwrite:
            return None
        raise OutputConflict(f"{out} exists and does not hold usable LatentRT engines ({e}); pass --overwrite to "
                             "replace it or choose another folder") from None
    if old.get("source", {}).get("model") != export.manifest.get("source"):
        if overwrite:
            return None
        raise OutputConflict(f"{out} holds engines of another model ({old.get('source', {}).get('model')}); pass "
                             "--overwrite to replace them or choose another folder")
    return old


def _outdated_kept(previous: Mapping[str, Any] | None, export: OnnxExport, opts: BuildOptions,
                   gpu: Mapping[str, str] | None, building: Sequence[str], out: Path) -> list[str]:
    """Components not asked for whose previous engine no longer fits: they are rebuilt too.

    An engine is outdated when the export's component changed since it was built (its ONNX hash), when
    its files are missing or changed, or (TensorRT) when it was built by another TensorRT version or for a
    GPU of another compute capability.
    """
    if previous is None or previous.get("backend") != opts.backend:
        return []
    machine = {"trt_version": _trt_version(opts), "compute_capability": (gpu or {}).get("compute_capability")}
    outdated = []
    for c, entry in previous.get("components", {}).items():
        if c in building or c not in export.ios:
            continue
        want = {"onnx_sha256": export.manifest["components"][c]["sha256"],
                **(machine if opts.backend == "tensorrt" else {})}
        key = entry.get("key") if isinstance(entry, Mapping) else None
        why = [f"{f} differs" for f, v in want.items() if not isinstance(key, Mapping) or key.get(f) != v]
        if not why and (not (out / c).is_dir() or sha256_tree(out / c) != entry.get("sha256")):
            why = ["its files are missing or changed"]
        if why:
            log.warning("%s: the previous engine is outdated (%s); rebuilding it too", c, ", ".join(why))
            outdated.append(c)
    return outdated


def _kept_entries(previous: Mapping[str, Any] | None, backend: str, building: Sequence[str],
                  known: Sequence[str], out: Path, tmp: Path) -> dict[str, Any]:
    """Entries (and files) of components not being built, kept from the previous build of the same export.

    `_outdated_kept` has already moved every outdated engine into `building`.
    """
    if previous is None or previous.get("backend") != backend:
        return {}
    kept = {}
    for c, entry in previous.get("components", {}).items():
        if c in known and c not in building:
            link_tree(out / c, tmp / c)
            kept[c] = entry
    return kept


def _build_component(export: OnnxExport, plan: ProfilePlan, c: str, tmp: Path, opts: BuildOptions,
                     gpu: Mapping[str, str] | None, previous: Mapping[str, Any] | None, out: Path,
                     position: tuple[int, int], progress: Progress | None) -> dict[str, Any]:
    """Build (or reuse) one component's engine into `tmp/c` and return its manifest entry."""
    prec = component_precision(export.spec, c, opts.precision, fp16_fixed_vae=opts.fp16_fixed_vae)
    io, profiles = _engine_io(plan, c, opts.backend, export.ios[c])
    fields = key_fields(export.manifest["components"][c]["sha256"], prec.precision, profiles,
                        _builder_flags(opts, prec), _trt_version(opts), (gpu or {}).get("compute_capability"))
    key = digest(fields)
    event = BuildEvent(c, position[0], position[1], "start", opts.backend, prec.precision, {"note": prec.note})
    reused = _reuse(previous, c, key, out, tmp)
    if reused is not None:
        _emit(progress, event, "reused", reused)
        return reused
    _emit(progress, event, "start", {"note": prec.note, "profiles": len(profiles)})
    dest = tmp / c
    dest.mkdir(parents=True, exist_ok=True)
    details = _run_backend(export, plan, c, dest, opts, prec, io)
    rel = f"{c}/{ENGINE_FILES[opts.backend]}"
    entry = {"path": rel, "io": io_to_json(io), "precision": prec.precision, "fp32_islands": prec.note,
             "profiles": profiles, "cache_key": key, "key": fields, "sha256": sha256_tree(dest),
             "size_mb": round(_tree_bytes(dest) / 2**20, 3), "size_bytes": (dest / ENGINE_FILES[opts.backend]).stat().st_size,
             **details}
    _emit(progress, event, "done", entry)
    return entry


def _emit(progress: Progress | None, event: BuildEvent, stage: str, detail: Mapping[str, Any]) -> None:
    if progress is not None:
        progress(replace(event, stage=stage, detail=detail))


def _engine_io(plan: ProfilePlan, c: str, backend: str, io: ComponentIO) -> tuple[ComponentIO, list[dict[str, Any]]]:
    """The engine's IO ranges and profile entries: the plan's for TensorRT, the export's full ranges for ORT."""
    if backend == "tensorrt":
        return plan.io(c), plan.entries(c)
    bounds = {name: [d.min, d.opt, d.max] for name, d in io.dims.items()}
    return io, [{"name": "all", "sizes": [], "opt_size": None, "bounds": bounds}]


def _builder_flags(opts: BuildOptions, prec: ComponentPrecision) -> dict[str, Any]:
    if opts.backend == "tensorrt":
        return {"backend": "tensorrt", "fp16": prec.precision == "fp16", "strongly_typed": opts.strongly_typed,
                "optimization_level": opts.optimization_level, "refittable": opts.refittable,
                "workspace_mb": opts.workspace_mb, "fp32_islands": prec.note}
    import onnxruntime as ort

    return {"backend": "onnxruntime", "device": opts.device, "onnxruntime": ort.__version__,
            "graph_optimization_level": opts.graph_optimization_level, "threads": opts.threads,
            "fp32_islands": prec.note}


def _trt_version(opts: BuildOptions) -> str | None:
    from .tensorrt import trt_version

    return trt_version() if opts.backend == "tensorrt" else None


def _reuse(previous: Mapping[str, Any] | None, c: str, key: str, out: Path, tmp: Path) -> dict[str, Any] | None:
    """The previous entry when its cache key matches and its files are intact (files linked into `tmp`)."""
    entry = (previous or {}).get("components", {}).get(c)
    if not entry or entry.get("cache_key") != key or not (out / c).is_dir():
        return None
    if sha256_tree(out / c) != entry.get("sha256"):
        log.warning("%s: the previous engine's files changed since they were built; rebuilding", c)
        return None
    link_tree(out / c, tmp / c)
    return dict(entry)


def _run_backend(export: OnnxExport, plan: ProfilePlan, c: str, dest: Path, opts: BuildOptions,
                 prec: ComponentPrecision, io: ComponentIO) -> dict[str, Any]:
    """Build one engine file into `dest`; returns backend-specific manifest fields."""
    src = export.model_path(c)
    if opts.backend == "onnxruntime":
        from .onnxruntime import prepare_ort_engine

        ort_info = prepare_ort_engine(src, dest, device=opts.device, precision=prec.precision,
                                      graph_optimization_level=opts.graph_optimization_level,
                                      intra_op_threads=opts.threads, io=export.ios[c], fp32_nodes=prec.fp32_layers,
                                      verify=opts.verify)
        return {"build_s": ort_info.pop("prepare_s"), "ort": ort_info}
    from .tensorrt import build_trt_engine

    result = build_trt_engine(src, dest / ENGINE_FILES["tensorrt"], [dict(p.shapes[c]) for p in plan.profiles],
                              fp16=prec.precision == "fp16", strongly_typed=opts.strongly_typed,
                              optimization_level=opts.optimization_level, refittable=opts.refittable,
                              timing_cache=opts.timing_cache, fp32_layers=prec.fp32_layers,
                              workspace_mb=opts.workspace_mb)
    return {"build_s": result.build_s, "device_memory_mb": result.device_memory_mb,
            "profile_memory_mb": result.profile_memory_mb, "num_layers": result.num_layers,
            "fp32_layers": result.fp32_layers}


def _copy_files(export: OnnxExport, tmp: Path) -> dict[str, str]:
    """Copy the export's non-engine files (tokenizers, scheduler) and return their hashes."""
    files = dict(export.manifest.get("files", {}))
    for rel in files:
        src, dst = inside(export.folder, rel, "export file"), inside(tmp, rel, "engine file")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    return files


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def engine_manifest(export: OnnxExport, plan: ProfilePlan, opts: BuildOptions, gpu: Mapping[str, str] | None,
                    components: Mapping[str, Any], files: Mapping[str, str]) -> dict[str, Any]:
    """The engine folder's manifest (see DESIGN: artifacts are content-addressed and self-describing)."""
    plan_info = None
    if opts.backend == "tensorrt":
        plan_info = {"strategy": plan.strategy, "sizes": [f"{h}x{w}" for h, w in plan.sizes],
                     "batch": list(plan.batch), "opt_batch": plan.opt_batch, "cfg": plan.cfg,
                     "profiles": [p.name for p in plan.profiles]}
    tools = tool_versions()
    trt = _trt_version(opts)
    if trt:
        tools["tensorrt"] = trt
    return {
        "kind": ENGINE_KIND,
        "schema": SCHEMA,
        "backend": opts.backend,
        "family": export.spec.name,
        "source": {"onnx_dir": str(export.folder.resolve()), "onnx_manifest_sha256": export.manifest_sha256,
                   "model": export.manifest.get("source")},
        "model": export.manifest.get("model"),
        "tools": tools,
        "gpu": dict(gpu) if gpu else None,
        # a partial fp32 rebuild keeps an int8 UNet: the folder is then still an int8 engine set
        "precision": "int8" if any(c.get("precision") == "int8" for c in components.values()) else opts.precision,
        "plan": plan_info,
        "components": dict(components),
        "files": dict(files),
    }
