"""Pipeline part names: the folders a diffusers pipeline saves a part under, and where its class lives.

LatentRT names the parts after the Stable Diffusion pipelines (`text_encoder`, `vae`); diffusers'
latent diffusion pipelines save the same parts as `bert` (LDMTextToImagePipeline's LDM-BERT) and
`vqvae` (LDMPipeline, LDMTextToImagePipeline: a VQModel or an AutoencoderKL). A checkpoint's
model_index.json says which name it uses; `folder_name` finds it, `pipeline_part` goes the other way
when a tiny checkpoint is saved through the pipeline class. Classes defined inside a diffusers
pipeline module (`LDMBertModel`) are recorded under that module's name ("latent_diffusion").
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

# LatentRT's part name -> the other names diffusers pipelines save it under, in the order they are tried
PART_ALIASES: dict[str, tuple[str, ...]] = {"vae": ("vqvae",), "text_encoder": ("bert",)}
_MODULE_NAME = re.compile(r"[a-z][a-z0-9_]*")


def names_of(part: str) -> tuple[str, ...]:
    """Every name the part may be saved under: its own first."""
    return (part, *PART_ALIASES.get(part, ()))


def folder_name(folder: Path, part: str, index: Mapping[str, Any] | None = None) -> str:
    """The name `part` has in this checkpoint: the first one model_index.json lists (or, without it, a folder has)."""
    for name in names_of(part):
        if (name in index) if index is not None else (folder / name).is_dir():
            return name
    return part


def pipeline_part(part: str, params: Collection[str]) -> str:
    """The name a pipeline class's __init__ takes `part` under (itself when it takes it, or takes no alias)."""
    return next((name for name in names_of(part) if name in params), part)


def pipeline_module_class(library: str, class_name: str) -> Any:
    """A class defined in a diffusers pipeline module (model_index.json's ["latent_diffusion", "LDMBertModel"]).

    None unless `library` names an existing `diffusers.pipelines` subpackage that defines `class_name`.
    """
    if not _MODULE_NAME.fullmatch(library) or not class_name.isidentifier():
        return None
    import diffusers.pipelines

    if not hasattr(diffusers.pipelines, library):
        return None
    try:
        module = importlib.import_module(f"diffusers.pipelines.{library}")
    except ImportError:
        return None
    return getattr(module, class_name, None)
