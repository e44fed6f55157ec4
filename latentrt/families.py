"""Model families as data: one frozen spec per Stable Diffusion family, and a registry.

Code asks the spec (``spec.uses_cfg``, ``spec.denoiser.takes(...)``, ``spec.refines``) instead of branching on
family ids.
Concrete widths (context, pooled, channels) come from the checkpoint's configs, not from here:
the spec holds what is true of every checkpoint of the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from . import names
from .buckets import SDXL_BUCKETS, Size, scaled_buckets
from .errors import UnknownFamily


class FamilyId(str, Enum):
    SD1 = "sd1"
    SD1_INPAINT = "sd1-inpaint"
    SD2 = "sd2"
    SD2_V = "sd2-v"
    SD2_INPAINT = "sd2-inpaint"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl-refiner"
    SDXL_TURBO = "sdxl-turbo"
    SD_TURBO = "sd-turbo"
    # issue 12, H1: the original latent diffusion models (CompVis latent-diffusion)
    LDM = "ldm"
    LDM_CLASS_COND = "ldm-class-cond"
    LDM_SUPER_RES = "ldm-super-res"
    # issue 12 (H2): original latent diffusion, text-to-image
    LDM_TEXT2IMG = "ldm-text2img"
    # issue 12, H3: SD 2 depth-to-image and the SD x4 upscaler
    SD2_DEPTH = "sd2-depth"
    SD_X4_UPSCALER = "sd-x4-upscaler"
    # issue 12 (H4): Stable unCLIP
    SD2_UNCLIP = "sd2-unclip"
    DEMO = "demo"  # LatentRT's built-in trained demo model (procedural scenes, 64x64)
    DEMO_TURBO = "demo-turbo"  # its few-step distilled student


class Prediction(str, Enum):
    EPS = "epsilon"
    V = "v_prediction"
    SAMPLE = "sample"  # the model predicts x0 itself


class HiddenState(str, Enum):
    LAST = "last"  # last_hidden_state, after the final layer norm (SD 1.x; SD 2.x ckpts drop their last layer)
    PENULTIMATE = "penultimate"  # hidden_states[-2], no final layer norm (SDXL)


class TextTower(str, Enum):
    """The pretrained text model an encoder is (decides its tokenizer flavour and activation)."""

    CLIP_L = "clip-vit-l-14"  # OpenAI CLIP ViT-L/14 (quick_gelu): SD 1.x, SDXL encoder 1
    OPENCLIP_H = "openclip-vit-h-14"  # OpenCLIP ViT-H/14 (gelu): SD 2.x, SD-Turbo
    OPENCLIP_BIGG = "openclip-vit-bigg-14"  # OpenCLIP ViT-bigG/14 (gelu): SDXL encoder 2, refiner
    LDM_BERT = "ldm-bert"  # issue 12 (H2): LDM-BERT (Rombach et al. 2022), diffusers' LDMBertModel, BERT tokenizer

    @property
    def hidden_act(self) -> str:
        """The activation its transformers config names (`hidden_act`): how a checkpoint tells the towers apart."""
        return "quick_gelu" if self is TextTower.CLIP_L else "gelu"

    # issue 12 (H2): towers that are not CLIP
    @property
    def is_clip(self) -> bool:
        """A CLIP text transformer with CLIP's BPE tokenizer (pools at `<|endoftext|>`, the highest id)."""
        return self is not TextTower.LDM_BERT

    @property
    def config_fact(self) -> str:
        """What its config says it is: CLIP configs their `hidden_act`, others their `model_type` ("ldmbert")."""
        return "ldmbert" if self is TextTower.LDM_BERT else self.hidden_act

    @property
    def tokenizer_class(self) -> str:
        """The transformers tokenizer class its checkpoints save (diffusers loads it by that name)."""
        return "BertTokenizer" if self is TextTower.LDM_BERT else "CLIPTokenizer"


class TimeIds(str, Enum):
    NONE = "none"
    SIZE_CROP_TARGET = "size_crop_target"  # SDXL base: original (h, w), crop top-left (y, x), target (h, w)
    SIZE_CROP_AESTHETIC = "size_crop_aesthetic"  # SDXL refiner: original (h, w), crop (y, x), aesthetic score

    @property
    def width(self) -> int:
        return {TimeIds.NONE: 0, TimeIds.SIZE_CROP_TARGET: 6, TimeIds.SIZE_CROP_AESTHETIC: 5}[self]


class Spacing(str, Enum):
    LEADING = "leading"
    TRAILING = "trailing"
    LINSPACE = "linspace"


class SamplerId(str, Enum):
    """Sampler names users pick (`--sampler`); runtime/scheduler_config.py maps each to a diffusers scheduler class."""

    EULER = "euler"
    EULER_ANCESTRAL = "euler_a"
    HEUN = "heun"
    DPM_2 = "dpm_2"
    DPM_2_ANCESTRAL = "dpm_2_a"
    LMS = "lms"
    PNDM = "pndm"  # PNDMScheduler as configured (SD 1.5 ships skip_prk_steps=True)
    PLMS = "plms"  # PNDMScheduler with skip_prk_steps=True (pseudo linear multistep only)
    DDIM = "ddim"
    DDPM = "ddpm"
    DPMPP_2M = "dpmpp_2m"
    DPMPP_2M_KARRAS = "dpmpp_2m_karras"
    DPMPP_2M_SDE = "dpmpp_2m_sde"
    DPMPP_3M_SDE = "dpmpp_3m_sde"
    DPMPP_SDE = "dpmpp_sde"
    DPMPP_2S = "dpmpp_2s"
    UNIPC = "unipc"
    DEIS = "deis"
    LCM = "lcm"
    TCD = "tcd"


@dataclass(frozen=True)
class TextEncoderSpec:
    component: str  # folder / component name: "text_encoder" or "text_encoder_2"
    tokenizer: str  # "tokenizer" or "tokenizer_2"
    hidden_state: HiddenState  # which hidden state feeds the UNet context
    pooled: bool  # also gives the pooled projection (SDXL's `text_embeds`)
    tower: TextTower  # which pretrained text model it is


@dataclass(frozen=True)
class ImageEncoderSpec:
    """A CLIP image tower conditioning the UNet on an image embedding (Stable unCLIP; Ramesh et al. 2022).

    Two exported components: `component` (pixel_values -> image_embeds, the processor's crop) and
    `noising` (the embedding noise-augmented at a noise level, ++ that level's timestep embedding).
    """

    component: str = "image_encoder"  # folder / component: transformers CLIPVisionModelWithProjection
    processor: str = "feature_extractor"  # folder: transformers CLIPImageProcessor (resize, crop, normalize)
    normalizer: str = "image_normalizer"  # folder: diffusers StableUnCLIPImageNormalizer (embedding mean / std)
    noising_scheduler: str = "image_noising_scheduler"  # folder: the DDPM schedule of the noise augmentation
    noising: str = "image_noising"  # exported component: normalize, add noise, unnormalize, ++ level embedding


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule (betas), as diffusers' schedulers read it from scheduler_config.json."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # linear | scaled_linear (linspace(sqrt(start), sqrt(end), T) ** 2) | squaredcos_cap_v2
    num_train_timesteps: int = 1000
    trained_betas: tuple[float, ...] | None = None  # explicit betas (win over beta_schedule)
    rescale_zero_snr: bool = False  # rescale_betas_zero_snr: Lin et al. 2023 (arXiv:2305.08891), algorithm 1


@dataclass(frozen=True)
class SamplingDefaults:
    sampler: SamplerId
    steps: int
    guidance: float  # <= 1 means no classifier-free guidance (and no CFG batch)
    spacing: Spacing


class AutoencoderKind(str, Enum):
    KL = "kl"  # diffusers AutoencoderKL: a Gaussian posterior (SD, SDXL, LDM-KL)
    VQ = "vq"  # diffusers VQModel: the decoder quantizes to the codebook first (LDM-VQ)


@dataclass(frozen=True)
class AutoencoderSpec:
    """The latent space's autoencoder; the checkpoint's VAE config wins over these defaults."""

    kind: AutoencoderKind = AutoencoderKind.KL
    factor: int = 8  # pixels per latent (downsampling factor f = 4, 8, 16)
    latent_channels: int = 4
    scaling_factor: float = 0.18215


ADDED_COND_KWARGS = "added_cond_kwargs"  # diffusers UNet keyword holding SDXL's added conditions
UNET_CONFIG = "unet:"  # a width or bound read from the UNet config key after the prefix ("unet:num_class_embeds")


def unet_config_key(value: int | str | None) -> str | None:
    """The UNet config key a width or bound reads ("unet:time_cond_proj_dim" -> "time_cond_proj_dim"), if any."""
    return value[len(UNET_CONFIG):] if isinstance(value, str) and value.startswith(UNET_CONFIG) else None


@dataclass(frozen=True)
class ConditioningInput:
    """One conditioning input the denoiser declares: an ONNX input of the UNet, passed to diffusers by keyword.

    `width` is the feature width per row: a number, the name of a `ModelDims` field read from the
    checkpoint (e.g. "context_dim"), a UNet config key prefixed "unet:" (e.g. "unet:time_cond_proj_dim":
    `model_dims` reads it into `ModelDims.unet_config`), or None for one value per row (class labels).
    `high` bounds an integer input's values to [0, high) the same way. `unet_config` holds the UNet
    config settings every checkpoint with this input has (detection compares each, naming the key; a
    tiny UNet gets them), `tiny_config` the ones only a tiny UNet gets (a count real checkpoints differ
    in). `provider` names the runtime function that builds the tensor for a request (runtime/providers.py).
    """

    name: str  # the UNet's input tensor name (ONNX input, engine feed key)
    keyword: str  # diffusers UNet forward keyword; "added_cond_kwargs.<key>" for SDXL's added conditions
    provider: str  # runtime provider key
    width: int | str | None = None
    dtype: str = "float32"
    sequence: bool = False  # (rows, sequence, width): a cross-attention context of prompt windows
    optional: bool = False  # exported only when the checkpoint has it (its width field is non-zero)
    high: int | str | None = None  # integer inputs: values lie in [0, high)
    unet_config: tuple[tuple[str, Any], ...] = ()  # UNet config settings every checkpoint with it has
    tiny_config: tuple[tuple[str, Any], ...] = ()  # UNet config settings a tiny checkpoint gets for it
    # issue 12 (H2): a sequence of its own (layout boxes encoded as tokens): at most this many tokens, on the dim
    # `tokens_dim`; None: a sequence input is a context of prompt windows (77 tokens each)
    tokens: int | None = None

    @property
    def tokens_dim(self) -> str:
        """The name of the sequence dim of an input with a token count of its own ("<name>_tokens")."""
        return f"{self.name}_tokens"

    @property
    def config_keys(self) -> tuple[str, ...]:
        """The UNet config keys its width and bound read ("unet:<key>"), in that order."""
        return tuple(k for v in (self.width, self.high) if (k := unet_config_key(v)) is not None)

    @property
    def unet_keys(self) -> tuple[str, ...]:
        """Every UNet config key this input declares: the ones its width / bound read, then its settings."""
        return tuple(dict.fromkeys((*self.config_keys, *(k for k, _ in self.unet_config))))

    @property
    def added_condition(self) -> str | None:
        """The `added_cond_kwargs` key diffusers takes this input under (SDXL's text_embeds, time_ids), if any."""
        head, _, key = self.keyword.partition(".")
        return key if head == ADDED_COND_KWARGS and key else None


@dataclass(frozen=True)
class ConcatInput:
    """A piece concatenated to the latents on the channel axis before the UNet (mask, depth, low-res image)."""

    name: str
    channels: int | str  # a number, or "latent_channels"
    provider: str  # runtime provider key
    # issue 12, H1: the piece is the request's image at latent resolution (LDM super-resolution's low-res image):
    # the image conditions the model instead of starting img2img, and its size sets the latent size
    request_image: bool = False


@dataclass(frozen=True)
class DenoiserSpec:
    """The UNet: what it predicts, its conditioning inputs (after sample and timestep), its concatenated pieces."""

    prediction: Prediction
    conditioning: tuple[ConditioningInput, ...]
    concat: tuple[ConcatInput, ...] = ()
    model: str = "UNet2DConditionModel"  # the diffusers class (issue 12, H1: UNET_2D, no cross-attention at all)

    @property
    def image_piece(self) -> ConcatInput | None:
        """The concatenated piece built from the request's image (LDM super-resolution), if any."""
        return next((c for c in self.concat if c.request_image), None)

    def in_channels(self, latent_channels: int) -> int:
        """UNet input channels: the latents plus every concatenated piece."""
        return latent_channels + sum(latent_channels if c.channels == "latent_channels" else int(c.channels)
                                     for c in self.concat)

    def takes(self, name: str) -> bool:
        """Whether the denoiser declares the conditioning input or concatenated piece `name`."""
        return any(c.name == name for c in self.conditioning) or any(c.name == name for c in self.concat)

    def conditioning_input(self, name: str) -> ConditioningInput | None:
        return next((c for c in self.conditioning if c.name == name), None)

    def keyword_input(self, keyword: str) -> ConditioningInput | None:
        """The conditioning input diffusers takes under `keyword` ("encoder_hidden_states"), whatever its name."""
        return next((c for c in self.conditioning if c.keyword == keyword), None)

    @property
    def added_conditions(self) -> tuple[str, ...]:
        """The `added_cond_kwargs` keys the UNet takes (("text_embeds", "time_ids") for SDXL), in declared order."""
        return tuple(key for c in self.conditioning if (key := c.added_condition) is not None)


# The conditioning kinds the built-in families use; a new family may declare its own.
CONTEXT = ConditioningInput(names.ENCODER_HIDDEN_STATES, names.ENCODER_HIDDEN_STATES_KEYWORD, "text_context",
                            width="context_dim", sequence=True)
POOLED = ConditioningInput(names.TEXT_EMBEDS, "added_cond_kwargs.text_embeds", "text_pooled", width="pooled_dim")
TIME_IDS_SIZE_CROP_TARGET = ConditioningInput(names.TIME_IDS, "added_cond_kwargs.time_ids", "time_ids_size_crop_target",
                                              width=6)  # SDXL base: original (h, w), crop (y, x), target (h, w)
TIME_IDS_SIZE_CROP_AESTHETIC = ConditioningInput(names.TIME_IDS, "added_cond_kwargs.time_ids",
                                                 "time_ids_size_crop_aesthetic",
                                                 width=5)  # SDXL refiner: original (h, w), crop (y, x), score
GUIDANCE_EMBEDDING = ConditioningInput(names.TIMESTEP_COND, names.TIMESTEP_COND_KEYWORD, "guidance_embedding",
                                       width="unet:time_cond_proj_dim", optional=True)  # LCM: w-embedding
# one class per row, below the UNet's class count; a plain embedding table (no class_embed_type)
CLASS_LABEL = ConditioningInput(names.CLASS_LABELS, names.CLASS_LABELS_KEYWORD, "class_label", dtype="int64",
                                high="unet:num_class_embeds", unet_config=(("class_embed_type", None),),
                                tiny_config=(("num_class_embeds", 10),))
MASK = ConcatInput(names.MASK, 1, "inpaint_mask")  # 1 = repaint, at latent resolution
MASKED_IMAGE_LATENTS = ConcatInput(names.MASKED_IMAGE_LATENTS, "latent_channels", "masked_image_latents")
# ---- issue 12 (H3): depth maps, the x4 upscaler's noise level and noised low-res image, generic maps
# the request's depth map (PNG/NPY), resized bicubically to latent resolution and normalized to [-1, 1] per image
DEPTH_MAP = ConcatInput(names.DEPTH_MAP, 1, "depth_map")
# the low-res image, noised by the pipeline's low_res_scheduler at the request's noise level (3 channels, [-1, 1])
NOISED_LOW_RES_IMAGE = ConcatInput(names.LOW_RES_IMAGE, 3, "noised_low_res_image", request_image=True)
# the x4 upscaler embeds that noise level as its class label (a plain embedding table of num_class_embeds rows)
NOISE_LEVEL = ConditioningInput(names.CLASS_LABELS, names.CLASS_LABELS_KEYWORD, "noise_level", dtype="int64",
                                high="unet:num_class_embeds", unet_config=(("class_embed_type", None),),
                                tiny_config=(("num_class_embeds", 1000),))

BUILTIN_CONDITIONING = (CONTEXT, POOLED, TIME_IDS_SIZE_CROP_TARGET, TIME_IDS_SIZE_CROP_AESTHETIC, GUIDANCE_EMBEDDING,
                        CLASS_LABEL)


# issue 12 (H2): a cross-attention context given directly by the request (item 5b of issue 12)
TINY_TOKEN_WIDTH = 32  # the cross_attention_dim a tiny UNet gets for a token sequence (no text encoder sets it)


def token_sequence(tokens: int, name: str = names.ENCODER_HIDDEN_STATES) -> ConditioningInput:
    """A token sequence through cross-attention (Rombach et al. 2022, sec. 4.3: layout boxes encoded as tokens).

    The request gives each prompt slot's (tokens, width) sequence itself (`conditioning[name]`; the
    unconditional CFG half `negative_<name>`), 1..`tokens` tokens wide as the UNet's cross_attention_dim;
    the runtime provider "token_sequence" feeds it to diffusers' `encoder_hidden_states`.
    """
    return ConditioningInput(name, names.ENCODER_HIDDEN_STATES_KEYWORD, "token_sequence", width="context_dim",
                             sequence=True, tokens=tokens, tiny_config=(("cross_attention_dim", TINY_TOKEN_WIDTH),))


TIME_IDS_KINDS = {TIME_IDS_SIZE_CROP_TARGET.provider: TimeIds.SIZE_CROP_TARGET,  # by provider key
                  TIME_IDS_SIZE_CROP_AESTHETIC.provider: TimeIds.SIZE_CROP_AESTHETIC}


@dataclass(frozen=True)
class ReferenceWidths:
    """The widths of a family's reference checkpoint (its diffusers configs) the memory estimate falls back on."""

    attention_factor: int = 1  # latent downsampling of the first UNet block with self-attention (SD 1/2: 1, SDXL: 2)
    attention_heads: int = 8  # heads of that block
    unet_channels: int = 320  # UNet block_out_channels[0]
    vae_channels: int = 128  # VAE block_out_channels[0]: the decoder's full-resolution width


@dataclass(frozen=True)
class FamilySpec:
    id: FamilyId | str  # a FamilyId for the built-in families; `name` is its string
    title: str
    text_encoders: tuple[TextEncoderSpec, ...]
    denoiser: DenoiserSpec
    native_size: Size  # (height, width) pixels
    buckets: tuple[Size, ...]
    sampling: SamplingDefaults
    autoencoder: AutoencoderSpec = AutoencoderSpec()
    schedule: NoiseSchedule = NoiseSchedule()
    zero_negative_for_empty_prompt: bool = False  # SDXL: force_zeros_for_empty_prompt
    min_turbo_steps_x_strength: float = 0.0  # Turbo img2img: steps * strength must reach 1
    fp16_vae_overflows: bool = False  # the VAE overflows to NaN in fp16 (SDXL): engines keep it fp32
    fp32_attention: bool = False  # fp16 attention softmax/matmul overflows (SD 2.x): engines keep them fp32
    reference_repo: str | None = None  # hub id of the family's reference checkpoint (configs for single files)
    # diffusers' StableDiffusion[Img2Img|Inpaint]Pipeline.__init__ rewrites the scheduler config it loads:
    # steps_offset != 1 -> 1 and clip_sample True -> False (SDXL pipelines do not)
    pipeline_fixes_scheduler: bool = False
    # the diffusers pipeline class the family's checkpoints are saved as (model_index.json `_class_name`; tiny
    # checkpoints are saved, single files read as it) and the pipeline settings its reference checkpoint has
    pipeline_class: str = "StableDiffusionPipeline"
    pipeline_options: tuple[tuple[str, Any], ...] = ()
    # the families whose latents this one continues (a refiner: same latent space, the later denoising steps),
    # first the family it was trained after
    refines: tuple[str, ...] = ()
    reference_widths: ReferenceWidths = ReferenceWidths()  # for memory estimates of exports that record none
    # issue 12, H1: the pipeline samples the autoencoder's latents unscaled, whatever its config's scaling_factor
    # (LDMSuperResolutionPipeline decodes its latents as they are)
    unscaled_latents: bool = False
    image_encoder: ImageEncoderSpec | None = None  # issue 12 (H4): an image-embedding condition (Stable unCLIP)

    @property
    def name(self) -> str:
        """The family's id as a string ('sd1', 'sdxl', ...)."""
        return self.id.value if isinstance(self.id, FamilyId) else self.id

    @property
    def prediction(self) -> Prediction:
        return self.denoiser.prediction

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return self.autoencoder.factor

    @property
    def vae_scaling_factor(self) -> float:
        return self.autoencoder.scaling_factor

    @property
    def unet_in_channels(self) -> int:
        """UNet input channels: the latents plus every concatenated piece the denoiser declares."""
        return self.denoiser.in_channels(self.latent_channels)

    @property
    def time_ids(self) -> TimeIds:
        """Which declared `time_ids` input the denoiser takes, as a TimeIds kind (NONE without one), by its provider."""
        ids = self.denoiser.conditioning_input(names.TIME_IDS)
        if ids is None:
            return TimeIds.NONE
        kind = TIME_IDS_KINDS.get(ids.provider)
        if kind is None:
            raise ValueError(f"family {self.name}'s time_ids input (provider {ids.provider!r}) is not a built-in "
                             f"TimeIds kind ({', '.join(TIME_IDS_KINDS)}); read its width from the input instead")
        return kind

    @property
    def uses_cfg(self) -> bool:
        """Whether the family's default sampling runs classifier-free guidance (a 2B UNet batch)."""
        return self.sampling.guidance > 1.0

    @property
    def image_conditioned(self) -> bool:
        """Whether a concatenated piece is made from the request's image (no img2img: the x4 upscaler)."""
        return self.denoiser.image_piece is not None

    @property
    def takes_mask(self) -> bool:
        """Whether the denoiser takes a mask piece: its requests give an init image and a mask (inpainting mode)."""
        return self.denoiser.takes(MASK.name)

    @property
    def is_inpaint(self) -> bool:
        """Whether the denoiser takes a mask and the masked image's latents (a dedicated inpainting UNet)."""
        return self.denoiser.takes(MASK.name) and self.denoiser.takes(MASKED_IMAGE_LATENTS.name)

    @property
    def is_turbo(self) -> bool:
        """A few-step distilled family: its default sampling is 1-4 steps without guidance."""
        return not self.uses_cfg and self.sampling.steps <= 4

    @property
    def has_pooled(self) -> bool:
        """Whether the denoiser takes pooled text embeddings (`text_embeds`)."""
        return self.denoiser.takes(POOLED.name)

    @property
    def components(self) -> tuple[str, ...]:
        """Exported components in pipeline order."""
        image = () if self.image_encoder is None else (self.image_encoder.component, self.image_encoder.noising)
        return tuple(te.component for te in self.text_encoders) + image + ("unet", "vae_encoder", "vae_decoder")


_CLIP_L = TextEncoderSpec("text_encoder", "tokenizer", HiddenState.LAST, pooled=False, tower=TextTower.CLIP_L)
_OPENCLIP_H = TextEncoderSpec("text_encoder", "tokenizer", HiddenState.LAST, pooled=False,
                              tower=TextTower.OPENCLIP_H)
_XL_L = TextEncoderSpec("text_encoder", "tokenizer", HiddenState.PENULTIMATE, pooled=False, tower=TextTower.CLIP_L)
_XL_G = TextEncoderSpec("text_encoder_2", "tokenizer_2", HiddenState.PENULTIMATE, pooled=True,
                        tower=TextTower.OPENCLIP_BIGG)
_LDM_BERT = TextEncoderSpec("text_encoder", "tokenizer", HiddenState.LAST, pooled=False,
                            tower=TextTower.LDM_BERT)  # issue 12 (H2): checkpoints name the folder `bert`

_SD_STEPS = SamplingDefaults(SamplerId.EULER, 30, 7.5, Spacing.LEADING)
_XL_STEPS = SamplingDefaults(SamplerId.EULER, 30, 5.0, Spacing.LEADING)
_TURBO = SamplingDefaults(SamplerId.EULER, 1, 0.0, Spacing.TRAILING)

_B512 = scaled_buckets(512)
_B768 = scaled_buckets(768)

_SD_EPS = DenoiserSpec(Prediction.EPS, (CONTEXT, GUIDANCE_EMBEDDING))
_SD_V = DenoiserSpec(Prediction.V, (CONTEXT, GUIDANCE_EMBEDDING))
_SD_INPAINT = DenoiserSpec(Prediction.EPS, (CONTEXT, GUIDANCE_EMBEDDING), (MASK, MASKED_IMAGE_LATENTS))
_XL_BASE = DenoiserSpec(Prediction.EPS, (CONTEXT, POOLED, TIME_IDS_SIZE_CROP_TARGET, GUIDANCE_EMBEDDING))
_XL_REFINER = DenoiserSpec(Prediction.EPS, (CONTEXT, POOLED, TIME_IDS_SIZE_CROP_AESTHETIC, GUIDANCE_EMBEDDING))
_XL_VAE = AutoencoderSpec(scaling_factor=0.13025)
_SD2_WIDTHS = ReferenceWidths(attention_heads=5)  # SD 2.x / SD-Turbo: attention_head_dim 5, 10, 20, 20
# the built-in demo model (training/train_demo.py): 64x64 scenes, f = 8, a 2-level UNet with 8 heads, VAE width 16
_DEMO_SIZE = (64, 64)
_DEMO_STEPS = SamplingDefaults(SamplerId.DDIM, 20, 4.0, Spacing.LEADING)
_DEMO_TURBO = SamplingDefaults(SamplerId.EULER, 1, 0.0, Spacing.TRAILING)
_DEMO_WIDTHS = ReferenceWidths(attention_heads=8, unet_channels=32, vae_channels=16)
_XL_WIDTHS = ReferenceWidths(attention_factor=2, attention_heads=10)  # SDXL: no attention at full resolution
_INPAINT_PIPELINE = "StableDiffusionInpaintPipeline"
# issue 12 (H3): SD 2 depth-to-image (eps, OpenCLIP-H, 4 latent + 1 depth channels); the x4 upscaler (v, OpenCLIP-H,
# 4 latent + 3 low-res image channels, noise-level class labels, an f = 4 VAE scaled by 0.08333, DDIM 75 steps,
# guidance 9, betas 1e-4..2e-2 scaled_linear as its scheduler_config.json)
_SD_DEPTH = DenoiserSpec(Prediction.EPS, (CONTEXT, GUIDANCE_EMBEDDING), (DEPTH_MAP,))
_SD_UPSCALER = DenoiserSpec(Prediction.V, (CONTEXT, NOISE_LEVEL), (NOISED_LOW_RES_IMAGE,))
_UPSCALER_VAE = AutoencoderSpec(AutoencoderKind.KL, factor=4, latent_channels=4, scaling_factor=0.08333)
_UPSCALER_STEPS = SamplingDefaults(SamplerId.DDIM, 75, 9.0, Spacing.LEADING)
_UPSCALER_SCHEDULE = NoiseSchedule(beta_start=0.0001, beta_end=0.02)
_XL_PIPELINE = "StableDiffusionXLPipeline"

# keyed by `spec.id`: FamilyId members are str enums, so FAMILIES["sd1"] finds FamilyId.SD1's spec
FAMILIES: dict[FamilyId | str, FamilySpec] = {
    s.id: s
    for s in (
        FamilySpec(FamilyId.SD1, "Stable Diffusion 1.x", (_CLIP_L,), _SD_EPS, (512, 512), _B512, _SD_STEPS,
                   pipeline_fixes_scheduler=True,
                   reference_repo="stable-diffusion-v1-5/stable-diffusion-v1-5"),
        FamilySpec(FamilyId.SD1_INPAINT, "Stable Diffusion 1.5 inpainting", (_CLIP_L,), _SD_INPAINT,
                   (512, 512), _B512, _SD_STEPS, pipeline_fixes_scheduler=True, pipeline_class=_INPAINT_PIPELINE,
                   reference_repo="stable-diffusion-v1-5/stable-diffusion-inpainting"),
        FamilySpec(FamilyId.SD2, "Stable Diffusion 2.x base", (_OPENCLIP_H,), _SD_EPS, (512, 512),
                   _B512, _SD_STEPS, fp32_attention=True, pipeline_fixes_scheduler=True,
                   reference_widths=_SD2_WIDTHS, reference_repo="stabilityai/stable-diffusion-2-1-base"),
        FamilySpec(FamilyId.SD2_V, "Stable Diffusion 2.x (v-prediction, 768)", (_OPENCLIP_H,), _SD_V,
                   (768, 768), _B768, _SD_STEPS, fp32_attention=True, pipeline_fixes_scheduler=True,
                   reference_widths=_SD2_WIDTHS, reference_repo="stabilityai/stable-diffusion-2-1"),
        FamilySpec(FamilyId.SD2_INPAINT, "Stable Diffusion 2.x inpainting", (_OPENCLIP_H,), _SD_INPAINT,
                   (512, 512), _B512, _SD_STEPS, fp32_attention=True, reference_widths=_SD2_WIDTHS,
                   pipeline_fixes_scheduler=True, pipeline_class=_INPAINT_PIPELINE,
                   reference_repo="stabilityai/stable-diffusion-2-inpainting"),
        FamilySpec(FamilyId.SDXL, "SDXL base", (_XL_L, _XL_G), _XL_BASE, (1024, 1024), SDXL_BUCKETS,
                   _XL_STEPS, _XL_VAE, zero_negative_for_empty_prompt=True, fp16_vae_overflows=True,
                   reference_widths=_XL_WIDTHS, pipeline_class=_XL_PIPELINE,
                   reference_repo="stabilityai/stable-diffusion-xl-base-1.0"),
        FamilySpec(FamilyId.SDXL_REFINER, "SDXL refiner", (_XL_G,), _XL_REFINER, (1024, 1024), SDXL_BUCKETS,
                   _XL_STEPS, _XL_VAE, fp16_vae_overflows=True, pipeline_class="StableDiffusionXLImg2ImgPipeline",
                   reference_widths=_XL_WIDTHS,
                   pipeline_options=(("requires_aesthetics_score", True), ("force_zeros_for_empty_prompt", False)),
                   refines=(FamilyId.SDXL.value, FamilyId.SDXL_TURBO.value),
                   reference_repo="stabilityai/stable-diffusion-xl-refiner-1.0"),
        FamilySpec(FamilyId.SDXL_TURBO, "SDXL-Turbo", (_XL_L, _XL_G), _XL_BASE, (512, 512), _B512,
                   _TURBO, _XL_VAE, min_turbo_steps_x_strength=1.0, fp16_vae_overflows=True,
                   reference_widths=_XL_WIDTHS, pipeline_class=_XL_PIPELINE, reference_repo="stabilityai/sdxl-turbo"),
        FamilySpec(FamilyId.SD_TURBO, "SD-Turbo", (_OPENCLIP_H,), _SD_EPS, (512, 512), _B512, _TURBO,
                   min_turbo_steps_x_strength=1.0, fp32_attention=True, pipeline_fixes_scheduler=True,
                   reference_widths=_SD2_WIDTHS, reference_repo="stabilityai/sd-turbo"),
        # issue 12 (H2): LDM-KL-8-G text-to-image (CompVis/ldm-text2im-large-256): LDM-BERT's last hidden state as
        # the context, a KL f=8 autoencoder (diffusers calls it `vqvae`), DDIM with classifier-free guidance
        FamilySpec(FamilyId.LDM_TEXT2IMG, "Latent diffusion text-to-image (LDM-KL-8-G)", (_LDM_BERT,),
                   DenoiserSpec(Prediction.EPS, (CONTEXT,)), (256, 256), scaled_buckets(256),
                   SamplingDefaults(SamplerId.DDIM, 50, 6.0, Spacing.LEADING),
                   pipeline_class="LDMTextToImagePipeline", reference_repo="CompVis/ldm-text2im-large-256"),
        # issue 12 (H3)
        FamilySpec(FamilyId.SD2_DEPTH, "Stable Diffusion 2 depth-to-image", (_OPENCLIP_H,), _SD_DEPTH, (512, 512),
                   _B512, _SD_STEPS, fp32_attention=True, reference_widths=_SD2_WIDTHS,
                   pipeline_class="StableDiffusionDepth2ImgPipeline", reference_repo="stabilityai/stable-diffusion-2-depth"),
        FamilySpec(FamilyId.SD_X4_UPSCALER, "Stable Diffusion x4 upscaler", (_OPENCLIP_H,), _SD_UPSCALER, (512, 512),
                   _B512, _UPSCALER_STEPS, _UPSCALER_VAE, _UPSCALER_SCHEDULE, fp32_attention=True,
                   reference_widths=ReferenceWidths(attention_factor=2, attention_heads=8, unet_channels=256),
                   pipeline_class="StableDiffusionUpscalePipeline", pipeline_options=(("max_noise_level", 350),),
                   reference_repo="stabilityai/stable-diffusion-x4-upscaler"),
        # no hub repository: the weights ship inside the package (latentrt.reference.demo_model)
        FamilySpec(FamilyId.DEMO, "LatentRT demo (procedural scenes)", (_CLIP_L,), _SD_EPS, _DEMO_SIZE,
                   (_DEMO_SIZE,), _DEMO_STEPS, pipeline_fixes_scheduler=True, reference_widths=_DEMO_WIDTHS),
        FamilySpec(FamilyId.DEMO_TURBO, "LatentRT demo Turbo (distilled, 1-4 steps)", (_CLIP_L,), _SD_EPS,
                   _DEMO_SIZE, (_DEMO_SIZE,), _DEMO_TURBO, min_turbo_steps_x_strength=1.0,
                   pipeline_fixes_scheduler=True, reference_widths=_DEMO_WIDTHS),
    )
}


# ---------------------------------------------------------------------------- issue 12, H1: original LDM
UNET_2D = "UNet2DModel"  # diffusers' UNet without cross-attention (DenoiserSpec.model)
LOW_RES_IMAGE = ConcatInput(names.LOW_RES_IMAGE, 3, "low_res_image", request_image=True)  # [-1, 1] pixels
_LDM_VQ_F4 = AutoencoderSpec(AutoencoderKind.VQ, factor=4, latent_channels=3, scaling_factor=1.0)
_LDM_SCHEDULE = NoiseSchedule(beta_start=0.0015, beta_end=0.0195)  # CompVis LDM: linear_start / linear_end
_LDM_DDIM = SamplingDefaults(SamplerId.DDIM, 50, 1.0, Spacing.LEADING)
_LDM_WIDTHS = ReferenceWidths(attention_factor=2, attention_heads=8, unet_channels=224, vae_channels=128)
for _spec in (
    # unconditional (ldm-celebahq-256): VQ-f4, UNet2DModel, DDIM; diffusers LDMPipeline
    FamilySpec(FamilyId.LDM, "Latent diffusion, unconditional (CompVis LDM)", (), DenoiserSpec(
        Prediction.EPS, (), model=UNET_2D), (256, 256), scaled_buckets(256), _LDM_DDIM, _LDM_VQ_F4, _LDM_SCHEDULE,
        pipeline_class="LDMPipeline", reference_widths=_LDM_WIDTHS, reference_repo="CompVis/ldm-celebahq-256"),
    # class-conditional (ImageNet cin256 style): a class embedding, guidance over a null class; no diffusers pipeline
    FamilySpec(FamilyId.LDM_CLASS_COND, "Latent diffusion, class-conditional (ImageNet)", (), DenoiserSpec(
        Prediction.EPS, (CLASS_LABEL,), model=UNET_2D), (256, 256), scaled_buckets(256),
        SamplingDefaults(SamplerId.DDIM, 50, 3.0, Spacing.LEADING), _LDM_VQ_F4, _LDM_SCHEDULE,
        pipeline_class="DiffusionPipeline", reference_widths=_LDM_WIDTHS),
    # super-resolution (ldm-super-resolution-4x-openimages): the low-res image concatenated to the latents
    FamilySpec(FamilyId.LDM_SUPER_RES, "Latent diffusion 4x super-resolution", (), DenoiserSpec(
        Prediction.EPS, (), (LOW_RES_IMAGE,), model=UNET_2D), (512, 512), scaled_buckets(512),
        SamplingDefaults(SamplerId.DDIM, 100, 1.0, Spacing.LEADING), _LDM_VQ_F4,
        NoiseSchedule(beta_start=0.0015, beta_end=0.0155), unscaled_latents=True,
        pipeline_class="LDMSuperResolutionPipeline", reference_widths=_LDM_WIDTHS,
        reference_repo="CompVis/ldm-super-resolution-4x-openimages"),
):
    FAMILIES[_spec.id] = _spec
# ---------------------------------------------------------------------------- issue 12 (H4): Stable unCLIP
# The noise-augmented CLIP image embedding ++ the noise level's timestep embedding, the UNet's `class_labels` through
# its "projection" class embedding; its width (2 x the image embedding) is ModelDims.image_condition_dim.
IMAGE_EMBEDDING = ConditioningInput(names.NOISED_IMAGE_EMBEDS, names.CLASS_LABELS_KEYWORD, "image_embedding",
                                    width="image_condition_dim", unet_config=(("class_embed_type", "projection"),))
FAMILIES[FamilyId.SD2_UNCLIP] = FamilySpec(
    FamilyId.SD2_UNCLIP, "Stable unCLIP 2.1 (image variation, v-prediction, 768)", (_OPENCLIP_H,),
    DenoiserSpec(Prediction.V, (CONTEXT, IMAGE_EMBEDDING)), (768, 768), _B768,
    SamplingDefaults(SamplerId.EULER, 20, 10.0, Spacing.LEADING), fp32_attention=True, pipeline_fixes_scheduler=True,
    reference_widths=_SD2_WIDTHS, pipeline_class="StableUnCLIPImg2ImgPipeline", image_encoder=ImageEncoderSpec(),
    reference_repo="stabilityai/stable-diffusion-2-1-unclip")


def register_family(spec: FamilySpec) -> FamilySpec:
    """Add a family to the registry (detection, export, build and the runtime all read it from here)."""
    if spec.name in FAMILIES and FAMILIES[spec.name] != spec:
        raise ValueError(f"a different family named {spec.name!r} is already registered")
    FAMILIES[spec.id] = spec
    return spec


def get_family(family: str | FamilyId) -> FamilySpec:
    """Look up a family by id ('sdxl', FamilyId.SDXL, ...)."""
    if isinstance(family, str) and family in FAMILIES:
        return FAMILIES[family]
    known = ", ".join(FAMILIES)
    raise UnknownFamily(f"unknown family {family!r}; known families: {known}")
