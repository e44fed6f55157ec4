"""Test-only: the class-conditional family of docs/adding-a-family.md, defined outside the package.

`LABEL` is the worked example's conditioning kind, new to latentrt/: a class index per row under the
diffusers keyword `class_labels`, whose UNet config data the input itself declares: its bound reads
the UNet's `num_class_embeds` ("unet:num_class_embeds"), every checkpoint of it has exactly `CLASSES`
classes and a plain embedding table (`unet_config`: detection compares both, a tiny UNet gets both).
Its provider, `tiny_class_label`, is registered by tests/test_family_structure.py.
`class_cond(conditioning)` is the family around any such input: tests/test_conditioning_cli.py uses
it with the built-in `CLASS_LABEL` kind (and the built-in `class_label` provider).
"""

from __future__ import annotations

from latentrt.families import (
    AutoencoderKind,
    AutoencoderSpec,
    ConditioningInput,
    DenoiserSpec,
    FamilySpec,
    Prediction,
    SamplerId,
    SamplingDefaults,
    Spacing,
)

CLASSES = 10
# the spec entry: the new conditioning kind (its UNet config data included) ...
LABEL = ConditioningInput("class_labels", keyword="class_labels", provider="tiny_class_label", dtype="int64",
                          high="unet:num_class_embeds",
                          unet_config=(("num_class_embeds", CLASSES), ("class_embed_type", None)))


def class_cond(conditioning: ConditioningInput = LABEL) -> FamilySpec:
    """... and the family that declares it: no text encoder, a KL autoencoder, eps prediction, DDIM."""
    return FamilySpec(
        id="tiny-class-cond", title="Class-conditional latent diffusion (test family)", text_encoders=(),
        denoiser=DenoiserSpec(Prediction.EPS, (conditioning,)),
        native_size=(64, 64), buckets=((64, 64),), sampling=SamplingDefaults(SamplerId.DDIM, 10, 1.0, Spacing.LEADING),
        autoencoder=AutoencoderSpec(AutoencoderKind.KL, factor=8, latent_channels=4), pipeline_class="DiffusionPipeline",
    )


CLASS_COND = class_cond()
