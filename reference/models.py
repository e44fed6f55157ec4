"""Load PyTorch reference models: a diffusers folder, a hub id, a single-file checkpoint or `tiny:<family>`.

Everything goes through the diffusers folder layout (model_index.json + one folder per part):
the family is detected from the configs alone, then each part is loaded with the class
model_index.json names (diffusers or transformers), in float32 on the CPU, in eval mode.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from latentrt.configs import check_scheduler_config, config_int, config_ints
from latentrt.errors import CheckpointError, InvalidRequest
from latentrt.families import FAMILIES, FamilySpec, Prediction, Spacing, get_family, unet_config_key
from latentrt.manifest import sha256_tree
from latentrt.names import ENCODER_HIDDEN_STATES_KEYWORD, TIME_IDS
from latentrt.tensors import ComponentIO, ModelDims, component_ios

from .parts import folder_name, pipeline_module_class
from .structure import CheckpointFacts, match_family, mismatches
from .tiny import tiny_folder
from .unclip import IMAGE_ENCODER, image_dims, image_parts, image_problems, load_image_parts

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
MODEL_PARTS = ("text_encoder", "text_encoder_2", "unet", "vae")
HASHED_PARTS = ("model_index.json", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae",
                "scheduler", "bert", "vqvae",  # bert, vqvae: the latent diffusion pipelines' names (reference/parts.py)
                "low_res_scheduler")  # the x4 upscaler's (issue 12)
HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.safetensors", "*/*.txt", "*/*.json"]


@dataclass
class LoadedModel:
    """A checkpoint's PyTorch parts plus the facts the export and the runtime need."""

    spec: FamilySpec
    dims: ModelDims
    folder: Path  # the diffusers folder the parts were read from
    modules: dict[str, torch.nn.Module]  # "text_encoder", "text_encoder_2", "unet", "vae" (fp32, CPU, eval)
    tokenizers: dict[str, Any]  # "tokenizer", "tokenizer_2" (transformers CLIP tokenizers)
    scheduler_config: dict[str, Any]
    info: dict[str, Any]  # JSON-able facts for the runtime (VAE scaling, SDXL flags, prediction type, ...)
    source: str  # what the user asked for: a path, a hub id or tiny:<family>
    source_sha256: str = field(default="")
    parts: dict[str, Any] = field(default_factory=dict)  # issue 12 (H4): parts that are no module (noising scheduler)

    def ios(self) -> dict[str, ComponentIO]:
        """The IO description of every exported component."""
        return component_ios(self.spec, self.dims)


# ---------------------------------------------------------------------------- configs


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON config, raising CheckpointError that names the file when it is missing or malformed."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name}: not a diffusers {what} folder")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def model_index(folder: Path) -> dict[str, Any]:
    """The pipeline's model_index.json, checked for the keys LatentRT relies on."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    index = read_json(folder / "model_index.json", "pipeline")
    if not isinstance(index.get("_class_name"), str):
        raise CheckpointError(f"{folder / 'model_index.json'} has no '_class_name': not a diffusers pipeline")
    if (folder / "vae_decoder" / "model.onnx").is_file() and not (folder / "vae").is_dir():
        raise CheckpointError(f"{folder} is an Optimum ONNX export: run latentrt import-onnx {folder} -o OUT")
    for part in ("unet", "vae", "scheduler"):
        if not _present(index, folder, part):
            raise CheckpointError(f"{folder} has no '{part}' (model_index.json entry and folder are both needed)")
    return index


def _present(index: dict[str, Any], folder: Path, part: str) -> bool:
    name = folder_name(folder, part, index)  # `vqvae` / `bert` in the latent diffusion pipelines
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None and (folder / name).is_dir()


def part_config(folder: Path, part: str) -> dict[str, Any]:
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    return read_json(folder / folder_name(folder, part) / name, part)


# issue 12 (H2): text towers whose configs are not CLIP's (LDM-BERT: BART-style keys)
def tower_fact(config: dict[str, Any]) -> str:
    """What a text encoder config says it is: CLIP's `hidden_act`, else its `model_type` ("ldmbert")."""
    return str(config["hidden_act"] if "hidden_act" in config else config.get("model_type"))


def width_key(config: dict[str, Any]) -> str:
    """The config key of a text encoder's width: `hidden_size`, or BART-style `d_model` (LDM-BERT)."""
    return "d_model" if "hidden_size" not in config and "d_model" in config else "hidden_size"


def text_parts() -> tuple[str, ...]:
    """The text encoder components any registered family has ('text_encoder', 'text_encoder_2')."""
    return tuple(sorted({te.component for s in FAMILIES.values() for te in s.text_encoders}))


def _int(config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(config: dict[str, Any], key: str, default: str | None = None) -> str | None:
    value = config.get(key, default)
    return value if isinstance(value, str) else None if value is None else repr(value)


def unet_cross_attention(unet: dict[str, Any]) -> bool:
    """Whether any UNet block attends to a context (diffusers' defaults where the config omits the block types)."""
    blocks = [*(unet.get("down_block_types") or ("CrossAttnDownBlock2D",)),
              *(unet.get("up_block_types") or ("CrossAttnUpBlock2D",)),
              unet.get("mid_block_type", "UNetMidBlock2DCrossAttn")]
    return any(isinstance(b, str) and "CrossAttn" in b for b in blocks)


CLIP_PROJECTION_DIM = 512  # transformers' CLIPTextConfig default: a config without `projection_dim` projects to 512


def folder_facts(folder: Path, index: dict[str, Any]) -> CheckpointFacts:
    """The structural facts of a diffusers folder, read from its configs (no weights)."""
    unet, vae, sched = (part_config(folder, p) for p in ("unet", "vae", "scheduler"))
    texts = {c: part_config(folder, c) for c in text_parts() if _present(index, folder, c)}
    pooled = frozenset(c for c in texts if str(index[folder_name(folder, c, index)][1]).endswith("WithProjection"))
    return CheckpointFacts(
        text_encoders={c: tower_fact(cfg) for c, cfg in texts.items()},
        unet_in_channels=config_int(unet, "in_channels", str(folder / "unet" / "config.json")),
        latent_channels=_int(vae, "latent_channels") or 4, unet_out_channels=_int(unet, "out_channels"),
        cross_attention=unet_cross_attention(unet), context_dim=_int(unet, "cross_attention_dim"),
        text_hidden={c: h for c, cfg in texts.items() if (h := _int(cfg, width_key(cfg))) is not None},
        pooled_encoders=pooled, pooled_dim=next((_int(texts[c], "projection_dim") or 0 if "projection_dim" in texts[c]
                                                else CLIP_PROJECTION_DIM for c in sorted(pooled)), 0),
        unet_config=unet,
        addition_embed_type=_str(unet, "addition_embed_type"),
        addition_input_dim=_int(unet, "projection_class_embeddings_input_dim"),
        addition_time_embed_dim=_int(unet, "addition_time_embed_dim"),
        autoencoder=str(index[folder_name(folder, "vae", index)][1]),
        unet_class=str(index["unet"][1]),  # issue 12, H1: UNet2DConditionModel or UNet2DModel
        prediction=_str(sched, "prediction_type", Prediction.EPS.value),
        spacing=_str(sched, "timestep_spacing", Spacing.LEADING.value),
        pipeline_options={k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)},
        image_encoder=_present(index, folder, IMAGE_ENCODER.component),  # issue 12 (H4)
    )


def detect_family(folder: str | Path) -> FamilySpec:
    """The registered family whose structure a diffusers folder's configs fit (no weights are loaded)."""
    folder = Path(folder)
    index = model_index(folder)
    return match_family(folder_facts(folder, index), f"{folder} ({index['_class_name']})")


def unet_attention(unet: dict[str, Any]) -> list[int] | None:
    """[latent downsampling, heads] of the first UNet block with attention (for memory estimates), if readable."""
    blocks = unet.get("down_block_types")
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim")  # diffusers' legacy naming
    if not isinstance(blocks, (list, tuple)):
        return None
    for i, block in enumerate(blocks):
        if isinstance(block, str) and "Attn" in block:
            h = heads[i] if isinstance(heads, (list, tuple)) and i < len(heads) else heads
            return [2 ** i, h] if isinstance(h, int) and not isinstance(h, bool) and h > 0 else None
    return None


def model_dims(spec: FamilySpec, folder: Path) -> ModelDims:
    """The widths of this checkpoint, checked against the family's structure (and for sane config values)."""
    tes = [part_config(folder, te.component) for te in spec.text_encoders]
    unet, vae = part_config(folder, "unet"), part_config(folder, "vae")
    te_where = [str(folder / folder_name(folder, te.component) / "config.json") for te in spec.text_encoders]
    unet_where, vae_where = str(folder / "unet" / "config.json"), str(folder / folder_name(folder, "vae") / "config.json")
    pooled = next((config_int(c, "projection_dim", w, CLIP_PROJECTION_DIM, minimum=0)
                   for te, c, w in zip(spec.text_encoders, tes, te_where) if te.pooled), 0)
    vae_blocks = config_ints(vae, "block_out_channels", vae_where, [0])
    unet_blocks = config_ints(unet, "block_out_channels", unet_where, [320])
    time_ids = spec.denoiser.conditioning_input(TIME_IDS)
    image = image_dims(spec, folder)  # issue 12 (H4)

    def optional_int(key: str) -> int:  # 0 when the config has no such embedding
        return config_int(unet, key, unet_where, 0, minimum=0) if unet.get(key) is not None else 0

    dims = ModelDims(
        text_hidden=tuple(config_int(c, width_key(c), w) for c, w in zip(tes, te_where)), pooled_dim=int(pooled),
        # the token id bound of towers that are not CLIP (CLIP's exports record none): LDM-BERT's vocabulary
        text_vocab=tuple(0 if te.tower.is_clip else config_int(c, "vocab_size", w)
                         for te, c, w in zip(spec.text_encoders, tes, te_where)),
        context_dim=config_int(unet, "cross_attention_dim", unet_where)
        if spec.denoiser.keyword_input(ENCODER_HIDDEN_STATES_KEYWORD) is not None else 0,
        unet_in_channels=config_int(unet, "in_channels", unet_where),
        latent_channels=config_int(vae, "latent_channels", vae_where, 4),
        vae_scale_factor=2 ** (len(vae_blocks) - 1),
        max_tokens=config_int(tes[0], "max_position_embeddings", te_where[0], 77) if tes else 77,
        time_ids=time_ids.width if time_ids is not None and isinstance(time_ids.width, int) else 0,
        unet_config={key: optional_int(key) for c in spec.denoiser.conditioning for key in c.config_keys},
        extra={"unet_sample_size": unet.get("sample_size"), "addition_time_embed_dim": unet.get("addition_time_embed_dim"),
               "unet_attention": unet_attention(unet), "unet_channels": unet_blocks[0], "vae_channels": vae_blocks[0],
               **pipeline_extra(folder),
               **({"image_noise_levels": image["image_noise_levels"]} if image else {})},  # for request checks
        **image,  # issue 12 (H4): the image encoder's crop and widths
    )
    problems = mismatches(spec, folder_facts(folder, model_index(folder)), towers=False)
    problems += image_problems(spec, unet, {"image_embed_dim": dims.image_embed_dim})
    problems += [f"{c.name} needs a non-zero {c.width}" for c in spec.denoiser.conditioning  # "unet:<key>": above
                 if isinstance(c.width, str) and unet_config_key(c.width) is None and not c.optional
                 and not getattr(dims, c.width)]
    if problems:
        raise CheckpointError(f"{folder} does not fit family {spec.name}: {'; '.join(problems)}")
    return dims


# ---- issue 12 (H3): pipeline facts beyond the model parts


LOW_RES_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def pipeline_extra(folder: Path) -> dict[str, Any]:
    """The x4 upscaler's low-res noise schedule (its `low_res_scheduler` config) and `max_noise_level`; {} without."""
    if not (folder / "low_res_scheduler").is_dir():
        return {}
    where = str(folder / "low_res_scheduler" / "scheduler_config.json")
    config = read_json(folder / "low_res_scheduler" / "scheduler_config.json", "scheduler")
    schedule = config.get("beta_schedule", "linear")
    if schedule not in LOW_RES_SCHEDULES:
        raise CheckpointError(f"{where}: beta_schedule {schedule!r} is not one of {', '.join(LOW_RES_SCHEDULES)}")
    betas = {k: config.get(k, d) for k, d in (("beta_start", 0.0001), ("beta_end", 0.02))}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in betas.values()):
        raise CheckpointError(f"{where}: beta_start / beta_end must be numbers in (0, 1), got {betas}")
    limit = read_json(folder / "model_index.json", "pipeline").get("max_noise_level", 350)
    return {"low_res_schedule": {**betas, "beta_schedule": schedule,
                                 "num_train_timesteps": config_int(config, "num_train_timesteps", where, 1000)},
            "max_noise_level": config_int({"max_noise_level": limit}, "max_noise_level", str(folder / "model_index.json"))}


def runtime_info(spec: FamilySpec, folder: Path, index: dict[str, Any], sched: dict[str, Any]) -> dict[str, Any]:
    """JSON-able facts the runtime needs, read from the checkpoint's configs."""
    vae, unet = part_config(folder, "vae"), part_config(folder, "unet")
    classes = _int(unet, "num_class_embeds")  # class-conditional UNets: the runtime checks requested labels
    return {
        **({"num_class_embeds": classes} if classes else {}),
        "pipeline_class": index["_class_name"],
        # issue 12, H1: LDM super-resolution samples unscaled latents whatever the VQ config says
        "vae_scaling_factor": 1.0 if spec.unscaled_latents else float(vae.get("scaling_factor", spec.vae_scaling_factor)),
        "vae_shift_factor": vae.get("shift_factor"),
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", False)),
        "requires_aesthetics_score": bool(index.get("requires_aesthetics_score", False)),
        "prediction_type": sched.get("prediction_type", Prediction.EPS.value),
        "timestep_spacing": sched.get("timestep_spacing", Spacing.LEADING.value),
    }


def checkpoint_sha256(folder: Path, extra: tuple[str, ...] = ()) -> str:
    """Hash of the files a LatentRT export reads (model_index.json, the used parts' folders and `extra` ones)."""
    parts = HASHED_PARTS + extra
    return sha256_tree(folder, include=lambda rel: rel.parts[0] in parts)


# ---------------------------------------------------------------------------- loading

MIN_OPSET = 14  # scaled_dot_product_attention and the SD graphs need opset >= 14


def check_opset(opset: int, dynamo: bool = False) -> None:
    """InvalidRequest naming the supported range when the exporter cannot emit `opset`."""
    from torch.onnx import _constants

    high = _constants.ONNX_MAX_OPSET if dynamo else _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= high:
        raise InvalidRequest(f"opset {opset!r} is not supported by the {'dynamo' if dynamo else 'TorchScript'} "
                             f"exporter here; choose {MIN_OPSET}-{high} (default 17)")


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Silence diffusers' and transformers' loading progress bars (the CLI shows its own)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    states = [(m, m.is_progress_bar_enabled()) for m in (dlog, tlog)]
    for m, _ in states:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, was in states:
            if was:
                m.enable_progress_bar()


def load_part(folder: Path, index: dict[str, Any], part: str) -> Any:
    """Load one part with the library and class that model_index.json names."""
    import diffusers
    import transformers

    name = folder_name(folder, part, index)  # `vqvae` / `bert` in the latent diffusion pipelines
    library, class_name = index[name]
    lib = {"diffusers": diffusers, "transformers": transformers}.get(library)
    cls = getattr(lib, class_name, None) if lib is not None else pipeline_module_class(str(library), str(class_name))
    if cls is None:
        raise CheckpointError(f"{folder}: '{part}' is a {library}.{class_name}, which LatentRT cannot load")
    try:
        if part.startswith("tokenizer"):
            return cls.from_pretrained(str(folder / name))
        obj = cls.from_pretrained(str(folder / name), torch_dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - damaged weights or configs surface as many types (SafetensorError, ...)
        detail = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(f"{folder}: cannot load '{part}' ({class_name}): {detail[:300]}; the file may be "
                              "damaged or incomplete") from None
    return obj.to("cpu").float().eval()


def resolve(model: str | Path) -> tuple[Path, str]:
    """Map what the user gave (tiny:<family>, folder, hub id) to a local diffusers folder."""
    text = str(model)
    if text.startswith(TINY_PREFIX):
        return tiny_folder(text[len(TINY_PREFIX):]), text
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file():  # locate_checkpoint routes files to single_file; direct callers (bench) get here
            raise CheckpointError(f"{path} is a file; LatentRT exports diffusers folders (with model_index.json), "
                                  "tiny:<family> or hub ids")
        return path, text
    if looks_like_hub_id(text):
        return download(text), text
    raise CheckpointError(f"checkpoint {text} does not exist (expected a diffusers folder, a hub id "
                          "like org/name, or tiny:<family>)")


def looks_like_hub_id(text: str) -> bool:
    """Whether `text` has the form of a Hugging Face hub repository id (org/name, not a local path)."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def download(repo_id: str, patterns: Sequence[str] = HUB_PATTERNS) -> Path:
    """Fetch a hub repository's configs, tokenizers and weights (safetensors only) into the local hub cache
    (`patterns`: a pipeline's by default; a single model's, e.g. a tiny VAE, at the repository root)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except Exception as e:  # noqa: BLE001 - any hub failure (offline, 404, auth) is a checkpoint problem
        raise CheckpointError(f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'}); download it and pass the "
                              "folder instead") from None


@dataclass(frozen=True)
class CheckpointRef:
    """A located, family-checked checkpoint whose weights are not loaded yet."""

    folder: Path
    source: str
    spec: FamilySpec
    sha256: str


def check_folder(folder: Path, family: str | None = None) -> FamilySpec:
    """Validate a diffusers folder (configs only) against its family, given or detected; returns the family."""
    index = model_index(folder)
    spec = get_family(family) if family else detect_family(folder)
    for te in spec.text_encoders:
        if not _present(index, folder, te.component) or not _present(index, folder, te.tokenizer):
            raise CheckpointError(f"{folder} has no '{te.component}'/'{te.tokenizer}', which family "
                                  f"{spec.name} needs")
    missing = [p for p in image_parts(spec) if not _present(index, folder, p)]  # issue 12 (H4)
    if missing:
        raise CheckpointError(f"{folder} has no {', '.join(map(repr, missing))}, which family {spec.name} needs")
    model_dims(spec, folder)  # raises when the widths do not fit the family
    return spec


def locate_checkpoint(model: str | Path, family: str | None = None,
                      config: str | Path | None = None) -> CheckpointRef:
    """Resolve, validate and hash a checkpoint (configs only); `family` overrides detection.

    A single original-layout `.safetensors` file is converted once into a cached diffusers folder
    with `config` (a diffusers folder or hub id of the same family; see `latentrt.reference.single_file`).
    """
    from .single_file import is_single_file, locate_single_file

    if is_single_file(model):
        return locate_single_file(model, config=config, family=family)
    if config is not None:
        raise CheckpointError(f"--config applies to single-file checkpoints; {model} is not a file (a diffusers "
                              "folder carries its own configs)")
    folder, source = resolve(model)
    spec = check_folder(folder, family)
    return CheckpointRef(folder, source, spec, checkpoint_sha256(folder, image_parts(spec)))


def load_checkpoint(model: str | Path | CheckpointRef, family: str | None = None,
                    config: str | Path | None = None) -> LoadedModel:
    """Load a checkpoint (tiny:<family>, a diffusers folder, a hub id or a single `.safetensors` file).

    `family` overrides detection; `config` (single files only) names the diffusers folder or hub id
    whose configs describe the file's architecture.
    """
    ref = model if isinstance(model, CheckpointRef) else locate_checkpoint(model, family, config)
    folder, spec = ref.folder, ref.spec
    index = model_index(folder)
    sched = check_scheduler_config(part_config(folder, "scheduler"), str(folder / "scheduler" / "scheduler_config.json"))
    wanted = [p for p in MODEL_PARTS if p in ("unet", "vae") or any(te.component == p for te in spec.text_encoders)]
    with quiet_progress():
        modules = {p: load_part(folder, index, p) for p in wanted}
        tokenizers = {te.tokenizer: load_part(folder, index, te.tokenizer) for te in spec.text_encoders}
        image_modules, parts = load_image_parts(spec, folder, index)  # issue 12 (H4)
    log.info("loaded %s as %s from %s", ref.source, spec.name, folder)
    return LoadedModel(spec=spec, dims=model_dims(spec, folder), folder=folder, modules={**modules, **image_modules},
                       tokenizers=tokenizers, scheduler_config=dict(sched),
                       info=runtime_info(spec, folder, index, sched), source=ref.source, source_sha256=ref.sha256,
                       parts=parts)
