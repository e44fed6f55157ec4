"""Tensor and dimension names, defined once: ONNX inputs/outputs, engine feed keys and symbolic axes.

Tensor names follow diffusers' `forward` arguments (`sample`, `timestep`, `encoder_hidden_states`,
`text_embeds`, `time_ids`, `class_labels`); the family specs, the IO descriptions, the exporters,
the backends and the runtime all use these constants.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------- tensors
INPUT_IDS = "input_ids"  # text encoders: token ids in
HIDDEN_STATES = "hidden_states"  # text encoders: the chosen hidden state out
TEXT_EMBEDS = "text_embeds"  # pooled text projection (text encoder out, SDXL UNet in)
SAMPLE = "sample"  # UNet: (scaled) noisy latents in
TIMESTEP = "timestep"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"  # UNet: cross-attention context
TIME_IDS = "time_ids"  # SDXL micro-conditioning
TIMESTEP_COND = "timestep_cond"  # guidance-scale embedding of LCM-distilled UNets (config `time_cond_proj_dim`)
CLASS_LABELS = "class_labels"  # UNet: one integer class per row (config `num_class_embeds`)
MASK = "mask"  # inpainting UNets: 1 = repaint, at latent resolution (concatenated to the latents)
MASKED_IMAGE_LATENTS = "masked_image_latents"  # inpainting UNets: latents of the kept image (concatenated)
LOW_RES_IMAGE = "low_res_image"  # issue 12, H1: LDM super-resolution, x4 upscaler: the (noised) low-res image in [-1, 1] (concatenated)
DEPTH_MAP = "depth_map"  # depth-to-image UNets: the depth map at latent resolution (concatenated), issue 12
OUT_SAMPLE = "out_sample"  # UNet: noise / v prediction out
IMAGES = "images"  # VAE encoder in, VAE decoder out: pixels in [-1, 1]
LATENT_PARAMETERS = "latent_parameters"  # KL VAE encoder out: posterior mean and log-variance
LATENT = "latent"  # VAE decoder in; VQ VAE encoder out (before quantization)

# ---------------------------------------------------------------------------- diffusers UNet keywords
# `UNet2DConditionModel.forward` keyword arguments (what a ConditioningInput's `keyword` names), kept apart from the
# tensor names above even where they are spelled alike: a family may feed a keyword from a tensor of any name
ENCODER_HIDDEN_STATES_KEYWORD = "encoder_hidden_states"
TIMESTEP_COND_KEYWORD = "timestep_cond"
CLASS_LABELS_KEYWORD = "class_labels"

# ---------------------------------------------------------------------------- symbolic dims
DIM_BATCH = "batch"  # images per request (text encoders, VAE)
DIM_UNET_BATCH = "unet_batch"  # UNet rows: 2x batch with classifier-free guidance
DIM_TOKENS = "tokens"  # text encoder window length (77)
DIM_SEQUENCE = "sequence"  # UNet context length: 77 tokens per prompt window
DIM_LATENT_HEIGHT = "latent_height"
DIM_LATENT_WIDTH = "latent_width"
DIM_IMAGE_HEIGHT = "image_height"  # the VAE factor times latent_height
DIM_IMAGE_WIDTH = "image_width"

# ---------------------------------------------------------------------------- issue 12 (H4): Stable unCLIP
PIXEL_VALUES = "pixel_values"  # image encoder in: the CLIP image processor's normalized crop
IMAGE_EMBEDS = "image_embeds"  # image encoder out: the projected CLIP image embedding
NOISE = "noise"  # image noising in: standard normal noise drawn by the runtime (diffusers' draw)
NOISE_LEVEL = "noise_level"  # image noising in: the noise augmentation timestep (integer)
NOISED_IMAGE_EMBEDS = "noised_image_embeds"  # image noising out, UNet in: noised embeds ++ noise level embedding
