"""Step caching (DeepCache, Ma, Fang & Wang 2023, arXiv:2312.00858): what the two UNet parts take and give.

A full UNet pass also returns the deep feature entering its last `depth` up blocks (the output of
`up_blocks[:-depth]`, the skip branch at that depth in the paper's figure 3); the steps in between run
only the shallow part (time embedding, conv_in, down_blocks[:depth], up_blocks[-depth:] with the cached
feature, conv_out). Both IOs derive from the plain UNet's: the full one gains the output
`deep_feature`, the shallow one (`unet_shallow`) takes the UNet's inputs plus `deep_feature`.

An export made with step caching records `{"depth": k, "channels": C}` under the manifest key
`step_cache`; `latentrt.manifest_checks` derives the expected IOs from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from .errors import InvalidRequest, StaleArtifact
from .tensors import ComponentIO, Dim, TensorSpec

UNET = "unet"
SHALLOW = "unet_shallow"  # the component an export with step caching adds
DEEP_FEATURE = "deep_feature"  # (unet_batch, channels, latent_height, latent_width) at depth 1
MANIFEST_KEY = "step_cache"
SUPPORTED_DEPTHS = (1,)  # deeper branches change the feature's spatial size (latent / 2^(depth-1)): not yet in IO specs


@dataclass(frozen=True)
class StepCacheSpec:
    """Where the UNet is split: `depth` outermost up blocks run on cached steps; the feature has `channels`."""

    depth: int  # up blocks re-run on cached steps (1: only the outermost, the paper's cheapest branch)
    channels: int  # channels of the feature entering up_blocks[-depth] (block_out_channels[depth])

    def to_json(self) -> dict[str, int]:
        return {"depth": self.depth, "channels": self.channels}


def check_depth(depth: Any) -> int:
    """The branch depth as an int; InvalidRequest for one the IO specs cannot describe."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth not in SUPPORTED_DEPTHS:
        raise InvalidRequest(f"step-cache branch depth must be one of {', '.join(map(str, SUPPORTED_DEPTHS))}, "
                             f"got {depth!r}")
    return depth


def spec_from_manifest(manifest: Mapping[str, Any]) -> StepCacheSpec | None:
    """The manifest's step-cache record (None when the export has none); StaleArtifact if malformed."""
    raw = manifest.get(MANIFEST_KEY)
    if raw is None:
        return None
    ok = isinstance(raw, dict) and all(isinstance(raw.get(k), int) and not isinstance(raw.get(k), bool)
                                       and raw[k] >= 1 for k in ("depth", "channels"))
    if not ok or raw["depth"] not in SUPPORTED_DEPTHS:
        raise StaleArtifact(f"the manifest's '{MANIFEST_KEY}' should be {{'depth': 1, 'channels': int >= 1}}, "
                            f"found {raw!r}; re-run the export")
    return StepCacheSpec(raw["depth"], raw["channels"])


def feature_spec(unet: ComponentIO, spec: StepCacheSpec) -> TensorSpec:
    """The cached feature's tensor: the UNet sample's batch and latent dims, `spec.channels` channels."""
    sample = unet.inputs[0]
    batch, _, height, width = sample.shape
    assert isinstance(batch, Dim) and spec.depth == 1, "the feature keeps the latent size only at depth 1"
    return TensorSpec(DEEP_FEATURE, "float32", (batch, spec.channels, height, width))


def full_io(unet: ComponentIO, spec: StepCacheSpec) -> ComponentIO:
    """The UNet with step caching: the plain UNet's inputs -> its outputs + `deep_feature`."""
    return replace(unet, outputs=(*unet.outputs, feature_spec(unet, spec)))


def shallow_io(unet: ComponentIO, spec: StepCacheSpec) -> ComponentIO:
    """The shallow part: the plain UNet's inputs + `deep_feature` -> the UNet's outputs."""
    return ComponentIO(SHALLOW, (*unet.inputs, feature_spec(unet, spec)), unet.outputs)


def expected_ios(ios: Mapping[str, ComponentIO], spec: StepCacheSpec | None) -> dict[str, ComponentIO]:
    """A family's component IOs as an export with this step-cache record holds them (unchanged without one)."""
    out = dict(ios)
    if spec is not None and UNET in out:
        out[UNET], out[SHALLOW] = full_io(ios[UNET], spec), shallow_io(ios[UNET], spec)
    return out
