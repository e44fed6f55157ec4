"""The tiny VAE decoder at export (TAESD; diffusers `AutoencoderTiny`): `latentrt export ... --tiny-vae PATH_OR_HUB_ID`.

The tiny VAE is checked against the checkpoint before any weights load (`reference.tiny_vae.locate_tiny_vae`),
exported as the extra component `tiny_vae_decoder` with the VAE decoder's IO and the usual parity check, and
recorded under the manifest's `tiny_vae` (`latentrt.tiny_vae`). A re-export of the same model without
--tiny-vae keeps the tiny decoder (and its record) it already had.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from latentrt.errors import CheckpointError
from latentrt.reference.models import CheckpointRef, LoadedModel, model_dims
from latentrt.reference.tiny_vae import TinyVaeDecoderWrapper, TinyVaeRef, load_tiny_vae, locate_tiny_vae
from latentrt.tensors import ComponentIO
from latentrt.tiny_vae import MANIFEST_KEY, TINY_VAE_DECODER, VAE_DECODER, tiny_vae_io

Part = tuple[torch.nn.Module, ComponentIO]


def split_components(components: Sequence[str] | None, tiny_vae: object) -> tuple[list[str] | None, bool]:
    """(the family components asked for, whether only the tiny decoder is): `tiny_vae_decoder` may be named in
    --components only with --tiny-vae; alone, the export adds it to the folder's previous export of the model."""
    if not components or TINY_VAE_DECODER not in components:
        return (list(components) if components else None), False
    if tiny_vae is None:
        raise CheckpointError(f"{TINY_VAE_DECODER} is exported from a tiny VAE: add --tiny-vae PATH_OR_HUB_ID")
    rest = [c for c in components if c != TINY_VAE_DECODER]
    return (rest or None), not rest


def locate_for(ref: CheckpointRef, source: str | os.PathLike[str]) -> TinyVaeRef:
    """The tiny VAE, checked against the checkpoint's latent channels and VAE factor (configs only)."""
    if VAE_DECODER not in ref.spec.components:
        raise CheckpointError(f"family {ref.spec.name} has no {VAE_DECODER} for a tiny VAE to stand in for")
    dims = model_dims(ref.spec, ref.folder)
    return locate_tiny_vae(source, dims.latent_channels, dims.vae_scale_factor)


def tiny_vae_part(loaded: LoadedModel, ref: TinyVaeRef) -> Part:
    """(the wrapped AutoencoderTiny decoder, its IO: the VAE decoder's under the name `tiny_vae_decoder`)."""
    if ref.spec.latent_channels != loaded.dims.latent_channels:  # the loaded configs agree with the located ones
        raise CheckpointError(f"the tiny VAE's latent_channels {ref.spec.latent_channels} do not match the model's "
                              f"{loaded.dims.latent_channels}")
    return TinyVaeDecoderWrapper(load_tiny_vae(ref)).eval(), tiny_vae_io(loaded.ios()[VAE_DECODER])


def manifest_record(ref: TinyVaeRef | None, entries: Mapping[str, Any],
                    previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """The manifest's `tiny_vae` entry: this run's when it exported the tiny decoder, else the kept one's; {}."""
    if ref is not None and TINY_VAE_DECODER in entries:
        return {MANIFEST_KEY: ref.spec.to_json()}
    kept = (previous or {}).get(MANIFEST_KEY)
    return {MANIFEST_KEY: kept} if kept is not None and TINY_VAE_DECODER in entries else {}
