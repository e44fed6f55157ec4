"""Which registered family a checkpoint is: its structural facts matched against every family's declared structure.

A checkpoint says what it is through its configs (a diffusers folder) or its tensor names (a single
file): which text encoders it has and which tower each is, the UNet's input channels, whether it has
cross-attention or SDXL's added conditions (and how wide the time ids are), the UNet config values
its conditioning inputs declare (`ConditioningInput.unet_keys`: a class count, a guidance embedding
width, ...), the autoencoder's kind. `mismatches` compares those facts with a `FamilySpec`'s structure
and names each difference; a family fits when there is none. Facts a source cannot tell are None (or
outside `unet_config_keys`) and not compared.
Among the families that fit, the scheduler's prediction type and timestep spacing (SD 2 eps / v,
Turbo's trailing spacing), the pipeline settings and the UNet's sample size pick the usual one; they
never exclude a family, since the runtime reads them from the checkpoint's own scheduler config.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from latentrt.errors import UnknownFamily
from latentrt.families import BUILTIN_CONDITIONING, FAMILIES, AutoencoderKind, FamilySpec, TextTower
from latentrt.names import ENCODER_HIDDEN_STATES_KEYWORD, TIME_IDS

# diffusers' UNet `addition_embed_type` -> the `added_cond_kwargs` keys it reads
ADDITION_KEYS: dict[str | None, tuple[str, ...]] = {None: (), "text_time": ("text_embeds", "time_ids")}
AUTOENCODER_CLASSES = {AutoencoderKind.KL: "AutoencoderKL", AutoencoderKind.VQ: "VQModel"}  # diffusers classes


@dataclass(frozen=True)
class CheckpointFacts:
    """What a checkpoint's configs or tensor names say about its structure (None: this source cannot tell)."""

    text_encoders: Mapping[str, str] | None  # component -> its tower (TextTower value) or its config's hidden_act
    unet_in_channels: int | None
    latent_channels: int | None = None
    unet_out_channels: int | None = None
    cross_attention: bool | None = None  # any cross-attention block (down, mid or up)
    context_dim: int | None = None  # UNet cross_attention_dim
    text_hidden: Mapping[str, int] = field(default_factory=dict)  # component -> hidden_size
    pooled_encoders: frozenset[str] | None = None  # components with a text projection (CLIPTextModelWithProjection)
    pooled_dim: int | None = None  # their projection width
    unet_config: Mapping[str, Any] = field(default_factory=dict)  # UNet config values; absent: diffusers' None
    unet_config_keys: frozenset[str] | None = None  # the UNet config keys this source can tell (None: all)
    addition_embed_type: str | None = None  # None: no addition embedding
    addition_input_dim: int | None = None  # projection_class_embeddings_input_dim
    addition_time_embed_dim: int | None = None
    autoencoder: str | None = None  # the VAE's diffusers class
    unet_class: str | None = None  # issue 12, H1: the denoiser's diffusers class (DenoiserSpec.model)
    prediction: str | None = None  # soft facts: rank the families that fit
    spacing: str | None = None
    pipeline_options: Mapping[str, Any] = field(default_factory=dict)
    image_encoder: bool | None = None  # issue 12 (H4): has an image encoder (Stable unCLIP); None: cannot tell

    def knows(self, key: str) -> bool:
        """Whether this source tells the UNet config value `key` (a missing key then means diffusers' default)."""
        return self.unet_config_keys is None or key in self.unet_config_keys

    def describe(self) -> str:
        """One line for messages: text encoders, UNet input, what it is conditioned on."""
        texts = ", ".join(f"{c} ({t})" for c, t in (self.text_encoders or {}).items()) or "no text encoder"
        extra = [*(f"{k}={v}" for k in sorted(input_config_keys()) if (v := self.unet_config.get(k))),
                 f"addition_embed_type={self.addition_embed_type}" if self.addition_embed_type else "",
                 f"prediction_type={self.prediction}" if self.prediction else ""]
        return ", ".join([texts, f"unet in_channels={self.unet_in_channels}", *filter(None, extra)])


def input_config_keys() -> set[str]:
    """The UNet config keys that give a UNet input: those any built-in kind or registered family's input declares."""
    inputs = [*BUILTIN_CONDITIONING, *(c for s in FAMILIES.values() for c in s.denoiser.conditioning)]
    return {key for c in inputs for key in c.unet_keys}


log = logging.getLogger(__name__)


def tower_fits(tower: TextTower, fact: str) -> bool:
    """A checkpoint's tower fact is the tower itself (single files) or what its config says (CLIP: the activation)."""
    return fact in (tower.value, tower.config_fact)


def in_channels_parts(spec: FamilySpec, latent_channels: int) -> str:
    """'4 latent + 1 mask + 4 masked_image_latents' for messages."""
    parts = [f"{latent_channels} latent"] + [
        f"{latent_channels if c.channels == 'latent_channels' else c.channels} {c.name}" for c in spec.denoiser.concat]
    return " + ".join(parts)


def mismatches(spec: FamilySpec, f: CheckpointFacts, *, towers: bool = True) -> list[str]:
    """How the checkpoint's structure differs from the family's (empty: it fits); `towers` also compares text towers."""
    return [*_text_mismatches(spec, f, towers), *_unet_mismatches(spec, f), *_autoencoder_mismatches(spec, f),
            *_image_mismatches(spec, f)]


def _image_mismatches(spec: FamilySpec, f: CheckpointFacts) -> list[str]:
    """issue 12 (H4): an image encoder where the family declares one (Stable unCLIP); one the family does not use
    (an IP-Adapter's, in an SD pipeline folder) is harmless."""
    if spec.image_encoder is None or f.image_encoder is None or f.image_encoder:
        return []
    return [f"no image encoder, which family {spec.name} needs"]


def _text_mismatches(spec: FamilySpec, f: CheckpointFacts, towers: bool) -> list[str]:
    out: list[str] = []
    if f.text_encoders is not None:
        have, want = sorted(f.text_encoders), sorted(te.component for te in spec.text_encoders)
        if have != want:
            out.append(f"text encoders {', '.join(have) or 'none'} (family {spec.name} has {', '.join(want) or 'none'})")
        elif towers:
            out += [f"{te.component} is {f.text_encoders[te.component]!r}, not {te.tower.value} "
                    f"({te.tower.hidden_act})" for te in spec.text_encoders
                    if not tower_fits(te.tower, f.text_encoders[te.component])]
    if f.pooled_encoders is not None:  # a projection the family does not use is harmless
        out += [f"{te.component} has no text projection (CLIPTextModelWithProjection), which family {spec.name} "
                "pools" for te in spec.text_encoders if te.pooled and te.component not in f.pooled_encoders]
    return out


def _unet_mismatches(spec: FamilySpec, f: CheckpointFacts) -> list[str]:
    out: list[str] = []
    d = spec.denoiser
    if f.unet_class is not None and f.unet_class != d.model:  # issue 12, H1: UNet2DModel denoisers
        out.append(f"unet is a {f.unet_class}, not a {d.model}")
    latent = f.latent_channels or spec.autoencoder.latent_channels
    if f.unet_in_channels is not None and f.unet_in_channels != d.in_channels(latent):
        out.append(f"unet in_channels {f.unet_in_channels} != {d.in_channels(latent)} "
                   f"({in_channels_parts(spec, latent)})")
    if f.unet_out_channels is not None and f.unet_out_channels != latent:
        out.append(f"unet out_channels {f.unet_out_channels} != {latent} latent channels")
    context = d.keyword_input(ENCODER_HIDDEN_STATES_KEYWORD) is not None
    if f.cross_attention is not None and f.cross_attention != context:
        out.append("unet has cross-attention blocks but the family takes no text context" if f.cross_attention
                   else "unet has no cross-attention blocks but the family takes a text context")
    if context and f.context_dim is not None and f.text_hidden and f.text_encoders is not None:
        width = sum(f.text_hidden.get(te.component, 0) for te in spec.text_encoders)
        if f.context_dim != width:
            out.append(f"unet cross_attention_dim {f.context_dim} != text width {width}")
    out += _config_mismatches(spec, f)
    out += _addition_mismatches(spec, f)
    return out


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _config_mismatches(spec: FamilySpec, f: CheckpointFacts) -> list[str]:
    """The UNet config values the declared inputs read or fix, and no value that gives an undeclared input."""
    out: list[str] = []
    for c in spec.denoiser.conditioning:
        missing = [key for key in c.config_keys if not c.optional and f.knows(key)
                   and not _positive(f.unet_config.get(key))]
        out += [f"unet has no {key}, which input {c.name} reads" for key in missing]
        out += [f"unet {key} {f.unet_config.get(key)!r} != {want!r} (input {c.name})" for key, want in c.unet_config
                if key not in missing and f.knows(key) and f.unet_config.get(key) != want]
    declared = {key for c in spec.denoiser.conditioning for key in c.unet_keys}
    out += [f"unet {key}={f.unet_config[key]!r} gives a UNet input that family {spec.name} does not declare"
            for key in sorted(input_config_keys() - declared) if f.knows(key) and f.unet_config.get(key)]
    return out


def _addition_mismatches(spec: FamilySpec, f: CheckpointFacts) -> list[str]:
    """SDXL's added conditions: which keys the UNet's addition embedding reads, and how wide its time ids are."""
    declared = spec.denoiser.added_conditions
    keys = ADDITION_KEYS.get(f.addition_embed_type)
    if keys is None:
        return [f"unet addition_embed_type {f.addition_embed_type!r} is not supported"]
    if set(keys) != set(declared):
        return [f"unet addition embedding (addition_embed_type {f.addition_embed_type!r}) reads "
                f"{', '.join(keys) or 'nothing'}, but the family declares {', '.join(declared) or 'none'}"]
    ids = spec.denoiser.conditioning_input(TIME_IDS)
    if ids is None or not isinstance(ids.width, int) or f.addition_input_dim is None \
            or f.addition_time_embed_dim is None or f.pooled_dim is None:
        return []
    want = f.pooled_dim + ids.width * f.addition_time_embed_dim
    if f.addition_input_dim != want:
        return [f"unet projection_class_embeddings_input_dim {f.addition_input_dim} != pooled {f.pooled_dim} + "
                f"{ids.width} time ids x addition_time_embed_dim {f.addition_time_embed_dim} = {want}"]
    return []


def _autoencoder_mismatches(spec: FamilySpec, f: CheckpointFacts) -> list[str]:
    want = AUTOENCODER_CLASSES[spec.autoencoder.kind]
    return [f"vae is a {f.autoencoder}, not a {want}"] if f.autoencoder is not None and f.autoencoder != want else []


def preference(spec: FamilySpec, f: CheckpointFacts) -> tuple[bool, bool, bool, bool]:
    """How well the soft facts agree with the family's defaults (prediction, spacing, pipeline settings, size).

    The last, the UNet's `sample_size` against the family's native latent size, only breaks ties
    between look-alikes trained at different sizes (the 64x64 demo model and SD 1.x).
    """
    size = f.unet_config.get("sample_size") if f.knows("sample_size") else None
    return (f.prediction is None or f.prediction == spec.prediction.value,
            f.spacing is None or f.spacing == spec.sampling.spacing.value,
            all(f.pipeline_options.get(k, v) == v for k, v in spec.pipeline_options),
            not isinstance(size, int) or size == spec.native_size[0] // spec.vae_scale_factor)


def fitting_families(f: CheckpointFacts) -> list[FamilySpec]:
    """Every registered family the facts fit, the best agreement with the soft facts first (else registry order).

    When no family fits only because a text encoder is another known tower (diffusers' own SDXL test
    configs give CLIP-L OpenCLIP's gelu), the families that fit in everything else are taken, with a log
    line: the tower decides nothing at run time. An activation no tower has still fits nothing.
    """
    fits = [s for s in FAMILIES.values() if not mismatches(s, f)]
    if not fits and _known_towers(f):
        fits = [s for s in FAMILIES.values() if not mismatches(s, f, towers=False)]
        for s in fits[:1]:
            log.info("%s: text encoder towers %s differ from %s's; detected by structure", f.describe(),
                     dict(f.text_encoders or {}), s.name)
    return sorted(fits, key=lambda s: tuple(not x for x in preference(s, f)))  # stable: registry order on ties


def _known_towers(f: CheckpointFacts) -> bool:
    """Whether every text encoder fact names some known tower (its id or its activation)."""
    facts = (f.text_encoders or {}).values()
    return bool(facts) and all(any(tower_fits(t, fact) for t in TextTower) for fact in facts)


def nearest_mismatch(f: CheckpointFacts) -> str:
    """'nearest: sd1 (unet in_channels 7 != 4 (4 latent))': the family with the fewest differences."""
    ranked = sorted(FAMILIES.values(), key=lambda s: len(mismatches(s, f)))
    if not ranked:
        return "no family is registered"
    best = ranked[0]
    return f"nearest: {best.name} ({'; '.join(mismatches(best, f))})"


def match_family(f: CheckpointFacts, where: str) -> FamilySpec:
    """The registered family the facts fit (the usual one among look-alikes); UnknownFamily naming the mismatch."""
    fits = fitting_families(f)
    if not fits:
        raise UnknownFamily(f"{where}: {f.describe()} matches no supported family ({nearest_mismatch(f)}); "
                            "pass --family to choose one")
    return fits[0]
