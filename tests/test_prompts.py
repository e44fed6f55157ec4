"""Long prompts (75-token windows) and the opt-in `(word:1.3)` weighting syntax.

References we did not write: the weighting parser is checked against the examples in the docstring
of AUTOMATIC1111's `parse_prompt_attention` (modules/prompt_parser.py) and more cases derived from its
rules; chunked encoding is checked against a hand computation with the tiny checkpoint's own
transformers tokenizer and CLIPTextModel (each 77-token window encoded on its own, concatenated
along the sequence; SDXL pooled output from the first window); the first window of a long prompt is
diffusers' own (truncated) encoding.

Tolerances (max |diff|): torch backend 1e-6 (the same modules; measured 0), ONNX Runtime 1e-4 (the
export is ~1e-6 from PyTorch per call; measured <= 3e-6). Parser weights: 1e-9 relative.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from latentrt.engines.profiles import plan_profiles
from latentrt.errors import InvalidRequest, UnsupportedShape
from latentrt.families import HiddenState, get_family
from latentrt.runtime.conditioning import encode_prompts, encode_texts
from latentrt.runtime.engine_set import EngineSet, load_engines
from latentrt.runtime.pipeline import GenerationRequest, Pipeline, load_pipeline
from latentrt.runtime.prompts import parse_weights, prompt_tokens
from latentrt.tensors import (
    ENCODER_HIDDEN_STATES,
    MAX_PROMPT_WINDOWS,
    ModelDims,
    component_ios,
    context_windows,
    profile,
)

TOL = {"onnxruntime": 1e-4, "torch": 1e-6}
LONG = ", ".join(["a very detailed oil painting of a red fox in the snow"] * 9)  # ~110 tokens: 2 windows


# ---------------------------------------------------------------------------- the weighting parser


A1111_DOCSTRING = [  # AUTOMATIC1111 modules/prompt_parser.py, parse_prompt_attention's docstring examples
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
]
MORE_CASES = [
    ("", [("", 1.0)]),
    ("[a cat]", [("a cat", 1 / 1.1)]),
    ("[[a cat]]", [("a cat", 1 / 1.21)]),
    ("a (cat:1.5) dog", [("a ", 1.0), ("cat", 1.5), (" dog", 1.0)]),
    ("(cat: 1.3 )", [("cat", 1.3)]),  # spaces around the number
    ("(cat:.5) (dog:2.)", [("cat", 0.5), (" ", 1.0), ("dog", 2.0)]),
    ("(a (cat:2) b)", [("a ", 1.1), ("cat", 2.2), (" b", 1.1)]),
    ("((cat))", [("cat", 1.21)]),
    ("(cat:abc)", [("cat:abc", 1.1)]),  # not a number: the colon is text, ")" closes with 1.1
    ("cat:1.5)", [("cat:1.5)", 1.0)]),  # no open "(": all literal
    ("a: b", [("a: b", 1.0)]),
    ("cat)] dog", [("cat)] dog", 1.0)]),  # unmatched closers are text
    ("[cat", [("cat", 1 / 1.1)]),
    ("\\\\ (x)", [("\\ ", 1.0), ("x", 1.1)]),  # an escaped backslash
    ("a\\b", [("a\\b", 1.0)]),  # a backslash before a plain character stays (A1111 drops it)
    ("(a:1.2) (b:1.2)", [("a", 1.2), (" ", 1.0), ("b", 1.2)]),
    ("(a][b)", [("a]", 1.1), ("b", 1.0)]),
    ("(cat:-1)", [("cat", -1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), A1111_DOCSTRING + MORE_CASES,
                         ids=[repr(t) for t, _ in A1111_DOCSTRING + MORE_CASES])
def test_parse_weights(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_weights(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-9)


def test_weighted_tokens_follow_their_runs(tiny_checkpoint: Callable[[str], Path]) -> None:
    tok = tokenizer(str(tiny_checkpoint("sd1")), "tokenizer")
    plain = prompt_tokens(tok, "a (red:1.5) fox [running]")
    weighted = prompt_tokens(tok, "a (red:1.5) fox [running]", weighting=True)
    assert plain.weights == (1.0,) * len(plain.ids) and "(" in tok.decode(list(plain.ids))
    ids = [tok(w, add_special_tokens=False)["input_ids"] for w in ("a", "red", "fox", "running")]
    assert list(weighted.ids) == [i for piece in ids for i in piece]
    assert weighted.weights == pytest.approx([1.0] * len(ids[0]) + [1.5] * len(ids[1]) + [1.0] * len(ids[2])
                                             + [1 / 1.1] * len(ids[3]))


# ---------------------------------------------------------------------------- chunked encoding by hand


@functools.cache
def tokenizer(folder: str, name: str) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(f"{folder}/{name}")


@functools.cache
def text_model(folder: str, name: str, pooled: bool) -> Any:
    import transformers

    cls = transformers.CLIPTextModelWithProjection if pooled else transformers.CLIPTextModel
    return cls.from_pretrained(f"{folder}/{name}").eval()


@functools.cache
def engines(folder: str, backend: str) -> EngineSet:
    return load_engines(folder, backend=backend)


@functools.cache
def pipeline(folder: str, backend: str) -> Pipeline:
    return load_pipeline(folder, backend=backend)


def hand_windows(tok: Any, text: str, count: int) -> torch.Tensor:
    """(count, 77) ids: the prompt's tokens in 75-token pieces, each BOS + piece + EOS + padding."""
    ids = tok(text, truncation=False)["input_ids"][1:-1]  # drop the BOS / EOS the tokenizer adds
    rows = []
    for w in range(count):
        piece = ids[75 * w:75 * (w + 1)]
        row = [tok.bos_token_id, *piece, tok.eos_token_id]
        rows.append(row + [tok.pad_token_id] * (77 - len(row)))
    return torch.tensor(rows)


def hand_encode(folder: str, family: str, text: str, count: int,
                weights: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(1, 77 * count, C) context and the first window's pooled projection, straight from transformers."""
    spec = get_family(family)
    hidden, pooled = [], None
    for te in spec.text_encoders:
        tok = tokenizer(folder, te.tokenizer)
        model = text_model(folder, te.component, te.pooled)
        with torch.no_grad():
            out = model(hand_windows(tok, text, count), output_hidden_states=True)
        h = out.hidden_states[-2] if te.hidden_state is HiddenState.PENULTIMATE else out.last_hidden_state
        if weights is not None:  # A1111: z * w per token, then z * (mean before / mean after), here per window
            w = torch.tensor(weights).reshape(count, 77, 1)
            scaled = h * w
            h = scaled * (h.mean(dim=(1, 2), keepdim=True) / scaled.mean(dim=(1, 2), keepdim=True))
        hidden.append(h.reshape(1, count * 77, -1))
        if te.pooled:
            pooled = out.text_embeds[:1]
    return torch.cat(hidden, dim=-1), pooled


def max_diff(a: Any, b: Any) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_long_prompt_windows_match_hand_computation(family: str, backend: str,
                                                    onnx_export_dir: Callable[[str], Path],
                                                    tiny_checkpoint: Callable[[str], Path]) -> None:
    es = engines(str(onnx_export_dir(family)), backend)
    folder = str(tiny_checkpoint(family))
    n = len(tokenizer(folder, "tokenizer")(LONG, truncation=False)["input_ids"]) - 2
    assert 75 < n <= 150
    context, pooled = encode_texts(es.spec, es, es.tokenizers, [LONG, "a cat"])
    ref, ref_pooled = hand_encode(folder, family, LONG, 2)
    short, _ = hand_encode(folder, family, "a cat", 1)
    assert context.shape == (2, 154, ref.shape[-1])
    assert max_diff(context[:1], ref) <= TOL[backend]
    assert max_diff(context[1:, :77], short) <= TOL[backend]  # a shorter text: its window, then an empty one
    empty, _ = hand_encode(folder, family, "", 1)
    assert max_diff(context[1:, 77:], empty) <= TOL[backend]
    if ref_pooled is not None:
        assert pooled is not None and max_diff(pooled[:1], ref_pooled) <= TOL[backend]


def test_first_window_is_diffusers_truncated_encoding(onnx_export_dir: Callable[[str], Path],
                                                      tiny_checkpoint: Callable[[str], Path]) -> None:
    """diffusers truncates to one window; our first window is exactly that window (BOS, 75 tokens, EOS)."""
    import diffusers

    es = engines(str(onnx_export_dir("sd1")), "torch")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(tiny_checkpoint("sd1")))
    with torch.no_grad():
        pos, neg = ref.encode_prompt(LONG, "cpu", 1, True, "blurry")
    cond = encode_prompts(es.spec, es, es.tokenizers, LONG, "blurry", cfg=True)
    assert cond.context.shape[1] == 154 and cond.negative_context is not None
    assert cond.negative_context.shape == cond.context.shape  # the negative is padded to the same windows
    assert max_diff(cond.context[:, :77], pos) <= TOL["torch"]
    assert max_diff(cond.negative_context[:, :77], neg) <= TOL["torch"]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_weighted_prompt_matches_hand_computation(backend: str, onnx_export_dir: Callable[[str], Path],
                                                  tiny_checkpoint: Callable[[str], Path]) -> None:
    es = engines(str(onnx_export_dir("sdxl")), backend)
    folder = str(tiny_checkpoint("sdxl"))
    text = "a (red:1.5) fox in [the snow]"
    plain = "a red fox in the snow"
    tok = tokenizer(folder, "tokenizer")
    counts = [len(tok(w, add_special_tokens=False)["input_ids"]) for w in ("a", "red", "fox in", "the snow")]
    weights = [1.0] * (1 + counts[0]) + [1.5] * counts[1] + [1.0] * counts[2] + [1 / 1.1] * counts[3]
    weights += [1.0] * (77 - len(weights))
    ref, ref_pooled = hand_encode(folder, "sdxl", plain, 1, weights)
    context, pooled = encode_texts(es.spec, es, es.tokenizers, [text], weighting=True)
    assert max_diff(context, ref) <= TOL[backend]
    assert pooled is not None and ref_pooled is not None and max_diff(pooled, ref_pooled) <= TOL[backend]
    unweighted, _ = hand_encode(folder, "sdxl", plain, 1)
    assert max_diff(context, unweighted) > 1e-3  # the weights do something


def test_unweighted_prompts_unchanged_bit_for_bit(onnx_export_dir: Callable[[str], Path]) -> None:
    """Weighting off (the default) reads brackets as text; on, a prompt without weights encodes identically."""
    es = engines(str(onnx_export_dir("sd1")), "onnxruntime")
    texts = ["a red fox", "a (red) fox"]
    off, _ = encode_texts(es.spec, es, es.tokenizers, texts)
    on, _ = encode_texts(es.spec, es, es.tokenizers, texts, weighting=True)
    assert torch.equal(off[0], on[0]) and not torch.equal(off[1], on[1])


# ---------------------------------------------------------------------------- limits and profiles


def test_too_many_windows_is_refused(onnx_export_dir: Callable[[str], Path]) -> None:
    es = engines(str(onnx_export_dir("sd1")), "onnxruntime")
    four = " ".join(["fox"] * (3 * 75 + 1))
    with pytest.raises(InvalidRequest, match=r"is 226 tokens \(4 windows of 75\); these engines take at most 225 prompt tokens \(3 windows"):
        encode_prompts(es.spec, es, es.tokenizers, "a cat", four, cfg=True, max_windows=3)
    assert context_windows(es["unet"].io) == (77, MAX_PROMPT_WINDOWS)  # ONNX Runtime: any multiple of 77
    pipe = pipeline(str(onnx_export_dir("sd1")), "onnxruntime")
    huge = " ".join(["fox"] * (MAX_PROMPT_WINDOWS * 75 + 1))
    with pytest.raises(InvalidRequest, match=f"at most {MAX_PROMPT_WINDOWS * 75} prompt tokens"):
        pipe.generate(GenerationRequest(huge, steps=1, width=64, height=64, seed=0))


def test_long_prompt_generates_on_onnxruntime(onnx_export_dir: Callable[[str], Path]) -> None:
    """A 2-window prompt with a 1-window negative runs the UNet on a 154-token context, and matches torch."""
    folder = str(onnx_export_dir("sd1"))
    request = GenerationRequest(LONG, negative_prompt="blurry", steps=2, guidance=7.5, width=64, height=64, seed=3,
                                sampler="euler")
    ort = pipeline(folder, "onnxruntime").generate(request)
    ref = pipeline(folder, "torch").generate(request)
    short = pipeline(folder, "onnxruntime").generate(
        GenerationRequest(LONG[:40], negative_prompt="blurry", steps=2, guidance=7.5, width=64, height=64, seed=3,
                          sampler="euler"))
    assert ort.array is not None and ref.array is not None and short.array is not None
    assert float(np.abs(ort.array - ref.array).max()) <= 1e-3
    assert float(np.abs(ort.array - short.array).max()) > 1e-3


def tiny_ios(family: str) -> dict[str, Any]:
    spec = get_family(family)
    hidden = tuple(12 if te.pooled else 8 for te in spec.text_encoders)
    dims = ModelDims(hidden, 6 if spec.has_pooled else 0, sum(hidden), spec.unet_in_channels, 4, 8,
                     time_ids=spec.time_ids.width)
    return component_ios(spec, dims)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_profiles_take_their_sequence_range_from_prompt_windows(family: str) -> None:
    spec, ios = get_family(family), tiny_ios(family)
    seq = ios["unet"].dims["sequence"]
    assert (seq.min, seq.opt, seq.max) == (77, 77, MAX_PROMPT_WINDOWS * 77)  # the export: any multiple of 77
    plan = plan_profiles(spec, ios, sizes=[spec.native_size], strategy="dynamic")
    assert plan.prompt_windows == 3
    assert plan.profiles[0].bounds["unet"]["sequence"] == (77, 77, 231)
    lo, opt, hi = plan.profiles[0].shapes["unet"][ENCODER_HIDDEN_STATES]
    assert (lo[1], opt[1], hi[1]) == (77, 77, 231)
    assert plan.io("unet").dims["sequence"].max == 231 and context_windows(plan.io("unet")) == (77, 3)
    five = plan_profiles(spec, ios, sizes=[spec.native_size], strategy="dynamic", prompt_windows=5)
    assert five.profiles[0].bounds["unet"]["sequence"] == (77, 77, 385)
    assert profile(five.io("unet"))[ENCODER_HIDDEN_STATES][2][1] == 385
    for c in ios:  # text encoders keep their one 77-token window
        if "tokens" in ios[c].dims:
            assert five.profiles[0].bounds[c]["tokens"] == (1, 77, 77)
    with pytest.raises(UnsupportedShape, match="prompt windows must be at least 1"):
        plan_profiles(spec, ios, prompt_windows=0)
    old = {c: io.with_ranges({"sequence": (77, 77, 231)}) for c, io in ios.items()}  # an export from before
    with pytest.raises(UnsupportedShape, match="lower --prompt-windows"):
        plan_profiles(spec, old, sizes=[spec.native_size], prompt_windows=4)
