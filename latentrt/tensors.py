"""Component IO described once: named tensors with dtypes and symbolic dims that carry ranges.

Everything else is derived from a `ComponentIO` by small pure functions: ONNX dynamic axes,
dummy export inputs, TensorRT min/opt/max profiles (plain data), concrete runtime shapes, and
validation of a runtime feed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import names  # issue 12 (H4): the image side's tensor names
from .buckets import MAX_NATIVE_SIDE, native_size
from .errors import UnsupportedShape
from .families import AutoencoderKind, ConditioningInput, FamilySpec, unet_config_key

# Tensor and dim names are defined in latentrt/names.py; modules that import them from here keep working.
from .names import CLASS_LABELS as CLASS_LABELS
from .names import (
    DIM_BATCH,
    DIM_IMAGE_HEIGHT,
    DIM_IMAGE_WIDTH,
    DIM_LATENT_HEIGHT,
    DIM_LATENT_WIDTH,
    DIM_SEQUENCE,
    DIM_TOKENS,
    DIM_UNET_BATCH,
    ENCODER_HIDDEN_STATES,
    HIDDEN_STATES,
    IMAGES,
    INPUT_IDS,
    LATENT,
    LATENT_PARAMETERS,
    OUT_SAMPLE,
    SAMPLE,
    TEXT_EMBEDS,
    TIMESTEP,
)
from .names import TIME_IDS as TIME_IDS
from .names import TIMESTEP_COND as TIMESTEP_COND


@dataclass(frozen=True)
class Dim:
    """A symbolic dimension with an allowed range [min, max] and a preferred (opt) value."""

    name: str
    min: int
    opt: int
    max: int

    def check(self, value: int) -> None:
        if not self.min <= value <= self.max:
            raise UnsupportedShape(f"{self.name}={value} is outside the supported range [{self.min}, {self.max}]")


@dataclass(frozen=True)
class Scaled:
    """A dimension that is always `factor` times another, e.g. image_height = 8 * latent_height."""

    name: str
    base: Dim
    factor: int


Axis = int | Dim | Scaled
Sizes = Mapping[str, int]  # base dim name -> concrete value
Bounds = Mapping[str, tuple[int, int, int]]  # base dim name -> (min, opt, max)

DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # key of DTYPES
    shape: tuple[Axis, ...]
    high: int | None = None  # integer inputs whose values lie in [0, high) (class labels); None: no recorded bound

    @property
    def dims(self) -> tuple[Dim, ...]:
        """The distinct base dims this tensor depends on."""
        out: list[Dim] = []
        for axis in self.shape:
            base = axis.base if isinstance(axis, Scaled) else axis
            if isinstance(base, Dim) and base not in out:
                out.append(base)
        return tuple(out)


@dataclass(frozen=True)
class ComponentIO:
    component: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def dims(self) -> dict[str, Dim]:
        found: dict[str, Dim] = {}
        for t in self.inputs + self.outputs:
            for d in t.dims:
                found.setdefault(d.name, d)
        return found

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def with_ranges(self, bounds: Bounds) -> ComponentIO:
        """A copy whose dims carry the given (min, opt, max) ranges."""
        def remap(axis: Axis) -> Axis:
            if isinstance(axis, Dim) and axis.name in bounds:
                lo, opt, hi = bounds[axis.name]
                return replace(axis, min=lo, opt=opt, max=hi)
            if isinstance(axis, Scaled):
                return replace(axis, base=remap(axis.base))  # type: ignore[arg-type]
            return axis

        def retensor(t: TensorSpec) -> TensorSpec:
            return replace(t, shape=tuple(remap(a) for a in t.shape))

        return replace(self, inputs=tuple(map(retensor, self.inputs)), outputs=tuple(map(retensor, self.outputs)))


# ---------------------------------------------------------------------------- derivations


def axis_size(axis: Axis, sizes: Sizes) -> int:
    if isinstance(axis, int):
        return axis
    if isinstance(axis, Scaled):
        return sizes[axis.base.name] * axis.factor
    return sizes[axis.name]


def shape_of(tensor: TensorSpec, sizes: Sizes) -> tuple[int, ...]:
    """Concrete shape of a tensor for given base dim sizes."""
    return tuple(axis_size(a, sizes) for a in tensor.shape)


def shapes(io: ComponentIO, sizes: Sizes) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of every input and output (runtime buffer shapes)."""
    return {t.name: shape_of(t, sizes) for t in io.inputs + io.outputs}


def dynamic_axes(io: ComponentIO) -> dict[str, dict[int, str]]:
    """ONNX exporter `dynamic_axes`: tensor -> {axis index: symbolic name}."""
    out: dict[str, dict[int, str]] = {}
    for t in io.inputs + io.outputs:
        axes = {i: a.name for i, a in enumerate(t.shape) if not isinstance(a, int)}
        if axes:
            out[t.name] = axes
    return out


def opt_sizes(io: ComponentIO) -> dict[str, int]:
    return {name: d.opt for name, d in io.dims.items()}


def dummy_inputs(io: ComponentIO, sizes: Sizes | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the right dtype and shape (integers stay below the tensor's `high`, token ids below the vocab)."""
    rng = np.random.default_rng(seed)
    sizes = dict(opt_sizes(io), **(sizes or {}))
    feed: dict[str, np.ndarray] = {}
    for t in io.inputs:
        shape = shape_of(t, sizes)
        if t.dtype.startswith("int"):
            high = t.high or INT_INPUT_HIGH.get(t.name, 1000)
            feed[t.name] = rng.integers(0, high, size=shape).astype(DTYPES[t.dtype])
        elif t.name == TIMESTEP:
            feed[t.name] = rng.uniform(0, 999, size=shape).astype(DTYPES[t.dtype])
        else:
            feed[t.name] = rng.standard_normal(size=shape).astype(DTYPES[t.dtype])
    return feed


INT_INPUT_HIGH = {INPUT_IDS: 49407}
CLIP_BOS, CLIP_EOS = 49406, 49407  # <|startoftext|>, <|endoftext|> (the highest id: CLIP pools at argmax)


def prompt_like(feed: dict[str, np.ndarray], words: int = 8) -> dict[str, np.ndarray]:
    """Make a dummy feed's token ids look like a real prompt: BOS, `words` ids, then EOS padding."""
    if INPUT_IDS in feed:
        ids = feed[INPUT_IDS] % 49000
        ids[:, 0] = CLIP_BOS
        ids[:, words + 1:] = CLIP_EOS
        feed[INPUT_IDS] = ids
    return feed


def profile(io: ComponentIO) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """TensorRT optimization profile as plain data: input -> (min, opt, max) shapes."""
    dims = io.dims.values()
    lo = {d.name: d.min for d in dims}
    opt = {d.name: d.opt for d in dims}
    hi = {d.name: d.max for d in dims}
    return {t.name: (shape_of(t, lo), shape_of(t, opt), shape_of(t, hi)) for t in io.inputs}


def infer_sizes(io: ComponentIO, feed: Mapping[str, Any]) -> dict[str, int]:
    """Read the base dim sizes from a feed's shapes and check them (consistency and ranges)."""
    sizes: dict[str, int] = {}
    for t in io.inputs:
        if t.name not in feed:
            raise UnsupportedShape(f"{io.component}: missing input '{t.name}'")
        actual = tuple(feed[t.name].shape)
        if len(actual) != len(t.shape):
            raise UnsupportedShape(f"{io.component}: input '{t.name}' has rank {len(actual)}, expected {len(t.shape)}")
        for axis, value in zip(t.shape, actual):
            if isinstance(axis, int):
                if axis != value:
                    raise UnsupportedShape(f"{io.component}: input '{t.name}' has shape {actual}, expected {axis} "
                                           f"at an axis of {describe_shape(t)}")
                continue
            base, factor = (axis.base, axis.factor) if isinstance(axis, Scaled) else (axis, 1)
            if value % factor:
                raise UnsupportedShape(f"{io.component}: '{t.name}' axis {axis.name}={value} is not a multiple of {factor}")
            v = value // factor
            if sizes.setdefault(base.name, v) != v:
                raise UnsupportedShape(f"{io.component}: inconsistent {base.name}: {sizes[base.name]} vs {v} "
                                       f"(input '{t.name}')")
    for name, d in io.dims.items():
        if name in sizes:
            d.check(sizes[name])
    return sizes


def context_windows(io: ComponentIO) -> tuple[int, int] | None:
    """(window length, most windows) a UNet's `encoder_hidden_states` takes; None without that input."""
    spec = next((t for t in io.inputs if t.name == ENCODER_HIDDEN_STATES), None)
    seq = spec.shape[1] if spec is not None and len(spec.shape) == 3 else None
    if not isinstance(seq, Dim):
        return (seq, 1) if isinstance(seq, int) else None
    return seq.min, seq.max // seq.min


def describe_shape(t: TensorSpec) -> str:
    return "(" + ", ".join(str(a) if isinstance(a, int) else a.name for a in t.shape) + ")"


# ---------------------------------------------------------------------------- per-family IO


BATCH = Dim(DIM_BATCH, 1, 1, 8)
UNET_BATCH = Dim(DIM_UNET_BATCH, 1, 2, 16)  # 2x batch with classifier-free guidance
TOKENS = Dim(DIM_TOKENS, 1, 77, 77)
PROMPT_WINDOWS = 3  # prompt windows (75 tokens + BOS/EOS each) TensorRT profiles cover by default
MAX_PROMPT_WINDOWS = 64  # windows an export (and so ONNX Runtime / PyTorch) accepts: any multiple of 77 up to 64
SEQUENCE = Dim(DIM_SEQUENCE, 77, 77, MAX_PROMPT_WINDOWS * 77)  # UNet context length: 77 tokens per prompt window
LATENT_H = Dim(DIM_LATENT_HEIGHT, 8, 64, 256)  # image sides 64..2048 px at a VAE factor of 8
LATENT_W = Dim(DIM_LATENT_WIDTH, 8, 64, 256)
MIN_IMAGE_SIDE = 64  # pixels: the smallest image side an export takes, whatever the factor (issue 12, H1)


@dataclass(frozen=True)
class ModelDims:
    """The widths read from a checkpoint's configs (they differ between real and tiny models)."""

    text_hidden: tuple[int, ...]  # hidden size of each text encoder, in spec order
    pooled_dim: int  # projection width of the pooled encoder (0 if none)
    context_dim: int  # UNet cross_attention_dim
    unet_in_channels: int
    latent_channels: int
    vae_scale_factor: int
    max_tokens: int = 77
    time_ids: int = 0
    # named copies of two `unet_config` values, kept so that manifests and callers from before it still read
    time_cond_proj_dim: int = 0  # UNet config `time_cond_proj_dim` (LCM guidance embedding width; 0: none)
    num_class_embeds: int = 0  # UNet config `num_class_embeds`: the class labels it embeds (0: none)
    # the UNet config values the conditioning inputs read ("unet:<key>" widths and bounds); absent keys are 0
    unet_config: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # issue 12 (H2): each text encoder's token id bound (its vocabulary), 0 where none is recorded (CLIP)
    text_vocab: tuple[int, ...] = ()
    # issue 12 (H4): an image encoder (Stable unCLIP); 0 without one
    image_size: int = 0  # the image processor's square crop (the vision tower's image_size)
    image_embed_dim: int = 0  # the image encoder's projection width (image_embeds)
    image_noise_levels: int = 0  # the noise augmentation's num_train_timesteps (noise levels 0 .. n-1)

    def __post_init__(self) -> None:
        """Keep the named copies and `unet_config` in step (either may be given); zero values are left out."""
        named = {k: getattr(self, k) for k in NAMED_UNET_CONFIG}
        config = {k: v for k, v in {**named, **self.unet_config}.items() if v}
        object.__setattr__(self, "unet_config", config)
        for k in NAMED_UNET_CONFIG:
            object.__setattr__(self, k, config.get(k, 0))

    def unet_value(self, key: str) -> int:
        """A UNet config value a conditioning input declares (0: the checkpoint has none)."""
        return self.unet_config.get(key, 0)

    @property
    def image_condition_dim(self) -> int:
        """The noised image embedding ++ its noise level's embedding (Stable unCLIP's UNet class input width)."""
        return 2 * self.image_embed_dim


NAMED_UNET_CONFIG = ("time_cond_proj_dim", "num_class_embeds")  # UNet config keys ModelDims also has as fields


def dims_value(value: int | str | None, m: ModelDims) -> int | None:
    """A spec's width or bound: a number, a `ModelDims` field, a "unet:<key>" config value, or None."""
    if value is None or isinstance(value, int):
        return value
    key = unet_config_key(value)
    got = m.unet_value(key) if key is not None else getattr(m, value, None)
    if not isinstance(got, int) or isinstance(got, bool):
        raise ValueError(f"{value!r} names no integer width of the model (a ModelDims field or 'unet:<config key>')")
    return got


def conditioning_tensor(c: ConditioningInput, m: ModelDims, seq: Dim) -> TensorSpec | None:
    """The UNet input a declared conditioning input becomes (None: an optional one this checkpoint lacks)."""
    width = dims_value(c.width, m)
    if c.optional and not width:
        return None
    if c.sequence and c.tokens is not None:  # issue 12 (H2): a token count of its own, not prompt windows
        seq = Dim(c.tokens_dim, 1, c.tokens, c.tokens)
    if width is None:
        shape: tuple[Axis, ...] = (UNET_BATCH,)  # one value per row (class labels)
    else:
        shape = (UNET_BATCH, seq, width) if c.sequence else (UNET_BATCH, width)
    return TensorSpec(c.name, c.dtype, shape, high=dims_value(c.high, m))


def unet_io(spec: FamilySpec, m: ModelDims, seq: Dim, lh: Dim, lw: Dim) -> ComponentIO:
    """sample, timestep, then every conditioning input the denoiser declares, in declared order -> out_sample."""
    inputs = [TensorSpec(SAMPLE, "float32", (UNET_BATCH, spec.denoiser.in_channels(m.latent_channels), lh, lw)),
              TensorSpec(TIMESTEP, "float32", (UNET_BATCH,))]
    inputs += [t for c in spec.denoiser.conditioning if (t := conditioning_tensor(c, m, seq)) is not None]
    return ComponentIO("unet", tuple(inputs), (TensorSpec(OUT_SAMPLE, "float32", (UNET_BATCH, m.latent_channels, lh, lw)),))


def vae_ios(spec: FamilySpec, m: ModelDims, lh: Dim, lw: Dim) -> tuple[ComponentIO, ComponentIO]:
    """The VAE encoder (KL: posterior mean and log-variance; VQ: latents before quantization) and decoder."""
    f = m.vae_scale_factor
    img = TensorSpec(IMAGES, "float32", (BATCH, 3, Scaled(DIM_IMAGE_HEIGHT, lh, f), Scaled(DIM_IMAGE_WIDTH, lw, f)))
    latent = TensorSpec(LATENT, "float32", (BATCH, m.latent_channels, lh, lw))
    if spec.autoencoder.kind is AutoencoderKind.VQ:
        encoded = latent
    else:
        encoded = TensorSpec(LATENT_PARAMETERS, "float32", (BATCH, 2 * m.latent_channels, lh, lw))
    return ComponentIO("vae_encoder", (img,), (encoded,)), ComponentIO("vae_decoder", (latent,), (img,))


def component_ios(spec: FamilySpec, m: ModelDims) -> dict[str, ComponentIO]:
    """The IO of every component of a family, derived from its structure and the checkpoint's widths."""
    f = m.vae_scale_factor
    tokens = replace(TOKENS, opt=m.max_tokens, max=m.max_tokens)
    seq = replace(SEQUENCE, min=m.max_tokens, opt=m.max_tokens, max=MAX_PROMPT_WINDOWS * m.max_tokens)
    native_h, native_w = native_size(spec, m)  # the checkpoint's own (unet sample_size x f), else the family's
    lo = min(LATENT_H.min, MIN_IMAGE_SIDE // f)  # issue 12, H1: 64 px sides at any factor (4 latents at f = 16)
    lh = replace(LATENT_H, min=lo, opt=max(lo, native_h // f), max=MAX_NATIVE_SIDE // f)
    lw = replace(LATENT_W, min=lo, opt=max(lo, native_w // f), max=MAX_NATIVE_SIDE // f)
    ios: dict[str, ComponentIO] = {}
    for i, (te, width) in enumerate(zip(spec.text_encoders, m.text_hidden)):
        outs = [TensorSpec(HIDDEN_STATES, "float32", (BATCH, tokens, width))]
        if te.pooled:
            outs.append(TensorSpec(TEXT_EMBEDS, "float32", (BATCH, m.pooled_dim)))
        vocab = m.text_vocab[i] if i < len(m.text_vocab) else 0  # token ids lie below it (LDM-BERT)
        ids = TensorSpec(INPUT_IDS, "int64", (BATCH, tokens), high=vocab or None)
        ios[te.component] = ComponentIO(te.component, (ids,), tuple(outs))
    ios["unet"] = unet_io(spec, m, seq, lh, lw)
    ios["vae_encoder"], ios["vae_decoder"] = vae_ios(spec, m, lh, lw)
    ios.update(image_ios(spec, m))
    return {c: ios[c] for c in spec.components}


# issue 12 (H4): Stable unCLIP
def image_ios(spec: FamilySpec, m: ModelDims) -> dict[str, ComponentIO]:
    """The image encoder (pixel_values at the processor's crop -> image_embeds) and the embedding's noising
    (image_embeds, noise, noise_level -> noised_image_embeds, twice as wide); none without an image encoder."""
    image = spec.image_encoder
    if image is None:
        return {}
    size, width = m.image_size, m.image_embed_dim
    embeds = TensorSpec(names.IMAGE_EMBEDS, "float32", (BATCH, width))
    pixels = TensorSpec(names.PIXEL_VALUES, "float32", (BATCH, 3, size, size))
    noise = TensorSpec(names.NOISE, "float32", (BATCH, width))
    level = TensorSpec(names.NOISE_LEVEL, "int64", (BATCH,), high=m.image_noise_levels or None)
    noised = TensorSpec(names.NOISED_IMAGE_EMBEDS, "float32", (BATCH, m.image_condition_dim))
    return {image.component: ComponentIO(image.component, (pixels,), (embeds,)),
            image.noising: ComponentIO(image.noising, (embeds, noise, level), (noised,))}


# ---------------------------------------------------------------------------- (de)serialisation


def _axis_to_json(a: Axis) -> Any:
    if isinstance(a, int):
        return a
    if isinstance(a, Scaled):
        return {"name": a.name, "base": _axis_to_json(a.base), "factor": a.factor}
    return {"name": a.name, "min": a.min, "opt": a.opt, "max": a.max}


def _axis_from_json(d: Any) -> Axis:
    if isinstance(d, int):
        return d
    if "base" in d:
        base = _axis_from_json(d["base"])
        assert isinstance(base, Dim)
        return Scaled(d["name"], base, d["factor"])
    return Dim(d["name"], d["min"], d["opt"], d["max"])


def io_to_json(io: ComponentIO) -> dict[str, Any]:
    def t(x: TensorSpec) -> dict[str, Any]:
        out = {"name": x.name, "dtype": x.dtype, "shape": [_axis_to_json(a) for a in x.shape]}
        return out if x.high is None else {**out, "high": x.high}  # recorded only where set: older IO stays as it was

    return {"component": io.component, "inputs": [t(x) for x in io.inputs], "outputs": [t(x) for x in io.outputs]}


def io_from_json(d: Mapping[str, Any]) -> ComponentIO:
    def t(x: Mapping[str, Any]) -> TensorSpec:
        return TensorSpec(x["name"], x["dtype"], tuple(_axis_from_json(a) for a in x["shape"]), x.get("high"))

    return ComponentIO(d["component"], tuple(t(x) for x in d["inputs"]), tuple(t(x) for x in d["outputs"]))
