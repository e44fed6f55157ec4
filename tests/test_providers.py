"""The UNet feed built from the family structure: each provider, and the walk over a family's declared inputs.

References we did not write: diffusers' `StableDiffusionInpaintPipeline.prepare_mask_latents` (mask and
masked-image latents, CFG-doubled) and `LatentConsistencyModelPipeline.get_guidance_scale_embedding`,
both compared exactly (tolerance 0: the same float32 operations). The walk is checked against the
UNet's IO spec (every input it declares, with its shape at the request's sizes) for sd1, sdxl, the
refiner, inpainting, an LCM-distilled sd1 UNet and a class-conditional family defined here alone.
No model runs: these are unit tests of the feed.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from latentrt.choices import Mode
from latentrt.errors import InvalidRequest, StaleArtifact, UnknownFamily
from latentrt.families import (
    CLASS_LABEL,
    MASK,
    MASKED_IMAGE_LATENTS,
    AutoencoderSpec,
    ConditioningInput,
    DenoiserSpec,
    FamilySpec,
    NoiseSchedule,
    Prediction,
    SamplerId,
    SamplingDefaults,
    Spacing,
    TimeIds,
    get_family,
)
from latentrt.runtime.conditioning import SizeConditioning, TextConditioning, guidance_embedding, time_ids
from latentrt.runtime.providers import (
    PROVIDERS,
    FeedContext,
    check_conditioning,
    concat_channels,
    conditioning_feed,
    present_conditioning,
    register_provider,
    runs_cfg,
)
from latentrt.runtime.request import GenerationRequest, ResolvedRequest, resolve_prompts
from latentrt.tensors import (
    OUT_SAMPLE,
    SAMPLE,
    TIMESTEP,
    UNET_BATCH,
    ComponentIO,
    ModelDims,
    TensorSpec,
    component_ios,
    shape_of,
)

H = W = 64  # pixels
LATENT = (4, H // 8, W // 8)


def request(prompts: int = 2, per: int = 1, guidance: float = 7.5, mode: Mode = Mode.TXT2IMG,
            conditioning: dict[str, Any] | None = None) -> ResolvedRequest:
    return ResolvedRequest([f"prompt {i}" for i in range(prompts)], None, 4, guidance, None, H, W, 0, per, mode,
                           None, None, None, SizeConditioning(), conditioning=conditioning or {})


def text(rows: int, pooled: bool, context_dim: int = 8, pooled_dim: int = 6) -> TextConditioning:
    g = torch.Generator().manual_seed(0)
    p = (lambda: torch.randn(rows, pooled_dim, generator=g)) if pooled else (lambda: None)
    return TextConditioning(torch.randn(rows, 77, context_dim, generator=g), p(),
                            torch.randn(rows, 77, context_dim, generator=g), p())


def dims(spec: FamilySpec, time_cond_proj_dim: int = 0) -> ModelDims:
    pooled = 6 if spec.has_pooled else 0
    return ModelDims(text_hidden=tuple(8 for _ in spec.text_encoders), pooled_dim=pooled, context_dim=8,
                     unet_in_channels=spec.unet_in_channels, latent_channels=4, vae_scale_factor=8,
                     time_ids=spec.time_ids.width, time_cond_proj_dim=time_cond_proj_dim)


def context(s: ResolvedRequest, cfg: bool, spec: FamilySpec, **kw: Any) -> FeedContext:
    t = text(s.batch, spec.has_pooled) if spec.text_encoders else None
    return FeedContext(s, cfg, {}, t, (s.batch, *LATENT), torch.device("cpu"), **kw)


# ---------------------------------------------------------------------------- each provider


@pytest.mark.parametrize("cfg", [False, True])
def test_text_providers_stack_negatives_first(cfg: bool) -> None:
    s = request()
    ctx = context(s, cfg, get_family("sdxl"))
    assert ctx.text is not None and ctx.text.negative_context is not None and ctx.text.negative_pooled is not None
    context_rows = PROVIDERS["text_context"].build(get_family("sdxl").denoiser.conditioning[0], ctx)
    pooled_rows = PROVIDERS["text_pooled"].build(get_family("sdxl").denoiser.conditioning[1], ctx)
    if cfg:
        assert torch.equal(context_rows, torch.cat([ctx.text.negative_context, ctx.text.context]))
        assert torch.equal(pooled_rows, torch.cat([ctx.text.negative_pooled, ctx.text.pooled]))  # type: ignore
    else:
        assert torch.equal(context_rows, ctx.text.context) and pooled_rows is ctx.text.pooled
    no_pooled = context(s, cfg, get_family("sd1"))
    with pytest.raises(StaleArtifact, match="pooled"):
        PROVIDERS["text_pooled"].build(get_family("sdxl").denoiser.conditioning[1], no_pooled)


@pytest.mark.parametrize("family, kind", [("sdxl", TimeIds.SIZE_CROP_TARGET), ("sdxl-refiner",
                                                                               TimeIds.SIZE_CROP_AESTHETIC)])
@pytest.mark.parametrize("mode", [Mode.TXT2IMG, Mode.IMG2IMG])
def test_time_ids_providers_follow_the_mode(family: str, kind: TimeIds, mode: Mode) -> None:
    spec = get_family(family)
    sizes = SizeConditioning(original_size=(128, 96), negative_original_size=(32, 32), negative_target_size=(64, 32),
                             aesthetic_score=7.0)
    s = request(prompts=2, per=2, mode=mode)
    s.sizes = sizes
    inp = spec.denoiser.conditioning_input("time_ids")
    assert inp is not None
    pos, neg = time_ids(kind, (H, W), sizes, img2img=mode is not Mode.TXT2IMG)  # checked against diffusers elsewhere
    out = PROVIDERS[inp.provider].build(inp, context(s, True, spec))
    assert torch.equal(out, torch.cat([neg.expand(4, -1), pos.expand(4, -1)]))
    assert torch.equal(PROVIDERS[inp.provider].build(inp, context(s, False, spec)), pos.expand(4, -1))


def test_guidance_embedding_provider_matches_diffusers_lcm() -> None:
    from diffusers import LatentConsistencyModelPipeline

    spec = get_family("sd1")
    io = component_ios(spec, dims(spec, time_cond_proj_dim=32))["unet"]
    inp = spec.denoiser.conditioning_input("timestep_cond")
    assert inp is not None and PROVIDERS[inp.provider].embeds_guidance
    s = request(prompts=2, per=3, guidance=8.0)
    out = PROVIDERS[inp.provider].build(inp, context(s, False, spec, tensor=io.input(inp.name)))
    w = torch.tensor(s.guidance - 1).repeat(s.batch)
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=32)  # type: ignore
    assert out.shape == (6, 32) and torch.equal(out, expected)
    assert torch.equal(out, guidance_embedding(8.0, 32, 6))


@pytest.mark.parametrize("cfg", [False, True])
def test_inpaint_pieces_match_diffusers_prepare_mask_latents(cfg: bool) -> None:
    from diffusers import StableDiffusionInpaintPipeline

    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(1, 1, H, W, generator=g) > 0.5).float()
    masked = torch.randn(1, 4, H // 8, W // 8, generator=g)
    s = request(prompts=2, per=2, mode=Mode.INPAINT)
    ctx = context(s, cfg, get_family("sd1-inpaint"), images={MASK.name: mask, MASKED_IMAGE_LATENTS.name: masked})
    pipe: Any = SimpleNamespace(vae_scale_factor=8)  # the method reads only this attribute of the pipeline
    ref_mask, ref_latents = StableDiffusionInpaintPipeline.prepare_mask_latents(
        pipe, mask, masked, s.batch, H, W, torch.float32, "cpu", None, cfg)
    assert torch.equal(PROVIDERS[MASK.provider].build(MASK, ctx), ref_mask)
    assert torch.equal(PROVIDERS[MASKED_IMAGE_LATENTS.provider].build(MASKED_IMAGE_LATENTS, ctx), ref_latents)
    with pytest.raises(InvalidRequest, match="needs an init image and a mask"):
        PROVIDERS[MASK.provider].build(MASK, context(s, cfg, get_family("sd1-inpaint")))


# ---------------------------------------------------------------------------- class labels


def test_class_labels_one_per_prompt_repeated_per_image_null_class_first() -> None:
    build = PROVIDERS[CLASS_LABEL.provider].build
    s = request(prompts=2, per=2, guidance=1.0, conditioning={"class_labels": [3, 7]})
    out = build(CLASS_LABEL, FeedContext(s, False))
    assert out.dtype == torch.int64 and out.tolist() == [3, 3, 7, 7]
    s = request(prompts=2, per=1, guidance=4.0, conditioning={"class_labels": [3, 7], "negative_class_labels": 10})
    assert build(CLASS_LABEL, FeedContext(s, True)).tolist() == [10, 10, 3, 7]
    s = request(prompts=1, per=3, guidance=1.0, conditioning={"class_labels": 5})
    assert build(CLASS_LABEL, FeedContext(s, False)).tolist() == [5, 5, 5]


@pytest.mark.parametrize("conditioning, cfg, info, needle", [
    ({}, False, {}, r"class-conditional: give conditioning=\{'class_labels': N\}"),
    ({"class_labels": 3}, True, {}, r"needs a null class: give conditioning\['negative_class_labels'\]"),
    ({"class_labels": [1, 2, 3]}, False, {}, r"conditioning\['class_labels'\] holds 3 values for 2 prompts"),
    ({"class_labels": True}, False, {}, r"conditioning\['class_labels'\] must hold class indices"),
    ({"class_labels": -1}, False, {}, r"conditioning\['class_labels'\] must hold class indices"),
    ({"class_labels": 2.5}, False, {}, r"conditioning\['class_labels'\] must hold class indices"),
    ({"class_labels": 1, "negative_class_labels": "x"}, True, {}, r"conditioning\['negative_class_labels'\]"),
    ({"class_labels": 10}, False, {"num_class_embeds": 10}, r"beyond the model's 10 classes \(0..9\)"),
])
def test_class_label_values_are_checked_naming_the_key(conditioning: dict[str, Any], cfg: bool,
                                                       info: dict[str, Any], needle: str) -> None:
    s = request(prompts=2, guidance=5.0 if cfg else 1.0, conditioning=conditioning)
    check = PROVIDERS[CLASS_LABEL.provider].check
    assert check is not None
    with pytest.raises(InvalidRequest, match=needle):
        check(CLASS_LABEL, FeedContext(s, cfg, info))


# ---------------------------------------------------------------------------- the walk over a family's inputs


def _unet_sizes(ctx: FeedContext) -> dict[str, int]:
    return {"unet_batch": ctx.batch * (2 if ctx.cfg else 1), "latent_height": H // 8, "latent_width": W // 8,
            "sequence": 77}


@pytest.mark.parametrize("family, lcm", [("sd1", False), ("sdxl", False), ("sdxl-refiner", False),
                                         ("sd1-inpaint", False), ("sd1", True)])
@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_feed_walk_gives_every_unet_input_at_its_shape(family: str, lcm: bool, guidance: float) -> None:
    spec = get_family(family)
    io = component_ios(spec, dims(spec, time_cond_proj_dim=16 if lcm else 0))["unet"]
    cfg = runs_cfg(spec, io, guidance)
    assert cfg == (guidance > 1 and not lcm)  # LCM embeds the scale instead of a CFG batch
    s = request(prompts=2, per=2, guidance=guidance, mode=Mode.INPAINT if spec.is_inpaint else Mode.TXT2IMG)
    images = {MASK.name: torch.ones(1, 1, H, W), MASKED_IMAGE_LATENTS.name: torch.zeros(1, 4, H // 8, W // 8)}
    ctx = context(s, cfg, spec, images=images if spec.is_inpaint else {})
    feed = conditioning_feed(spec, io, ctx)
    sizes = _unet_sizes(ctx)
    assert set(feed) == set(io.input_names) - {SAMPLE, TIMESTEP}
    for name, tensor in feed.items():
        assert tuple(tensor.shape) == shape_of(io.input(name), sizes), name
    extra = concat_channels(spec, ctx)
    sample = shape_of(io.input(SAMPLE), sizes)
    if spec.denoiser.concat:
        assert extra is not None and tuple(extra.shape) == (sample[0], sample[1] - 4, *sample[2:])
    else:
        assert extra is None and sample[1] == 4
    check_conditioning(spec, io, s, {})  # nothing to check, nothing refused


CLASS_FAMILY = FamilySpec("tiny-class-test", "A class-conditional family defined in this test", (),
                          DenoiserSpec(Prediction.EPS, (CLASS_LABEL,)), (64, 64), ((64, 64),),
                          SamplingDefaults(SamplerId.EULER, 10, 1.0, Spacing.LEADING), AutoencoderSpec(),
                          NoiseSchedule())
CLASS_UNET = ComponentIO("unet", (TensorSpec(SAMPLE, "float32", (UNET_BATCH, 4, 8, 8)),
                                  TensorSpec(TIMESTEP, "float32", (UNET_BATCH,)),
                                  TensorSpec(CLASS_LABEL.name, "int64", (UNET_BATCH,))),
                         (TensorSpec(OUT_SAMPLE, "float32", (UNET_BATCH, 4, 8, 8)),))


def test_class_conditional_family_needs_no_prompt_and_takes_labels_from_the_request() -> None:
    notes: list[str] = []
    prompts = resolve_prompts(CLASS_FAMILY, GenerationRequest(conditioning={"class_labels": [1, 2, 3]}), notes)
    assert prompts == ["", "", ""] and not notes
    resolve_prompts(CLASS_FAMILY, GenerationRequest("a cat", conditioning={"class_labels": 1}), notes)
    assert notes == ["tiny-class-test has no text encoder: the prompt is not used"]
    s = request(prompts=3, per=2, guidance=3.0, conditioning={"class_labels": [1, 2, 3], "negative_class_labels": 9})
    s.prompts = prompts
    assert runs_cfg(CLASS_FAMILY, CLASS_UNET, s.guidance)
    check_conditioning(CLASS_FAMILY, CLASS_UNET, s, {"num_class_embeds": 10})
    feed = conditioning_feed(CLASS_FAMILY, CLASS_UNET, FeedContext(s, True))
    assert list(feed) == ["class_labels"] and feed["class_labels"].tolist() == [9] * 6 + [1, 1, 2, 2, 3, 3]
    assert concat_channels(CLASS_FAMILY, FeedContext(s, True)) is None
    with pytest.raises(InvalidRequest, match="takes no conditioning value 'class_label'; it takes class_labels, "
                                             "negative_class_labels"):
        check_conditioning(CLASS_FAMILY, CLASS_UNET, request(conditioning={"class_label": 1}), {})
    with pytest.raises(InvalidRequest, match="takes no conditioning value 'class_labels'; it takes none"):
        check_conditioning(get_family("sd1"), component_ios(get_family("sd1"), dims(get_family("sd1")))["unet"],
                           request(conditioning={"class_labels": 1}), {})
    with pytest.raises(InvalidRequest, match="sd1 is conditioned on text: give a prompt"):
        resolve_prompts(get_family("sd1"), GenerationRequest(), [])


def test_a_new_input_kind_is_one_registered_provider() -> None:
    level = ConditioningInput("noise_level", "class_labels", "test_noise_level", dtype="int64")
    spec = FamilySpec("tiny-upscale-test", "A family with a new input kind", (),
                      DenoiserSpec(Prediction.V, (level,)), (64, 64), ((64, 64),),
                      SamplingDefaults(SamplerId.EULER, 10, 1.0, Spacing.LEADING))
    io = ComponentIO("unet", (TensorSpec(SAMPLE, "float32", (UNET_BATCH, 4, 8, 8)),
                              TensorSpec(TIMESTEP, "float32", (UNET_BATCH,)),
                              TensorSpec("noise_level", "int64", (UNET_BATCH,))), ())
    with pytest.raises(UnknownFamily, match="provider 'test_noise_level'.*register_provider"):
        runs_cfg(spec, io, 1.0)

    def noise_level(inp: Any, ctx: FeedContext) -> torch.Tensor:
        return ctx.rows(torch.full((ctx.batch,), int(ctx.request.conditioning.get(inp.name, 20))))

    register_provider("test_noise_level", noise_level, request_keys=("{name}",))
    try:
        s = request(prompts=1, per=2, guidance=1.0, conditioning={"noise_level": 50})
        check_conditioning(spec, io, s, {})
        assert conditioning_feed(spec, io, FeedContext(s, False))["noise_level"].tolist() == [50, 50]
        with pytest.raises(ValueError, match="already registered"):
            register_provider("test_noise_level", lambda inp, ctx: torch.zeros(1))
    finally:
        PROVIDERS.pop("test_noise_level")


def test_a_unet_without_a_declared_input_is_stale() -> None:
    spec = get_family("sdxl")
    io = component_ios(spec, dims(spec))["unet"]
    without = ComponentIO("unet", tuple(t for t in io.inputs if t.name != "time_ids"), io.outputs)
    with pytest.raises(StaleArtifact, match="takes no time_ids input, which family sdxl needs"):
        present_conditioning(spec, without)
