"""Decoding with the tiny VAE (TAESD; diffusers `AutoencoderTiny`): `latentrt generate --tiny-vae`.

The engines come from `latentrt export --tiny-vae` (component `tiny_vae_decoder`, its record under the
manifest's `tiny_vae`). As diffusers' pipelines given `vae=AutoencoderTiny`, the latents are divided by
the tiny VAE's own `scaling_factor` (1.0 for taesd / taesdxl), not the model VAE's, and the decoder
gives images in [-1, 1]. On the PyTorch reference backend the recorded tiny VAE is loaded through
`latentrt.reference.tiny_vae` and checked against the export's hash.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from latentrt.errors import MissingComponent, StaleArtifact
from latentrt.tiny_vae import TINY_VAE_DECODER, TinyVaeSpec, spec_from_manifest, tiny_vae_io

from .backends.base import Engine

if TYPE_CHECKING:
    from latentrt.tensors import ComponentIO

    from .engine_set import EngineSet


def tiny_vae_spec(engines: EngineSet) -> TinyVaeSpec:
    """The tiny VAE record of an engine set that holds a `tiny_vae_decoder`; MissingComponent when it has none."""
    spec = spec_from_manifest(engines.manifest) if engines.manifest else None
    if TINY_VAE_DECODER not in engines or spec is None:
        raise MissingComponent(f"{engines.folder} has no {TINY_VAE_DECODER}: export with `latentrt export ... "
                               "--tiny-vae PATH_OR_HUB_ID` (and rebuild the engines), or drop --tiny-vae")
    return spec


def tiny_decoder(engines: EngineSet) -> tuple[Engine, float]:
    """(the tiny VAE decoder engine, the scaling factor its latents are divided by)."""
    spec = tiny_vae_spec(engines)
    return engines[TINY_VAE_DECODER], spec.scaling_factor


def torch_tiny_vae(manifest: dict[str, Any], decoder: ComponentIO, device: torch.device) -> dict[str, Engine]:
    """The PyTorch reference's tiny decoder of an export that records one ({} without), checked against its hash."""
    from latentrt.reference.tiny_vae import TinyVaeDecoderWrapper, load_tiny_vae, locate_tiny_vae

    from .backends.torch import TorchEngine

    spec = spec_from_manifest(manifest)
    if spec is None or TINY_VAE_DECODER not in (manifest.get("components") or {}):
        return {}
    ref = locate_tiny_vae(spec.source, spec.latent_channels, spec.scale_factor)
    if ref.spec.sha256 != spec.sha256:
        raise StaleArtifact(f"the tiny VAE {spec.source} changed since it was exported (hash mismatch); re-run the "
                            "export with --tiny-vae")
    module = TinyVaeDecoderWrapper(load_tiny_vae(ref))
    return {TINY_VAE_DECODER: TorchEngine(module, tiny_vae_io(decoder), device)}

