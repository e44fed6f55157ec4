"""The optional tiny VAE decoder (TAESD, Bohan 2023; diffusers `AutoencoderTiny`): what the component is and records.

`latentrt export ... --tiny-vae PATH_OR_HUB_ID` adds the component `tiny_vae_decoder` next to
`vae_decoder`: the same IO (`latent` -> `images` in [-1, 1], not clamped), decoding the UNet's latents
divided by the tiny VAE's own `scaling_factor` (1.0 for madebyollin/taesd and taesdxl), as diffusers'
pipelines do when given `vae=AutoencoderTiny`. The export records `{"source", "sha256",
"scaling_factor", "latent_channels", "scale_factor"}` under the manifest key `tiny_vae`; engine
builds copy it; `latentrt.manifest_checks` derives the expected IO from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import StaleArtifact
from .tensors import ComponentIO

TINY_VAE_DECODER = "tiny_vae_decoder"  # the component an export with --tiny-vae adds
VAE_DECODER = "vae_decoder"  # the component whose IO it shares
MANIFEST_KEY = "tiny_vae"


@dataclass(frozen=True)
class TinyVaeSpec:
    """What an export records of the tiny VAE it added (the runtime divides latents by `scaling_factor`)."""

    source: str  # what the user gave: an absolute folder path or a hub id
    sha256: str  # of the folder's config and weights
    scaling_factor: float  # the AutoencoderTiny config's scaling_factor (decode: latents / scaling_factor)
    latent_channels: int
    scale_factor: int  # pixels per latent: upsampling_scaling_factor ** (decoder levels - 1)

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "scaling_factor": self.scaling_factor,
                "latent_channels": self.latent_channels, "scale_factor": self.scale_factor}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def spec_from_manifest(manifest: Mapping[str, Any]) -> TinyVaeSpec | None:
    """The manifest's tiny-VAE record (None when the export has none); StaleArtifact if malformed."""
    raw = manifest.get(MANIFEST_KEY)
    if raw is None:
        return None
    scale = raw.get("scaling_factor") if isinstance(raw, dict) else None
    ok = isinstance(raw, dict) and all(isinstance(raw.get(k), str) for k in ("source", "sha256")) \
        and isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0 \
        and all(_positive_int(raw.get(k)) for k in ("latent_channels", "scale_factor"))
    if not ok:
        raise StaleArtifact(f"the manifest's '{MANIFEST_KEY}' should be {{'source': str, 'sha256': str, "
                            f"'scaling_factor': number > 0, 'latent_channels': int, 'scale_factor': int}}, "
                            f"found {raw!r}; re-run the export")
    assert isinstance(raw, dict) and isinstance(scale, (int, float))
    return TinyVaeSpec(raw["source"], raw["sha256"], float(scale), raw["latent_channels"], raw["scale_factor"])


def tiny_vae_io(decoder: ComponentIO) -> ComponentIO:
    """The tiny decoder's IO: the VAE decoder's (latent -> images), under its own component name."""
    return replace(decoder, component=TINY_VAE_DECODER)


def expected_ios(ios: Mapping[str, ComponentIO], spec: TinyVaeSpec | None) -> dict[str, ComponentIO]:
    """A family's component IOs as an export with this tiny-VAE record holds them (unchanged without one)."""
    out = dict(ios)
    if spec is not None and VAE_DECODER in out:
        out[TINY_VAE_DECODER] = tiny_vae_io(ios[VAE_DECODER])
    return out
