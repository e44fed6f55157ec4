"""Optimum ONNX folder -> LatentRT ONNX export: map names and layout, check parity, write a manifest.

Hugging Face Optimum (`optimum-cli export onnx --task text-to-image`, `ORTStableDiffusion*Pipeline.save_pretrained`)
writes one folder per part (text_encoder/, text_encoder_2/, unet/, vae_encoder/, vae_decoder/, each
`model.onnx` + `config.json`) beside the pipeline's model_index.json, scheduler/ and tokenizer(s). Its graphs
compute what LatentRT's do but under other names (optimum/exporters/onnx/model_configs.py; see
docs/optimum-onnx.md): the VAE takes `sample` / `latent_sample`, the text encoders give every hidden state
(`last_hidden_state`, `hidden_states.N`) where LatentRT keeps the one its family uses, and the UNet's
`timestep` may be int64 or a scalar. Each graph is wrapped by a few ONNX nodes (Identity, Cast, Slice) so
it has exactly LatentRT's IO (`latentrt.tensors.component_ios`); what cannot be mapped is refused by name.
The family and widths come from the folder's configs (or from `checkpoint`, whose PyTorch parts then
check every imported graph like `latentrt export` does: `latentrt.parity.compare`, 1e-4 + 1e-4 * max|ref|).
The output is written like an export: staged beside OUT, swapped in, under OUT's lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from latentrt.configs import check_scheduler_config
from latentrt.errors import CheckpointError, ExportMismatch
from latentrt.families import FamilySpec, HiddenState
from latentrt.manifest import sha256_tree, staging_dir
from latentrt.outputs import output_lock, removed_if_failed
from latentrt.parity import compare, merge
from latentrt.paths import check_checkpoint
from latentrt.reference.models import (
    CheckpointRef,
    LoadedModel,
    check_folder,
    load_checkpoint,
    locate_checkpoint,
    model_dims,
    model_index,
    part_config,
    read_json,
    runtime_info,
)
from latentrt.reference.wrappers import wrap
from latentrt.tensors import (
    HIDDEN_STATES,
    IMAGES,
    LATENT,
    LATENT_PARAMETERS,
    OUT_SAMPLE,
    TIMESTEP,
    ComponentIO,
    Dim,
    Scaled,
    TensorSpec,
    describe_shape,
    io_to_json,
    shape_of,
)

from .onnx import (
    EXTERNAL_DATA_MB,
    MODEL_FILE,
    TOLERANCE,
    Progress,
    _copy_support_files,
    _manifest,
    _publish,
    check_output,
    describe_sizes,
    example_feed,
    finalize,
    parity_check_json,
    parity_sizes,
)

log = logging.getLogger(__name__)

PREFIX = "optimum::"  # Optimum's IO names are renamed to PREFIX + name inside the wrapped graph
# LatentRT name -> Optimum name, per component, where they differ (optimum/exporters/onnx/model_configs.py)
INPUT_NAMES = {"vae_encoder": {IMAGES: "sample"}, "vae_decoder": {LATENT: "latent_sample"}}
OUTPUT_NAMES = {"vae_decoder": {IMAGES: "sample"}, "unet": {OUT_SAMPLE: "out_sample"},
                "vae_encoder": {LATENT_PARAMETERS: "latent_parameters"}}
FLOAT = 1  # onnx.TensorProto.FLOAT
ELEM_TYPES = {"float32": 1, "int64": 7, "int32": 6, "float16": 10}


def is_optimum_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether `folder` has Optimum's diffusion layout (unet/ and vae_decoder/ holding model.onnx)."""
    path = Path(folder)
    return all((path / part / MODEL_FILE).is_file() for part in ("unet", "vae_decoder"))


# ---------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class Source:
    """An Optimum folder's family and widths (from its configs or a checkpoint) and the PyTorch parts, if given."""

    folder: Path
    loaded: LoadedModel  # modules empty without a checkpoint
    sha256: str


def config_view(folder: Path, view: Path) -> Path:
    """A diffusers-layout folder of configs only (unet/, vae/ from vae_decoder/, text encoders, tokenizers)."""
    index = read_json(folder / "model_index.json", "Optimum pipeline")
    view.mkdir(parents=True, exist_ok=True)
    copies = {"unet": "unet", "vae": "vae_decoder" if (folder / "vae_decoder" / "config.json").is_file()
              else "vae_encoder", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
    for part, src in copies.items():
        if not (folder / src).is_dir():
            continue
        if not (folder / src / "config.json").is_file():
            raise CheckpointError(f"{folder / src} has no config.json (an older Optimum layout): pass --checkpoint "
                                  "with the diffusers folder it was exported from")
        (view / part).mkdir()
        shutil.copyfile(folder / src / "config.json", view / part / "config.json")
    for part in ("scheduler", "tokenizer", "tokenizer_2"):
        if (folder / part).is_dir():
            shutil.copytree(folder / part, view / part)
    index.setdefault("vae", ["diffusers", "AutoencoderKL"])
    (view / "model_index.json").write_text(json.dumps(index))
    return view


@contextlib.contextmanager
def open_source(folder: Path, checkpoint: str | Path | None, family: str | None) -> Iterator[Source]:
    """The family, widths and runtime facts of an Optimum folder; with `checkpoint`, its PyTorch parts too."""
    digest = sha256_tree(folder)
    if checkpoint is not None:
        check_checkpoint(checkpoint)
        ref = locate_checkpoint(checkpoint, family)
        check_checkpoint(ref.folder)
        loaded = dataclasses.replace(load_checkpoint(ref), source=str(folder), source_sha256=digest)
        yield Source(folder, loaded, digest)
        return
    with tempfile.TemporaryDirectory(prefix="latentrt-optimum-") as tmp:
        view = config_view(folder, Path(tmp) / "view")
        spec = check_folder(view, family)
        index = model_index(view)
        sched = dict(check_scheduler_config(part_config(view, "scheduler"),
                                            str(folder / "scheduler" / "scheduler_config.json")))
        loaded = LoadedModel(spec=spec, dims=model_dims(spec, view), folder=view, modules={}, tokenizers={},
                             scheduler_config=sched, info=runtime_info(spec, view, index, sched), source=str(folder),
                             source_sha256=digest)
        yield Source(folder, loaded, digest)


# ---------------------------------------------------------------------------- graph wrapping


def _refuse(component: str, problem: str) -> CheckpointError:
    return CheckpointError(f"Optimum {component}: {problem}; LatentRT cannot import this graph")


def hidden_state_output(component: str, outputs: Mapping[str, Any], which: HiddenState) -> str:
    """The Optimum text-encoder output holding the hidden state the family uses (last, or the one before it)."""
    if which is HiddenState.LAST:
        if "last_hidden_state" not in outputs:
            raise _refuse(component, f"no 'last_hidden_state' output (it has {', '.join(outputs)})")
        return "last_hidden_state"
    layers = [int(n.split(".", 1)[1]) for n in outputs if n.startswith("hidden_states.") and n[14:].isdigit()]
    if not layers:
        raise _refuse(component, "it gives only 'last_hidden_state', but this family uses the penultimate hidden "
                                 "state (Optimum writes 'hidden_states.N' outputs for SDXL pipelines only)")
    return f"hidden_states.{max(layers) - 1}"


def name_map(io: ComponentIO, spec: FamilySpec, outputs: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(LatentRT input -> Optimum input, LatentRT output -> Optimum output) for one component."""
    c = io.component
    ins = {t.name: INPUT_NAMES.get(c, {}).get(t.name, t.name) for t in io.inputs}
    outs = {t.name: OUTPUT_NAMES.get(c, {}).get(t.name, t.name) for t in io.outputs}
    te = next((te for te in spec.text_encoders if te.component == c), None)
    if te is not None:
        outs[HIDDEN_STATES] = hidden_state_output(c, outputs, te.hidden_state)
    if c == "vae_encoder" and "latent_parameters" not in outputs and "latent_sample" in outputs:
        raise _refuse(c, "it gives a sampled latent ('latent_sample', older Optimum), LatentRT's encoder gives the "
                         "distribution's parameters ('latent_parameters'); import without it (--components) or "
                         "re-export with a newer Optimum")
    return ins, outs


def _elem(t: Any) -> int:
    return int(t.type.tensor_type.elem_type)


def _shape(t: Any) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.type.tensor_type.shape.dim]


def _value_info(spec: TensorSpec) -> Any:
    import onnx

    dims = [a if isinstance(a, int) else a.name for a in spec.shape]
    return onnx.helper.make_tensor_value_info(spec.name, ELEM_TYPES[spec.dtype], dims)


def rename_values(graph: Any, renames: Mapping[str, str]) -> None:
    """Rename values everywhere in a graph (node inputs/outputs, graph IO, value infos)."""
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for v in [*graph.input, *graph.output, *graph.value_info]:
        v.name = renames.get(v.name, v.name)


def input_nodes(ours: TensorSpec, theirs: Any, component: str) -> list[Any]:
    """Nodes feeding Optimum's input `theirs` from LatentRT's input `ours` (Identity, or Slice / Squeeze + Cast)."""
    import onnx

    h = onnx.helper
    src, dst, nodes = ours.name, theirs.name, []
    rank, want = len(_shape(theirs)), len(ours.shape)
    if rank != want:
        if ours.name != TIMESTEP or rank != 0 or want != 1:
            raise _refuse(component, f"input '{dst[len(PREFIX):]}' has rank {rank}, LatentRT feeds "
                                     f"{describe_shape(ours)}")
        first = f"{PREFIX}{src}.first"  # a scalar timestep: the runtime feeds one value per row, all equal
        nodes.append(h.make_node("Gather", [src, f"{PREFIX}zero"], [first], axis=0))
        src = first
    elif ours.name == TIMESTEP and _shape(theirs) == [1]:
        first = f"{PREFIX}{src}.first"  # shape (1,): rows share the step
        nodes.append(h.make_node("Slice", [src, f"{PREFIX}zero1", f"{PREFIX}one1"], [first]))
        src = first
    elif any(isinstance(t, int) and t != a for t, a in zip(_shape(theirs), ours.shape) if isinstance(a, (Dim, Scaled))):
        raise _refuse(component, f"input '{dst[len(PREFIX):]}' has the fixed shape {_shape(theirs)}, LatentRT needs "
                                 f"{describe_shape(ours)} with dynamic sizes")
    if _elem(theirs) != ELEM_TYPES[ours.dtype]:
        nodes.append(h.make_node("Cast", [src], [dst], to=_elem(theirs)))
    else:
        nodes.append(h.make_node("Identity", [src], [dst]))
    return nodes


def wrap_graph(model: Any, io: ComponentIO, spec: FamilySpec) -> tuple[Any, dict[str, str]]:
    """Give an Optimum graph exactly LatentRT's IO; returns it and the name map that was applied (ours -> theirs)."""
    import onnx

    graph, c = model.graph, io.component
    inits = {i.name for i in graph.initializer}
    their_in = {i.name: i for i in graph.input if i.name not in inits}
    their_out = {o.name: o for o in graph.output}
    ins, outs = name_map(io, spec, their_out)
    extra = [n for n in their_in if n not in ins.values()]
    missing = [f"'{theirs}'" for theirs in ins.values() if theirs not in their_in]
    missing += [f"output '{theirs}'" for theirs in outs.values() if theirs not in their_out]
    if extra or missing:
        problem = "; ".join(p for p in (f"it also takes {', '.join(map(repr, extra))}" if extra else "",
                                        f"it lacks {', '.join(missing)}" if missing else "") if p)
        raise _refuse(c, f"{problem} (LatentRT's {c} takes {', '.join(io.input_names)} and gives "
                         f"{', '.join(io.output_names)})")
    rename_values(graph, {n: PREFIX + n for n in [*their_in, *their_out]})
    head = [n for t in io.inputs for n in input_nodes(t, _find(graph.input, PREFIX + ins[t.name]), c)]
    tail = []
    for t in io.outputs:
        src = _find(graph.output, PREFIX + outs[t.name])
        if _elem(src) != FLOAT:  # an fp16 export: LatentRT's IO is float32
            tail.append(onnx.helper.make_node("Cast", [src.name], [t.name], to=FLOAT))
        else:
            tail.append(onnx.helper.make_node("Identity", [src.name], [t.name]))
    graph.initializer.extend([onnx.numpy_helper.from_array(np.array(0, np.int64), PREFIX + "zero"),
                              onnx.numpy_helper.from_array(np.array([0], np.int64), PREFIX + "zero1"),
                              onnx.numpy_helper.from_array(np.array([1], np.int64), PREFIX + "one1")])
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    kept_inits = [i for i in graph.input if i.name in inits]
    del graph.input[:]
    graph.input.extend([*map(_value_info, io.inputs), *kept_inits])
    del graph.output[:]
    graph.output.extend(map(_value_info, io.outputs))
    return model, {**ins, **outs}


def _find(values: Any, name: str) -> Any:
    return next(v for v in values if v.name == name)


def opset_of(model: Any) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# ---------------------------------------------------------------------------- one component


def import_component(src: Path, io: ComponentIO, spec: FamilySpec, folder: Path) -> tuple[Path, dict[str, str], int]:
    """Wrap Optimum's `src` model into `folder`/model.onnx (folded, checked): (path, name map, opset)."""
    import onnx

    try:
        model = onnx.load(str(src))
    except Exception as e:  # noqa: BLE001 - a damaged protobuf or missing external data surfaces as many types
        raise CheckpointError(f"cannot read {src} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); the "
                              "Optimum export may be damaged or incomplete") from None
    model, names = wrap_graph(model, io, spec)
    raw = folder.parent / f".{folder.name}.raw"
    raw.mkdir(parents=True, exist_ok=True)
    try:
        big = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer) / 2**20 >= EXTERNAL_DATA_MB
        onnx.save_model(model, str(raw / MODEL_FILE), save_as_external_data=big, all_tensors_to_one_file=True,
                        location="weights.data")
        folder.mkdir(parents=True, exist_ok=True)
        return finalize(raw / MODEL_FILE, folder / MODEL_FILE, EXTERNAL_DATA_MB), names, opset_of(model)
    finally:
        shutil.rmtree(raw, ignore_errors=True)


def checked_runs(path: Path, io: ComponentIO, module: Any | None) -> list[tuple[dict[str, int], Any]]:
    """Run the imported graph in ONNX Runtime at the export's parity shapes; with `module`, compare to PyTorch.

    Timesteps are the same integer on every row, as the runtime's schedules feed them (an Optimum UNet may
    take an int64 or a scalar timestep). ExportMismatch at the first shape or value that differs.
    """
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    runs = []
    for i, sizes in enumerate(parity_sizes(io)):
        feed = example_feed(io, sizes, seed=100 + i)
        if TIMESTEP in feed:
            feed[TIMESTEP] = np.full_like(feed[TIMESTEP], float(np.round(feed[TIMESTEP][0])))
        got = dict(zip(io.output_names, (np.asarray(x) for x in session.run(io.output_names, feed))))
        where = describe_sizes(sizes)
        for spec in io.outputs:
            if got[spec.name].shape != shape_of(spec, sizes):
                raise ExportMismatch(io.component, spec.name, float("inf"), 0.0, f"{where} (the Optimum graph gave "
                                     f"shape {got[spec.name].shape}, LatentRT's IO says {describe_shape(spec)})")
        if module is None:
            continue
        with torch.no_grad():
            out = module(*(torch.from_numpy(feed[n]) for n in io.input_names))
        ref = {s.name: r.numpy() for s, r in zip(io.outputs, out if isinstance(out, (tuple, list)) else (out,))}
        runs.append((dict(sizes), compare(got, ref, TOLERANCE, context=where).raise_if_failed(io.component)))
    return runs


def _import_one(source: Source, name: str, stage: Path, say: Progress, step: str) -> tuple[dict[str, Any], int]:
    loaded = source.loaded
    io = loaded.ios()[name]
    src = source.folder / name / MODEL_FILE
    if not src.is_file():
        raise CheckpointError(f"{source.folder} has no {name}/{MODEL_FILE}, which family {loaded.spec.name} needs")
    path, names, opset = import_component(src, io, loaded.spec, stage / name)
    module = wrap(name, loaded) if loaded.modules else None
    runs = checked_runs(path, io, module)
    checks = [parity_check_json(sizes, report) for sizes, report in runs]
    report = merge((r for _, r in runs), context=f"ONNX Runtime vs PyTorch at {len(runs)} shapes") if runs else None
    worst = max((r.max_abs_diff for _, r in runs), default=None)
    size_mb = sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file()) / 2**20
    renamed = {ours: theirs for ours, theirs in names.items() if ours != theirs}
    verdict = f"parity max|diff| {worst:.1e} ✓ ({len(checks)} shapes)" if worst is not None else \
        "shapes checked, parity not checked (no --checkpoint)"
    say(f"{step} {name}: {', '.join(f'{t} -> {o}' for o, t in renamed.items()) or 'same names'}; {verdict}")
    entry = {"path": f"{name}/{MODEL_FILE}", "io": io_to_json(io), "sha256": sha256_tree(path.parent),
             "size_mb": round(size_mb, 3), "optimum_names": names,
             "parity": {"tolerance": dataclasses.asdict(TOLERANCE), "checks": checks,
                        **({"report": report.to_json()} if report is not None else {})}}
    return entry, opset


# ---------------------------------------------------------------------------- whole folder


def import_optimum(folder: str | Path, out_dir: str | Path, *, checkpoint: str | Path | None = None,
                   family: str | None = None, components: list[str] | None = None, overwrite: bool = False,
                   progress: Progress | None = None) -> Path:
    """Import an Optimum ONNX diffusion folder as a LatentRT ONNX export under `out_dir`; returns `out_dir`.

    Args:
        folder: the Optimum folder (model_index.json, unet/model.onnx, vae_decoder/model.onnx, ...).
        out_dir: the export folder to write (refused if it holds another model's export unless `overwrite`).
        checkpoint: the PyTorch checkpoint it was exported from: its configs give the family and widths,
            and each imported graph is compared with it in ONNX Runtime.
        family: the family id, overriding detection.
        components: a subset of the family's components (default: all).
        progress: called with one human-readable line per step.
    """
    src = Path(os.path.abspath(Path(folder).expanduser()))
    if not is_optimum_folder(src):
        raise CheckpointError(f"{src} is not an Optimum ONNX export (expected unet/{MODEL_FILE} and "
                              f"vae_decoder/{MODEL_FILE} beside model_index.json)")
    check_checkpoint(src)
    say = progress or (lambda _msg: None)
    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    with removed_if_failed(out.parent), open_source(src, checkpoint, family) as source:
        spec = source.loaded.spec
        wanted = [c for c in spec.components if not components or c in components]
        unknown = sorted(set(components or ()) - set(spec.components))
        if unknown:
            raise CheckpointError(f"{spec.name} has no component(s) {', '.join(unknown)}; choose among "
                                  f"{', '.join(spec.components)}")
        say(f"{src}: Optimum export of family {spec.name} ({spec.title}); importing {', '.join(wanted)}")
        with output_lock(out):
            check_output(out, CheckpointRef(src, str(src), spec, source.sha256), overwrite)
            with staging_dir(out) as stage:
                entries, opsets = {}, []
                for i, name in enumerate(wanted, 1):
                    entries[name], opset = _import_one(source, name, stage, say, f"[{i}/{len(wanted)}]")
                    opsets.append(opset)
                files = _copy_support_files(source.loaded, stage)
                manifest = _manifest(source.loaded, min(opsets), False, entries, files, stage)
                manifest["exporter"] = "optimum"
                manifest["imported"] = {"from": "optimum", "folder": str(src),
                                        "checkpoint": None if checkpoint is None else str(checkpoint),
                                        "parity": checkpoint is not None}
                _publish(stage, out, manifest)
    say(f"wrote {out}")
    return out
