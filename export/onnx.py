"""Checkpoint -> ONNX: export each component, fold constants, check parity in ONNX Runtime, write a manifest.

Layout of an export folder (everything the runtime needs, nothing from the checkpoint folder):
    OUT/manifest.json                       (latentrt.onnx, schema 1; written last)
    OUT/<component>/model.onnx [+ model.onnx.data when the model is over ~2 GB]
    OUT/tokenizer/, OUT/tokenizer_2/, OUT/scheduler/   (copied from the checkpoint)
The whole folder is written into a staging folder beside OUT (components kept from a previous
export of the same model are hard-linked in) and swapped into place when complete; an interrupted
export leaves OUT as it was. One run at a time writes OUT (`latentrt.outputs.output_lock`), and it
replaces only a folder LatentRT wrote (`latentrt.outputs.check_replaceable`). The checkpoint folder
is read only when it holds no symlink out of it (`latentrt.paths.check_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentrt.errors import (
    CheckpointError,
    ExportMismatch,
    InvalidRequest,
    MissingComponent,
    OutputConflict,
    StaleArtifact,
)
from latentrt.manifest import (
    MANIFEST,
    ONNX_KIND,
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
from latentrt.parity import ParityReport, Tolerance, compare, merge
from latentrt.paths import check_checkpoint
from latentrt.reference.models import (
    CheckpointRef,
    LoadedModel,
    check_opset,
    load_checkpoint,
    locate_checkpoint,
)
from latentrt.reference.wrappers import wrap
from latentrt.step_cache import SHALLOW
from latentrt.tensors import (
    DIM_BATCH,
    DIM_LATENT_HEIGHT,
    DIM_LATENT_WIDTH,
    DIM_SEQUENCE,
    DIM_TOKENS,
    DIM_UNET_BATCH,
    INPUT_IDS,
    ComponentIO,
    Dim,
    Scaled,
    Sizes,
    describe_shape,
    dummy_inputs,
    dynamic_axes,
    io_to_json,
    shape_of,
)
from latentrt.tiny_vae import TINY_VAE_DECODER

from .step_cache import check_components as check_step_cache_components
from .step_cache import manifest_record as step_cache_record
from .step_cache import step_cache_parts
from .tiny_vae import locate_for as locate_tiny_vae
from .tiny_vae import manifest_record as tiny_vae_record
from .tiny_vae import split_components, tiny_vae_part

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXTERNAL_DATA_MB = 1800.0  # protobuf cannot serialize >= 2 GiB: larger models keep weights in DATA_FILE
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's opset 17 graphs are rejected by ONNX Runtime (Split num_outputs)
EXPORT_SIZES = {DIM_BATCH: 2, DIM_UNET_BATCH: 2, DIM_LATENT_HEIGHT: 8, DIM_LATENT_WIDTH: 8}  # tracing (batch >= 2)
BOS_ID, EOS_ID = 49406, 49407


TOLERANCE = Tolerance(atol=1e-4, rtol=1e-4)  # fp32 ONNX Runtime against fp32 PyTorch


def parity_sizes(io: ComponentIO) -> list[dict[str, int]]:
    """The shapes parity is checked at: batch 1 and 2, square and non-square latents, longer context."""
    if DIM_TOKENS in io.dims:
        t = io.dims[DIM_TOKENS].max
        return [{DIM_BATCH: 1, DIM_TOKENS: t}, {DIM_BATCH: 2, DIM_TOKENS: t}, {DIM_BATCH: 2, DIM_TOKENS: min(t, 20)}]
    if DIM_UNET_BATCH in io.dims:
        sizes = [{DIM_UNET_BATCH: 1, DIM_LATENT_HEIGHT: 16, DIM_LATENT_WIDTH: 16},
                 {DIM_UNET_BATCH: 2, DIM_LATENT_HEIGHT: 16, DIM_LATENT_WIDTH: 24}]
        if DIM_SEQUENCE in io.dims:  # a cross-attention context: one prompt window, then two
            seq = io.dims[DIM_SEQUENCE].min
            sizes[0][DIM_SEQUENCE], sizes[1][DIM_SEQUENCE] = seq, 2 * seq
        return sizes
    return [{DIM_BATCH: 1, DIM_LATENT_HEIGHT: 16, DIM_LATENT_WIDTH: 16},
            {DIM_BATCH: 2, DIM_LATENT_HEIGHT: 24, DIM_LATENT_WIDTH: 16}]


def example_feed(io: ComponentIO, sizes: Sizes, seed: int) -> dict[str, np.ndarray]:
    """Random inputs; token ids look like real prompts (BOS, words, EOS, padding) so CLIP pools at EOS."""
    feed = dummy_inputs(io, sizes, seed=seed)
    if INPUT_IDS in feed and io.input(INPUT_IDS).high is None:  # CLIP; bounded ids (LDM-BERT) stay below the vocab
        ids = feed[INPUT_IDS] % 49000
        rng = np.random.default_rng(seed)
        for row in ids:
            end = int(rng.integers(1, row.shape[0])) if row.shape[0] > 1 else 0
            row[0], row[end:] = BOS_ID, EOS_ID
        feed[INPUT_IDS] = ids
    return feed


# ---------------------------------------------------------------------------- export of one component


def export_component(module: torch.nn.Module, io: ComponentIO, folder: Path, *, opset: int, dynamo: bool,
                     external_data_mb: float = EXTERNAL_DATA_MB) -> Path:
    """Export one wrapped component into `folder`/model.onnx (folded, checked); returns the model path."""
    raw = folder.parent / f".{folder.name}.raw"
    raw.mkdir(parents=True, exist_ok=True)
    feed = example_feed(io, EXPORT_SIZES, seed=0)
    args = tuple(torch.from_numpy(feed[n]) for n in io.input_names)
    try:
        with torch.no_grad():
            if dynamo:
                _export_dynamo(module, args, io, raw / MODEL_FILE, opset)
            else:
                _export_torchscript(module, args, io, raw / MODEL_FILE, opset)
        folder.mkdir(parents=True, exist_ok=True)
        return finalize(raw / MODEL_FILE, folder / MODEL_FILE, external_data_mb)
    finally:
        shutil.rmtree(raw, ignore_errors=True)


def _export_torchscript(module: torch.nn.Module, args: tuple[torch.Tensor, ...], io: ComponentIO, path: Path,
                        opset: int) -> None:
    torch.onnx.export(module, args, str(path), input_names=io.input_names, output_names=io.output_names,
                      dynamic_axes=dynamic_axes(io), opset_version=opset, do_constant_folding=True, dynamo=False)


def dynamic_shapes(io: ComponentIO) -> tuple[dict[int, Any], ...]:
    """torch.export `dynamic_shapes` from the IO spec, one dict per input: one named `torch.export.Dim` per
    symbolic dim, shared by name across inputs, with the spec's [min, max]; a scaled axis (image = factor x
    latent) is that multiple of its base dim.

    torch.export specializes sizes 0 and 1, so a lower bound of 1 is declared as 2 (the graph it writes
    still runs at 1: parity checks batch 1); a dim whose range ends below 2 stays static.
    """
    from torch.export import Dim as ExportDim

    dims = {name: ExportDim(name, min=max(2, d.min), max=d.max) for name, d in io.dims.items() if d.max >= 2}

    def axis(a: Dim | Scaled) -> Any:
        base, factor = (a.base, a.factor) if isinstance(a, Scaled) else (a, 1)
        dim = dims.get(base.name)
        return None if dim is None else dim * factor if factor != 1 else dim

    return tuple({i: ax for i, a in enumerate(t.shape) if not isinstance(a, int) and (ax := axis(a)) is not None}
                 for t in io.inputs)


def by_signature(module: torch.nn.Module, shapes: tuple[dict[int, Any], ...]) -> tuple[Any, ...]:
    """`dynamic_shapes` laid out as `forward` takes its arguments: the inputs a `*args` parameter collects
    (the UNet's conditioning) become one tuple."""
    params = inspect.signature(module.forward).parameters.values()
    if not any(p.kind is p.VAR_POSITIONAL for p in params):
        return shapes
    n = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    return (*shapes[:n], shapes[n:]) if shapes[n:] else shapes[:n]  # none collected: torch.export wants no entry


def _export_dynamo(module: torch.nn.Module, args: tuple[torch.Tensor, ...], io: ComponentIO, path: Path,
                   opset: int) -> None:
    """torch.export-based export with `dynamic_shapes` built from the IO spec; InvalidRequest where it fails."""
    shapes = by_signature(module, dynamic_shapes(io))
    try:
        program = torch.onnx.export(module, args, input_names=io.input_names, output_names=io.output_names,
                                    dynamic_shapes=shapes, opset_version=opset, dynamo=True, optimize=True,
                                    verbose=False)
    except Exception as e:  # noqa: BLE001 - torch.export reports untraceable models with many exception types
        detail = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise InvalidRequest(f"the dynamo exporter cannot export {io.component} ({type(e).__name__}: "
                             f"{detail[:300]}); export without --dynamo (the TorchScript exporter)") from None
    if program is None:
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
    program.save(str(path), external_data=True)


def finalize(raw_path: Path, out_path: Path, external_data_mb: float) -> Path:
    """Fold constants, drop dead nodes, save as one file (or one file + one weights file) and check it."""
    import onnx
    import onnxruntime as ort
    from polygraphy.backend.onnx.loader import FoldConstants
    from polygraphy.logger import G_LOGGER

    model = onnx.load(str(raw_path))
    weights_mb = _initializer_bytes(model) / 2**20
    small = weights_mb < EXTERNAL_DATA_MB  # in-memory shape inference serializes the model (< 2 GiB only)
    ort.set_default_logger_severity(3)  # folding runs ORT sessions whose optimizer warnings are noise here
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        model = FoldConstants(model, do_shape_inference=small, error_ok=True,
                              allow_onnxruntime_shape_inference=False)()
    if weights_mb >= external_data_mb:
        onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(model, str(out_path))
    onnx.checker.check_model(str(out_path))
    return out_path


def _initializer_bytes(model: Any) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


# ---------------------------------------------------------------------------- parity


def parity_runs(module: torch.nn.Module, io: ComponentIO, model_path: Path,
                tolerance: Tolerance = TOLERANCE) -> list[tuple[dict[str, int], ParityReport]]:
    """Run ONNX Runtime (CPU) and PyTorch on fresh random inputs at several shapes (`latentrt.parity.compare`);
    ExportMismatch at the first shape where an output differs beyond `tolerance`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    runs = []
    for i, sizes in enumerate(parity_sizes(io)):
        feed = example_feed(io, sizes, seed=100 + i)
        got = dict(zip(io.output_names, (np.asarray(x) for x in session.run(io.output_names, feed))))
        with torch.no_grad():
            out = module(*(torch.from_numpy(feed[n]) for n in io.input_names))
        ref = {spec.name: r.numpy() for spec, r in zip(io.outputs, out if isinstance(out, (tuple, list)) else (out,))}
        where = describe_sizes(sizes)
        for spec in io.outputs:
            g, r = got[spec.name], ref.get(spec.name)
            if r is None or g.shape != r.shape or g.shape != shape_of(spec, sizes):
                raise ExportMismatch(io.component, spec.name, float("inf"), 0.0, f"{where} (ONNX gave shape "
                                     f"{g.shape}, PyTorch {None if r is None else r.shape}, spec {describe_shape(spec)})")
        report = compare(got, ref, tolerance, context=where).raise_if_failed(io.component)
        runs.append((dict(sizes), report))
    return runs


def check_parity(module: torch.nn.Module, io: ComponentIO, model_path: Path,
                 tolerance: Tolerance = TOLERANCE) -> list[dict[str, Any]]:
    """`parity_runs` as the manifest records them: per shape, the sizes and each output's max |diff|."""
    return [parity_check_json(sizes, report) for sizes, report in parity_runs(module, io, model_path, tolerance)]


def parity_check_json(sizes: Sizes, report: ParityReport) -> dict[str, Any]:
    return {"sizes": dict(sizes), "max_abs_diff": {t.name: t.max_abs_diff for t in report.tensors}}


def describe_sizes(sizes: Sizes) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


# ---------------------------------------------------------------------------- whole export


def check_output(out: Path, ref: CheckpointRef, overwrite: bool) -> dict[str, Any] | None:
    """Refuse to mix models in one folder or to replace what LatentRT did not write.

    Returns the previous manifest when `out` holds an export of the same model (its components are kept).
    """
    if check_replaceable(out, "export") is None:
        return None
    try:
        old = read_manifest(out, ONNX_KIND)
    except (StaleArtifact, MissingComponent) as e:
        if overwrite:
            return None
        raise OutputConflict(f"{out} holds another kind of artifact or an unusable export ({e}); choose another "
                             "folder or pass --overwrite") from None
    same = old.get("source", {}).get("sha256") == ref.sha256 and old.get("family") == ref.spec.name
    if not same and not overwrite:
        raise OutputConflict(f"{out} already holds the export of {old.get('source', {}).get('model')!r} "
                             f"({old.get('family')}); choose another folder or pass --overwrite")
    return old if same else None


def export_model(model: str | Path, out_dir: str | Path, *, family: str | None = None, opset: int = 17,
                 dynamo: bool = False, verify: bool = True, components: Sequence[str] | None = None,
                 progress: Progress | None = None, overwrite: bool = False,
                 external_data_mb: float = EXTERNAL_DATA_MB, config: str | Path | None = None,
                 step_cache: int | None = None, tiny_vae: str | Path | None = None) -> Path:
    """Export a checkpoint (tiny:<family>, diffusers folder, hub id, single file) to ONNX under `out_dir`.

    Returns `out_dir`.

    Args:
        model: what to export; see `latentrt.reference.models.load_checkpoint`.
        out_dir: the export folder (created; refused if it holds another model's export unless `overwrite`).
        family: the family id, overriding detection from the checkpoint's configs.
        opset: ONNX opset (raised to 18 for the dynamo exporter).
        dynamo: use torch.export-based exporter instead of the TorchScript one (default, faster here).
        verify: compare every component with PyTorch in ONNX Runtime at several shapes.
        components: a subset of the family's components (default: all).
        progress: called with one human-readable line per step (the CLI prints them).
        overwrite: replace an export of a different model.
        external_data_mb: weights above this size go into `model.onnx.data` beside `model.onnx`.
        config: for a single original-layout `.safetensors` file, the diffusers folder (or hub id) of the
            same family whose configs describe it (see `latentrt.reference.single_file`).
        step_cache: the DeepCache branch depth (1): export the UNet with its deep feature and `unet_shallow`
            (`latentrt.export.step_cache`); None: the plain UNet.
        tiny_vae: a diffusers AutoencoderTiny folder or hub id (TAESD): also export its decoder as the component
            `tiny_vae_decoder` (`latentrt.export.tiny_vae`); `latentrt generate --tiny-vae` decodes with it.
    """
    if dynamo and isinstance(opset, int) and not isinstance(opset, bool) and opset < DYNAMO_MIN_OPSET:
        log.info("dynamo exporter: raising opset %d to %d", opset, DYNAMO_MIN_OPSET)
        opset = DYNAMO_MIN_OPSET
    check_opset(opset, dynamo)  # before any work, like `latentrt export`
    say = progress or (lambda _msg: None)
    out = Path(os.path.abspath(Path(out_dir).expanduser()))  # "." has no name to stage or lock beside
    with removed_if_failed(out.parent):  # a failed export leaves no folder the user did not have
        _export_locked(model, out, family, config, components, overwrite, opset, dynamo, verify, external_data_mb,
                       say, step_cache, tiny_vae)
    say(f"wrote {out}")
    return out


def _export_locked(model: str | Path, out: Path, family: str | None, config: str | Path | None,
                   components: Sequence[str] | None, overwrite: bool, opset: int, dynamo: bool, verify: bool,
                   external_data_mb: float, say: Progress, step_cache: int | None = None,
                   tiny_vae: str | Path | None = None) -> None:
    """The export proper: checks, then staging and swap while holding the output folder's lock."""
    check_writable(out.parent)  # the export is staged beside `out` and swapped in: `out` is created only then
    check_checkpoint(model)
    ref = locate_checkpoint(model, family, config)
    check_checkpoint(ref.folder)
    components, tiny_only = split_components(components, tiny_vae)
    wanted = [] if tiny_only else _select(ref, components)
    tiny = locate_tiny_vae(ref, tiny_vae) if tiny_vae is not None else None  # checked before any weights load
    check_step_cache_components(step_cache, wanted)
    with output_lock(out):
        previous = check_output(out, ref, overwrite)
        say(f"loading {ref.source} ({ref.folder})")
        loaded = load_checkpoint(ref)
        split, parts = step_cache_parts(loaded, step_cache) if step_cache is not None else (None, {})
        if parts:  # the step-cached UNet replaces the plain one; its shallow part follows it
            wanted = [c for name in wanted for c in ([name, SHALLOW] if name in parts else [name])]
        if tiny is not None:  # the tiny VAE decoder (TAESD) follows the family's components
            parts[TINY_VAE_DECODER] = tiny_vae_part(loaded, tiny)
            wanted = [*wanted, TINY_VAE_DECODER]
        say(f"family {loaded.spec.name} ({loaded.spec.title}); exporting {', '.join(wanted)}")
        with staging_dir(out) as stage:
            entries = {}
            for i, name in enumerate(wanted, 1):
                entries[name] = _export_one(loaded, name, stage, opset=opset, dynamo=dynamo, verify=verify,
                                            external_data_mb=external_data_mb, say=say, step=f"[{i}/{len(wanted)}]",
                                            part=parts.get(name))
            entries.update(_keep_previous(previous, entries, out, stage))
            files = _copy_support_files(loaded, stage)
            record = step_cache_record(split, entries, previous) | tiny_vae_record(tiny, entries, previous)
            _publish(stage, out, _manifest(loaded, opset, dynamo, entries, files, stage) | record)


def _select(ref: CheckpointRef, components: Sequence[str] | None) -> list[str]:
    known = list(ref.spec.components)
    if not components:
        return known
    unknown = [c for c in components if c not in known]
    if unknown:
        raise CheckpointError(f"{ref.spec.name} has no component(s) {', '.join(unknown)}; "
                              f"choose among {', '.join(known)}")
    return [c for c in known if c in components]


def _export_one(loaded: LoadedModel, name: str, stage: Path, *, opset: int, dynamo: bool, verify: bool,
                external_data_mb: float, say: Progress, step: str,
                part: tuple[torch.nn.Module, ComponentIO] | None = None) -> dict[str, Any]:
    """Export, check and describe one component: the family's own wrapper, or `part` (module, IO) when given."""
    module, io = part if part is not None else (wrap(name, loaded), loaded.ios()[name])
    say(f"{step} {name} …")
    start = time.perf_counter()
    try:
        path = export_component(module, io, stage / name, opset=opset, dynamo=dynamo,
                                external_data_mb=external_data_mb)
    except InvalidRequest as e:  # the dynamo exporter's refusal, named with the family
        raise InvalidRequest(f"family {loaded.spec.name}: {e}") from None
    export_s = time.perf_counter() - start
    runs = parity_runs(module, io, path) if verify else []
    checks = [parity_check_json(sizes, report) for sizes, report in runs]
    report = merge((r for _, r in runs), context=f"ONNX Runtime vs PyTorch at {len(runs)} shapes") if runs else None
    worst = max((r.max_abs_diff for _, r in runs), default=None)
    size_mb = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file()) / 2**20
    verdict = f", parity max|diff| {worst:.1e} ✓ ({len(checks)} shapes)" if worst is not None else ", parity not checked"
    say(f"{step} {name} {export_s:.1f} s, {size_mb:.1f} MB{verdict}")
    return {"path": f"{name}/{MODEL_FILE}", "io": io_to_json(io), "sha256": sha256_tree(path.parent),
            "size_mb": round(size_mb, 3), "export_s": round(export_s, 3),
            "parity": {"tolerance": dataclasses.asdict(TOLERANCE), "checks": checks,
                       **({"report": report.to_json()} if report is not None else {})}}


def _copy_support_files(loaded: LoadedModel, stage: Path) -> dict[str, str]:
    """Copy the tokenizers and the scheduler config so the runtime needs only the export folder."""
    names = [te.tokenizer for te in loaded.spec.text_encoders] + ["scheduler"]
    if loaded.spec.image_encoder is not None:  # issue 12 (H4): the image processor (resize, crop, normalize)
        names.append(loaded.spec.image_encoder.processor)
    out = {}
    for name in names:
        shutil.copytree(loaded.folder / name, stage / name, dirs_exist_ok=True)
        out[name] = sha256_tree(stage / name)
    return out


def _keep_previous(previous: Mapping[str, Any] | None, entries: Mapping[str, Any], out: Path,
                   stage: Path) -> dict[str, Any]:
    """A partial re-export of the same model keeps the components it did not redo (hard-linked into `stage`)."""
    kept = {}
    for name, entry in (previous or {}).get("components", {}).items():
        if name == SHALLOW and "unet" in entries:  # the shallow part belongs to the UNet it was split from
            continue
        if name not in entries and (out / entry["path"]).is_file():
            link_tree(out / name, stage / name)
            kept[name] = entry
    return kept


def _manifest(loaded: LoadedModel, opset: int, dynamo: bool, entries: Mapping[str, Any], files: dict[str, str],
              stage: Path) -> dict[str, Any]:
    order = [c for c in (*loaded.spec.components, SHALLOW, TINY_VAE_DECODER) if c in entries]
    return sealed({
        "kind": ONNX_KIND, "schema": SCHEMA, "family": loaded.spec.name,
        "source": {"model": loaded.source, "sha256": loaded.source_sha256},
        "model": {"dims": dataclasses.asdict(loaded.dims), **loaded.info},
        "opset": opset, "exporter": "dynamo" if dynamo else "torchscript", "tools": tool_versions(),
        "components": {c: entries[c] for c in order}, "files": files, "written": written_files(stage),
    })


def _publish(stage: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest into the finished `stage` and swap it in for `out` (renames only)."""
    atomic_write_json(stage / MANIFEST, manifest)
    publish_modes(stage)  # copied tokenizer/scheduler files keep their source's (maybe private) modes
    move_into_place(stage, out)
