"""Prompt conditioning vs diffusers' `encode_prompt` / `_get_add_time_ids` on the tiny checkpoints."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from latentrt.families import TimeIds
from latentrt.runtime.conditioning import SizeConditioning, encode_prompts, time_ids
from latentrt.runtime.engine_set import EngineSet, load_engines
from latentrt.runtime.timing import StageTimer

TOL = {"onnxruntime": 1e-4, "torch": 1e-6}
LONG_PROMPT = " ".join(["a very detailed painting of a red fox"] * 12)  # ~100 tokens


@functools.cache
def engines(folder: str, backend: str) -> EngineSet:
    return load_engines(folder, backend=backend)


@functools.cache
def reference(folder: str) -> Any:
    import diffusers

    return diffusers.DiffusionPipeline.from_pretrained(folder)


def encode(es: EngineSet, prompt: Any, negative: Any, cfg: bool = True, n: int = 1) -> Any:
    return encode_prompts(es.spec, es, es.tokenizers, prompt, negative, cfg=cfg, num_images_per_prompt=n,
                          zero_empty_negative=es.force_zeros_for_empty_prompt)


def close(a: torch.Tensor | None, b: torch.Tensor | None, tol: float) -> bool:
    assert a is not None and b is not None and a.shape == b.shape, (None if a is None else a.shape, b)
    return float((a - b).abs().max()) <= tol


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_sd_embeddings_match_diffusers(family: str, backend: str, onnx_export_dir: Callable[[str], Path],
                                       tiny_checkpoint: Callable[[str], Path]) -> None:
    es = engines(str(onnx_export_dir(family)), backend)
    ref = reference(str(tiny_checkpoint(family)))
    prompts, negatives = ["a red fox", "a castle on a hill"], ["blurry", ""]
    with torch.no_grad():
        pos, neg = ref.encode_prompt(prompts, "cpu", 2, True, negatives)
    ours = encode(es, prompts, negatives, n=2)
    assert close(ours.context, pos, TOL[backend]) and close(ours.negative_context, neg, TOL[backend])
    assert ours.pooled is None
    with torch.no_grad():
        _, neg_default = ref.encode_prompt("a red fox", "cpu", 1, True, None)
    assert close(encode(es, "a red fox", None).negative_context, neg_default, TOL[backend])


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_sdxl_embeddings_match_diffusers(backend: str, onnx_export_dir: Callable[[str], Path],
                                         tiny_checkpoint: Callable[[str], Path]) -> None:
    es = engines(str(onnx_export_dir("sdxl")), backend)
    ref = reference(str(tiny_checkpoint("sdxl")))
    tol = TOL[backend]
    with torch.no_grad():
        pos, neg, pooled, neg_pooled = ref.encode_prompt(["a red fox", "a bird"], num_images_per_prompt=2,
                                                         do_classifier_free_guidance=True,
                                                         negative_prompt=["ugly", "dark"])
    ours = encode(es, ["a red fox", "a bird"], ["ugly", "dark"], n=2)
    assert ours.context.shape == (4, 77, sum(es.dims.text_hidden)) if es.dims else True
    assert close(ours.context, pos, tol) and close(ours.negative_context, neg, tol)
    assert close(ours.pooled, pooled, tol) and close(ours.negative_pooled, neg_pooled, tol)


def test_sdxl_empty_negative_is_zeros(onnx_export_dir: Callable[[str], Path],
                                      tiny_checkpoint: Callable[[str], Path]) -> None:
    """force_zeros_for_empty_prompt: no negative prompt -> zero embeddings; an explicit "" is encoded."""
    es = engines(str(onnx_export_dir("sdxl")), "onnxruntime")
    assert es.force_zeros_for_empty_prompt
    none = encode(es, "a red fox", None)
    assert none.negative_context is not None and none.negative_pooled is not None
    assert not none.negative_context.any() and not none.negative_pooled.any()
    empty = encode(es, "a red fox", "")
    ref = reference(str(tiny_checkpoint("sdxl")))
    with torch.no_grad():
        _, neg, _, neg_pooled = ref.encode_prompt("a red fox", do_classifier_free_guidance=True, negative_prompt="")
    assert empty.negative_context is not None and empty.negative_context.abs().max() > 0.1
    assert close(empty.negative_context, neg, TOL["onnxruntime"])
    assert close(empty.negative_pooled, neg_pooled, TOL["onnxruntime"])


def test_refiner_uses_only_text_encoder_2(onnx_export_dir: Callable[[str], Path],
                                          tiny_checkpoint: Callable[[str], Path]) -> None:
    es = engines(str(onnx_export_dir("sdxl-refiner")), "onnxruntime")
    ref = reference(str(tiny_checkpoint("sdxl-refiner")))
    with torch.no_grad():
        pos, neg, pooled, neg_pooled = ref.encode_prompt("a red fox", do_classifier_free_guidance=True)
    ours = encode(es, "a red fox", None)
    assert not es.force_zeros_for_empty_prompt and list(es.engines) == ["text_encoder_2", "unet", "vae_encoder",
                                                                        "vae_decoder"]
    assert close(ours.context, pos, TOL["onnxruntime"]) and close(ours.negative_context, neg, TOL["onnxruntime"])
    assert close(ours.pooled, pooled, TOL["onnxruntime"]) and close(ours.negative_pooled, neg_pooled, 1e-4)


def test_each_text_is_encoded_once(onnx_export_dir: Callable[[str], Path]) -> None:
    """Repeated prompts and negatives share one text-encoder batch per encoder per call."""
    es = engines(str(onnx_export_dir("sdxl")), "onnxruntime")
    timer = StageTimer()
    cond = encode_prompts(es.spec, es, es.tokenizers, ["a fox", "a fox", "a bird"], "ugly", cfg=True,
                          num_images_per_prompt=3, timer=timer)
    record = timer.record()
    assert [s for s, _ in record.entries] == ["text_encoder", "text_encoder_2"]
    assert cond.context.shape[0] == 9 and torch.equal(cond.context[0], cond.context[3])
    assert not torch.equal(cond.context[0], cond.context[6])


def test_long_prompt_is_encoded_in_windows(onnx_export_dir: Callable[[str], Path],
                                          tiny_checkpoint: Callable[[str], Path]) -> None:
    """Over 77 tokens: 75-token windows, not truncation (Issue 9); the first window is diffusers' truncated encoding.

    (Was: truncated with a warning. tests/test_prompts.py checks every window against a hand computation.)
    """
    es = engines(str(onnx_export_dir("sd1")), "onnxruntime")
    tok = es.tokenizers["tokenizer"]
    n_tokens = len(tok(LONG_PROMPT)["input_ids"])
    assert 77 < n_tokens <= 152
    ids = tok([LONG_PROMPT], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids  # diffusers' single-window ids
    assert ids.shape == (1, 77) and int(ids[0, -1]) == tok.eos_token_id
    ref = reference(str(tiny_checkpoint("sd1")))
    with torch.no_grad():
        pos, _ = ref.encode_prompt(LONG_PROMPT, "cpu", 1, False)
    context = encode(es, LONG_PROMPT, None, cfg=False).context
    assert context.shape == (1, 154, pos.shape[-1])
    assert close(context[:, :77], pos, TOL["onnxruntime"])


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner"])
def test_time_ids_match_diffusers(family: str, tiny_checkpoint: Callable[[str], Path]) -> None:
    ref = reference(str(tiny_checkpoint(family)))
    dim = ref.text_encoder_2.config.projection_dim
    cond = SizeConditioning(original_size=(512, 768), crops_coords_top_left=(16, 32), target_size=(64, 128),
                            negative_original_size=(256, 256), negative_crops_coords_top_left=(0, 8),
                            negative_target_size=(64, 64), aesthetic_score=7.0, negative_aesthetic_score=2.0)
    if family == "sdxl":
        pos, neg = time_ids(TimeIds.SIZE_CROP_TARGET, (64, 128), cond)
        ref_pos = ref._get_add_time_ids((512, 768), (16, 32), (64, 128), torch.float32, dim)
        ref_neg = ref._get_add_time_ids((256, 256), (0, 8), (64, 64), torch.float32, dim)
    else:
        pos, neg = time_ids(TimeIds.SIZE_CROP_AESTHETIC, (64, 128), cond)
        ref_pos, ref_neg = ref._get_add_time_ids((512, 768), (16, 32), (64, 128), 7.0, 2.0, (256, 256), (0, 8),
                                                 (64, 64), torch.float32, dim)
    assert torch.equal(pos, ref_pos) and torch.equal(neg, ref_neg)


def test_default_time_ids() -> None:
    pos, neg = time_ids(TimeIds.SIZE_CROP_TARGET, (768, 1344), SizeConditioning())
    assert pos.tolist() == neg.tolist() == [[768, 1344, 0, 0, 768, 1344]]
    pos, neg = time_ids(TimeIds.SIZE_CROP_AESTHETIC, (1024, 1024), SizeConditioning(crops_coords_top_left=(8, 8)))
    assert pos.tolist() == [[1024, 1024, 8, 8, 6.0]] and neg.tolist() == [[1024, 1024, 0, 0, 2.5]]


def diffusers_time_ids(pipe: Any, mode: str, sizes: dict[str, Any]) -> torch.Tensor:
    """The `time_ids` a diffusers SDXL pipeline passes its UNet ([negative, positive]) for these size fields."""
    from PIL import Image

    seen: list[torch.Tensor] = []

    def grab(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())

    hook = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    kw: dict[str, Any] = dict(prompt="a cat", num_inference_steps=2, guidance_scale=5.0, output_type="latent",
                              generator=torch.Generator().manual_seed(0), **sizes)
    if mode == "txt2img":
        kw.update(height=64, width=64)
    else:
        kw.update(image=Image.new("RGB", (64, 64), (90, 40, 200)), strength=0.5)
    try:
        pipe(**kw)
    finally:
        hook.remove()
    return seen[0]


PARTIAL_SIZES = [
    {},
    {"negative_original_size": (256, 256)},
    {"negative_target_size": (32, 64)},
    {"negative_crops_coords_top_left": (0, 8)},
    {"negative_original_size": (256, 256), "negative_crops_coords_top_left": (0, 8)},
    {"negative_original_size": (256, 256), "negative_target_size": (32, 64)},
    {"negative_original_size": (256, 256), "negative_target_size": (32, 64), "negative_crops_coords_top_left": (4, 8)},
]


@pytest.mark.parametrize("sizes", PARTIAL_SIZES, ids=lambda d: "+".join(k.split("_")[1] for k in d) or "none")
@pytest.mark.parametrize(("family", "mode"), [("sdxl", "txt2img"), ("sdxl", "img2img"), ("sdxl-refiner", "img2img")])
def test_partial_negative_time_ids_match_diffusers(family: str, mode: str, sizes: dict[str, Any],
                                                   tiny_checkpoint: Callable[[str], Path]) -> None:
    """Only some negative size fields set: each diffusers pipeline's own defaulting rule (base txt2img, img2img)."""
    import diffusers

    pipe = reference(str(tiny_checkpoint(family)))
    if mode == "img2img" and family == "sdxl":
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components)
    common = dict(original_size=(512, 768), crops_coords_top_left=(16, 32), target_size=(64, 128))
    if family == "sdxl-refiner":
        common = dict(common, aesthetic_score=7.0, negative_aesthetic_score=2.0)
    expected = diffusers_time_ids(pipe, mode, {**common, **sizes})
    kind = TimeIds.SIZE_CROP_AESTHETIC if family == "sdxl-refiner" else TimeIds.SIZE_CROP_TARGET
    pos, neg = time_ids(kind, (64, 64), SizeConditioning(**common, **sizes), img2img=mode != "txt2img")
    assert torch.equal(torch.cat([neg, pos]), expected)
