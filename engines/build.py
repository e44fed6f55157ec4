"""ONNX export -> engine folder: one engine per component, tokenizers and scheduler copied, manifest last.

Everything is built into a hidden staging folder beside the destination and moved into place
only when every component succeeded, so a failed or interrupted build never leaves a manifest
(or half an engine) behind. Components whose cache key is unchanged are reused from the previous
build of the same export instead of being rebuilt. Each backend's engines come from its `Builder`
(`engines.builder`; `build_onnxruntime`, `build_tensorrt`), int8 UNets from `engines.build_int8`.
One run at a time writes a folder (`latentrt.outputs.output_lock`), and only a folder LatentRT
wrote is replaced, with or without --overwrite (`latentrt.outputs.check_replaceable`). The export is untrusted input: its manifest
is checked on read, and its ONNX graphs must have the inputs and outputs the manifest describes,
with external weights inside their component folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from latentrt.buckets import Size, checkpoint_native_size
from latentrt.cache_keys import digest
from latentrt.choices import BuildBackend, Device, Precision, values
from latentrt.errors import BuildError, MissingComponent, OutputConflict, StaleArtifact
from latentrt.families import FamilySpec
from latentrt.manifest import (
    ENGINE_KIND,
    MANIFEST,
    SCHEMA,
    atomic_write_json,
    check_writable,
    move_into_place,
    publish_modes,
    read_manifest,
    sha256_tree,
    staging_dir,
    tool_versions,
)
from latentrt.manifest_checks import sealed
from latentrt.outputs import check_replaceable, link_tree, output_lock, removed_if_failed, written_files
from latentrt.step_cache import MANIFEST_KEY as STEP_CACHE
from latentrt.tensors import PROMPT_WINDOWS, io_to_json
from latentrt.tiny_vae import MANIFEST_KEY as TINY_VAE

from .build_int8 import (
    INT8_CALIBRATION_STEPS,
    Int8Options,
    default_calibration_size,
    int8_manifest,
    int8_options,
    same_int8,
)
from .build_onnxruntime import OnnxRuntimeBuilder
from .build_openvino import OpenVinoBuilder, ov_component_precision
from .build_tensorrt import TensorRTBuilder
from .builder import Builder, BuildEvent, BuildOptions, ComponentPrecision, GpuInfo, Progress, emit
from .calibration import Calibration, Feed
from .layers import attention_core
from .onnx_checks import check_onnx_files
from .openvino import cpu_native_bf16
from .profiles import ProfilePlan, format_plan, plan_profiles, vae_scale_factor
from .recipes import DEFAULT_RECIPE, RECIPES
from .source import OnnxExport, copy_files, read_onnx_export, select_components, tree_bytes, verify_export

__all__ = ["INT8_CALIBRATION_STEPS", "BuildEvent", "BuildOptions", "Calibration", "ComponentPrecision", "Int8Options",
           "OnnxExport", "Progress", "build_engines", "builder_for", "component_precision", "default_calibration_size",
           "default_precision", "engine_manifest", "export_native_size", "int8_needs_calibration", "int8_options",
           "plan_for_export", "read_onnx_export", "verify_export"]

log = logging.getLogger(__name__)

BUILDERS: dict[BuildBackend, type[Builder]] = {b.backend: b for b in (OnnxRuntimeBuilder, TensorRTBuilder,
                                                                       OpenVinoBuilder)}
VAE_COMPONENTS = ("vae_encoder", "vae_decoder")


def plan_for_export(export: OnnxExport, *, sizes: Sequence[Size] | None = None, batch: tuple[int, int] = (1, 4),
                    strategy: str = "grouped", groups: int = 3, cfg: bool | None = None,
                    opt_batch: int | None = None, components: Sequence[str] | None = None,
                    prompt_windows: int = PROMPT_WINDOWS) -> ProfilePlan:
    """The optimization-profile plan of an export's components (buckets and opt from the checkpoint's native size)."""
    ios = {c: export.ios[c] for c in select_components(export, components)}
    return plan_profiles(export.spec, ios, sizes=sizes, batch=batch, cfg=cfg, strategy=strategy, groups=groups,
                         opt_batch=opt_batch, prompt_windows=prompt_windows, native=export_native_size(export))


def export_native_size(export: OnnxExport) -> Size:
    """The exported checkpoint's native (height, width): its recorded UNet sample_size x the VAE factor, else the
    family's (`buckets.checkpoint_native_size`)."""
    dims = (export.manifest.get("model") or {}).get("dims")
    if not isinstance(dims, dict):
        return export.spec.native_size
    extra = dims.get("extra")
    factor = dims.get("vae_scale_factor", vae_scale_factor(export.ios, export.spec.vae_scale_factor))
    return checkpoint_native_size(export.spec, extra.get("unet_sample_size") if isinstance(extra, dict) else None,
                                  factor)


def component_precision(spec: FamilySpec, component: str, requested: str, *,
                        fp16_fixed_vae: bool = False) -> ComponentPrecision:
    """The precision a component is built in, with the fp32 islands its family needs."""
    if requested not in (Precision.FP16, Precision.FP32):
        raise BuildError(f"unknown precision {requested!r}; choose fp16 or fp32")
    if requested == Precision.FP32:
        return ComponentPrecision(Precision.FP32)
    # Known fp16 failures: the SDXL VAE overflows to NaN (hence madebyollin's fp16-fix VAE); SD 2.x attention
    # overflows in fp16 and gives black images.
    if component in VAE_COMPONENTS and spec.fp16_vae_overflows and not fp16_fixed_vae:
        return ComponentPrecision(Precision.FP32, note="the SDXL VAE overflows in fp16: built fp32/TF32 "
                                                       "(pass --fp16-fixed-vae for an fp16-fixed VAE)")
    if component == "unet" and spec.fp32_attention:
        return ComponentPrecision(Precision.FP16, attention_core,
                                  "attention softmax/matmul kept fp32 (SD 2.x fp16 overflow)")
    return ComponentPrecision(Precision.FP16)


def builder_for(options: BuildOptions) -> Builder:
    """The builder of the options' backend."""
    return BUILDERS[options.backend](options)


def default_precision(backend: str, device: str) -> Precision:
    """What a backend builds when no precision is asked for (fp16 for TensorRT and the CUDA EP, else fp32)."""
    return BUILDERS[BuildBackend(backend)].default_precision(Device(device))


def int8_needs_calibration(onnx_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], int8: Int8Options, *,
                           components: Sequence[str] | None = None, overwrite: bool = False,
                           decoder: bool = False) -> bool:
    """Whether a build with these settings quantizes the UNet (or, with `decoder`, an int8 VAE decoder) with a
    static recipe, so needs recorded feeds.

    The UNet is quantized when it is built (all components, or `unet` among them) or when the folder's
    kept UNet is not an int8 UNet made with these settings.
    """
    export = read_onnx_export(onnx_dir)
    if not int8.static or "unet" not in export.ios:
        return False
    selected = select_components(export, components)
    if "unet" in selected or (decoder and "vae_decoder" in selected):
        return True
    out = Path(os.path.abspath(out_dir))
    previous = _previous_build(export, out, overwrite)
    opts = BuildOptions(BuildBackend.ONNXRUNTIME, Precision.FP32)
    others = [c for c in export.ios if c != "unet"]
    return not same_int8(previous, int8) or "unet" in _outdated_kept(previous, export, opts, None, others, out)


# ---------------------------------------------------------------------------- the build


def build_engines(onnx_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                  backend: str = BuildBackend.ONNXRUNTIME, sizes: Sequence[Size] | None = None,
                  batch: tuple[int, int] = (1, 4), strategy: str = "grouped", groups: int = 3,
                  cfg: bool | None = None, opt_batch: int | None = None, precision: str | None = None,
                  plan_only: bool = False, components: Sequence[str] | None = None,
                  progress: Progress | None = None, overwrite: bool = False, device: str = Device.CPU,
                  threads: int | None = None, graph_optimization_level: str = "extended",
                  fp16_fixed_vae: bool = False, optimization_level: int = 3, refittable: bool = False,
                  strongly_typed: bool = False, workspace_mb: int | None = None,
                  timing_cache: str | os.PathLike[str] | None = None, verify: bool = True,
                  int8_recipe: str | None = None, calibration_size: Size | None = None,
                  calibration_steps: int = INT8_CALIBRATION_STEPS, calibration_guidance: float | None = None,
                  calibration: Calibration | Sequence[Feed] | str | os.PathLike[str] | None = None,
                  prompt_windows: int = PROMPT_WINDOWS, static_shapes: bool = False,
                  component_precisions: Mapping[str, str] | None = None) -> Path:
    """Build engines for an ONNX export into `out_dir` and return it.

    Args:
        onnx_dir: folder written by `latentrt export` (manifest.json + one folder per component).
        out_dir: engine folder to write (replaced atomically when the build succeeds).
        backend: "onnxruntime" (CPU / CUDA EP), "tensorrt" or "openvino" (CPU; `latentrt.choices.BuildBackend`).
        sizes: (height, width) pixel sizes the TensorRT profiles cover (default: the family's buckets).
        batch: (min, max) images per prompt.
        strategy / groups: profile strategy ("dynamic", "per-bucket", "grouped") and group count.
        cfg: plan the UNet batch for classifier-free guidance (default: the family's default).
        opt_batch: per-prompt batch the TensorRT kernels are tuned for.
        precision: "fp16", "fp32", "bf16" or "int8" (default: fp16 for TensorRT and the CUDA EP, fp32 on the CPU).
            "int8" (ONNX Runtime on the CPU, OpenVINO): fp32 engines with an int8 UNet quantized from the export
            (OpenVINO: by NNCF). "bf16" (OpenVINO only): fp32 IR compiled with the bf16 inference precision hint.
        plan_only: plan and log the profiles, write nothing.
        components: build only these (others are kept from a previous build of the same export).
        progress: called with a BuildEvent when each component starts and ends.
        overwrite: rebuild the selected components even when unchanged, and replace an output folder that
            holds something else.
        device / threads / graph_optimization_level: ONNX Runtime settings.
        fp16_fixed_vae: the SDXL VAE is an fp16-fixed one: build it in fp16.
        optimization_level / refittable / strongly_typed / workspace_mb / timing_cache: TensorRT settings.
        verify: run each ONNX Runtime engine once against its source graph.
        int8_recipe: with precision "int8", a name from `engines.recipes.RECIPES` (default "static-qdq-mha").
        calibration_size / calibration_steps: how static int8 recipes' feeds were recorded (fp32 sampling at
            this (height, width) and step count; default the native size capped to 256 px, 4 steps).
        calibration_guidance: their guidance scale (default: the family's); 1 for a no-guidance workload
            such as 1-step Turbo sampling, whose latents an int8 VAE decoder must be calibrated on.
        calibration: static int8 recipes: the recorded UNet input feeds (a `Calibration`, a sequence of
            {input name: array}, or a `.npz` file from `Calibration.save`). This stage never samples:
            `latentrt.workflows.build.build_engines` records them (fp32 sampling runs) and calls this.
        prompt_windows: the most 75-token prompt windows the TensorRT profiles cover (UNet context
            77 x windows; default 3). ONNX Runtime engines take any number the export does.
        static_shapes: OpenVINO: record the planned sizes; the runtime compiles a static-shape copy of each
            spatial engine for a request at one of them.
        component_precisions: OpenVINO: per-component precision overrides, e.g. {"vae_decoder": "bf16"}.
    """
    if backend not in values(BuildBackend):
        raise BuildError(f"unknown backend {backend!r}; choose one of {', '.join(values(BuildBackend))}")
    if precision is not None and precision not in values(Precision):
        raise BuildError(f"unknown precision {precision!r}; choose one of {', '.join(values(Precision))}")
    if device not in values(Device):
        raise BuildError(f"unknown device {device!r}; choose one of {', '.join(values(Device))}")
    _check_openvino_only(backend, precision, static_shapes, component_precisions)
    if precision != Precision.INT8 and int8_recipe is not None:
        raise BuildError("an int8 recipe needs --precision int8")
    _check_calibration_used(precision, int8_recipe, calibration)
    export = read_onnx_export(onnx_dir)
    int8 = None if precision != Precision.INT8 else int8_options(export.spec, backend, device, int8_recipe,
                                                                 calibration_size, calibration_steps, calibration,
                                                                 calibration_guidance)
    plan = plan_for_export(export, sizes=sizes, batch=batch, strategy=strategy, groups=groups, cfg=cfg,
                           opt_batch=opt_batch, components=components, prompt_windows=prompt_windows)
    if plan_only:
        log.info("%s", format_plan(plan))
        return Path(out_dir)
    openvino = backend == BuildBackend.OPENVINO  # OpenVINO quantizes in its builder: no ONNX Runtime int8 pass
    base = Precision.FP32 if int8 is not None and not openvino else precision or default_precision(backend, device)
    opts = BuildOptions(BuildBackend(backend), Precision(base), Device(device), threads, graph_optimization_level,
                        fp16_fixed_vae, optimization_level, refittable, strongly_typed, workspace_mb, timing_cache,
                        verify, static_shapes, dict(component_precisions or {}), int8 if openvino else None)
    builder = builder_for(opts)
    gpu = builder.check_available()
    out = Path(os.path.abspath(out_dir))  # "." has no name to stage or lock beside
    if out.resolve() == export.folder.resolve():
        raise OutputConflict(f"the engine folder {out} is the ONNX folder; choose another -o")
    with removed_if_failed(out.parent), output_lock(check_writable(out.parent) / out.name):
        _build_locked(export, out, plan, builder, gpu, int8, overwrite, progress,
                      dict(sizes=sizes, batch=batch, strategy=strategy, groups=groups, cfg=cfg, opt_batch=opt_batch,
                           prompt_windows=prompt_windows))
    log.info("wrote %s engines for %s to %s", opts.backend.value, export.spec.name, out)
    return out


def _check_openvino_only(backend: str, precision: str | None, static_shapes: bool,
                         component_precisions: Mapping[str, str] | None) -> None:
    """OpenVINO-only settings given to another backend: BuildError (never silently ignored)."""
    if backend == BuildBackend.OPENVINO:
        return
    if precision == Precision.BF16:
        raise BuildError(f"--precision bf16 is an OpenVINO precision (the CPU's bf16 inference hint); use --backend "
                         f"openvino, or fp16/fp32 with --backend {backend}")
    if static_shapes or component_precisions:
        raise BuildError(f"--static and --component-precision are OpenVINO settings (--backend openvino), not "
                         f"{backend}")


def _check_calibration_used(precision: str | None, recipe: str | None, calibration: object) -> None:
    """Recorded feeds given to a build that would not use them: BuildError (never silently ignored)."""
    if calibration is None:
        return
    if precision != Precision.INT8:
        raise BuildError(f"--calibration-feeds needs --precision int8 with a static recipe (got precision "
                         f"{precision or 'default'})")
    name = recipe or DEFAULT_RECIPE
    if name in RECIPES and RECIPES[name].method != "static":
        raise BuildError(f"--calibration-feeds needs --precision int8 with a static recipe (static-*); {name} "
                         "quantizes without calibration")


def _build_locked(export: OnnxExport, out: Path, plan: ProfilePlan, builder: Builder, gpu: GpuInfo | None,
                  int8: Int8Options | None, overwrite: bool, progress: Progress | None,
                  planning: dict[str, Any]) -> None:
    """The build proper, run while holding the output folder's lock."""
    previous = _previous_build(export, out, overwrite)
    outdated = _outdated_kept(previous, export, builder.options, gpu, plan.components, out)
    if int8 is not None and "unet" in export.ios and "unet" not in plan.components \
            and not same_int8(previous, int8):
        outdated.append("unet")  # the kept UNet is not the int8 UNet asked for
    if outdated:
        plan = plan_for_export(export, **planning, components=[*plan.components, *outdated])
    verify_export(export, plan.components)
    check_onnx_files(export, plan.components)
    with staging_dir(out) as tmp:
        entries = _kept_entries(previous, builder.backend, plan.components, list(export.ios), out, tmp)
        reusable = None if overwrite else previous
        quantize = int8 is not None and "unet" in plan.components and builder.backend != BuildBackend.OPENVINO
        total = len(plan.components) + quantize
        for i, c in enumerate(plan.components):
            entries[c] = _build_component(export, plan, c, tmp, builder, gpu, reusable, out, (i, total), progress)
        files = copy_files(export, tmp)
        ordered = {c: entries[c] for c in export.ios if c in entries}
        manifest = engine_manifest(export, plan, builder.options, gpu, ordered, files)
        if int8 is not None and builder.backend != BuildBackend.OPENVINO:  # OpenVINO's builder quantized it
            manifest = int8_manifest(export, manifest, tmp, int8, quantize, previous, (total - 1, total), progress)
        atomic_write_json(tmp / MANIFEST, sealed({**manifest, "written": written_files(tmp)}))
        publish_modes(tmp)
        move_into_place(tmp, out)


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
                   gpu: GpuInfo | None, building: Sequence[str], out: Path) -> list[str]:
    """Components not asked for whose previous engine no longer fits: they are rebuilt too.

    An engine is outdated when the export's component changed since it was built (its ONNX hash), when
    its files are missing or changed, or (TensorRT) when it was built by another TensorRT version or for a
    GPU of another compute capability.
    """
    if previous is None or previous.get("backend") != opts.backend:
        return []
    machine = builder_for(opts).machine_fields(gpu)
    outdated = []
    for c, entry in previous.get("components", {}).items():
        if c in building or c not in export.ios:
            continue
        want = {"onnx_sha256": export.manifest["components"][c]["sha256"], **machine}
        key = entry.get("key") if isinstance(entry, Mapping) else None
        why = [f"{f} differs" for f, v in want.items() if not isinstance(key, Mapping) or key.get(f) != v]
        if not why and (not (out / c).is_dir() or sha256_tree(out / c) != entry.get("sha256")):
            why = ["its files are missing or changed"]
        if why:
            log.warning("%s: the previous engine is outdated (%s); rebuilding it too", c, ", ".join(why))
            outdated.append(c)
    return outdated


def _trt_version(opts: BuildOptions) -> str | None:
    """The TensorRT version the options' engines are tied to (None for ONNX Runtime)."""
    return builder_for(opts).tool_version()


def _kept_entries(previous: Mapping[str, Any] | None, backend: BuildBackend, building: Sequence[str],
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


def _build_component(export: OnnxExport, plan: ProfilePlan, c: str, tmp: Path, builder: Builder,
                     gpu: GpuInfo | None, previous: Mapping[str, Any] | None, out: Path,
                     position: tuple[int, int], progress: Progress | None) -> dict[str, Any]:
    """Build (or reuse) one component's engine into `tmp/c` and return its manifest entry."""
    opts = builder.options
    if opts.backend == BuildBackend.OPENVINO:
        prec = ov_component_precision(c, opts.precision, opts.component_precisions,
                                      native_bf16=opts.precision == Precision.INT8 and cpu_native_bf16())
    else:
        prec = component_precision(export.spec, c, opts.precision, fp16_fixed_vae=opts.fp16_fixed_vae)
    io, profiles = builder.engine_io(plan, c, export.ios[c])
    fields = builder.cache_key(export.manifest["components"][c]["sha256"], prec, profiles, gpu)
    key = digest(fields)
    event = BuildEvent(c, position[0], position[1], "start", builder.backend.value, prec.precision.value,
                       {"note": prec.note})
    reused = _reuse(previous, c, key, out, tmp)
    if reused is not None:
        emit(progress, event, "reused", reused)
        return reused
    emit(progress, event, "start", {"note": prec.note, "profiles": len(profiles)})
    dest = tmp / c
    dest.mkdir(parents=True, exist_ok=True)
    details = builder.build(export.model_path(c), export.ios[c], [dict(p.shapes[c]) for p in plan.profiles], dest,
                            prec)
    engine = dest / builder.engine_file
    entry = {"path": f"{c}/{builder.engine_file}", "io": io_to_json(io), "precision": prec.precision.value,
             "fp32_islands": prec.note, "profiles": profiles, "cache_key": key, "key": fields,
             "sha256": sha256_tree(dest), "size_mb": round(tree_bytes(dest) / 2**20, 3),
             "size_bytes": engine.stat().st_size, **details}
    emit(progress, event, "done", entry)
    return entry


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


def engine_manifest(export: OnnxExport, plan: ProfilePlan, opts: BuildOptions, gpu: GpuInfo | None,
                    components: Mapping[str, Any], files: Mapping[str, str]) -> dict[str, Any]:
    """The engine folder's manifest: content-addressed (hashes, cache keys) and self-describing (tools, plan, IO)."""
    builder = builder_for(opts)
    tools = tool_versions()
    version = builder.tool_version()
    if version:
        tools[builder.backend.value] = version
    int8 = any(c.get("precision") == Precision.INT8 for c in components.values())
    return {
        "kind": ENGINE_KIND,
        "schema": SCHEMA,
        "backend": opts.backend.value,
        "family": export.spec.name,
        "source": {"onnx_dir": str(export.folder.resolve()), "onnx_manifest_sha256": export.manifest_sha256,
                   "model": export.manifest.get("source")},
        "model": export.manifest.get("model"),
        "tools": tools,
        "gpu": dict(gpu) if gpu else None,
        # a partial fp32 rebuild keeps an int8 UNet: the folder is then still an int8 engine set
        "precision": Precision.INT8.value if int8 else opts.precision.value,
        "plan": builder.plan_info(plan),
        "components": dict(components),
        "files": dict(files),
        **({STEP_CACHE: export.manifest[STEP_CACHE]} if STEP_CACHE in export.manifest else {}),  # unet_shallow's split
        **({TINY_VAE: export.manifest[TINY_VAE]} if TINY_VAE in export.manifest else {}),  # tiny_vae_decoder's scaling
    }
