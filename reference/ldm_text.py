"""LDM-BERT, the text tower of text-to-image latent diffusion (Rombach et al. 2022, LDM-KL-8-G): tiny parts.

The real checkpoint (CompVis/ldm-text2im-large-256) pairs diffusers' `LDMBertModel` (a BART-style
encoder: token + learned position embeddings, pre-norm layers, a final layer norm; 77 positions, 1280
wide) with bert-base-uncased's WordPiece tokenizer (`BertTokenizer`: [CLS] ... [SEP], padded with
[PAD] = 0). The tiny tower keeps that structure with a small generated vocabulary: the special
tokens, single characters and their `##` continuations (so any lowercase ASCII text tokenizes) and a
few whole words.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # bert-base-uncased: [PAD] is id 0
WORDS = ("a", "an", "the", "of", "on", "in", "with", "and", "painting", "photo", "squirrel", "eating", "burger",
         "cat", "dog", "red", "blue", "house", "tree", "river", "mountain", "sky", "castle", "astronaut", "horse")
MAX_LENGTH = 77  # LDMTextToImagePipeline pads every prompt to 77 tokens


def tiny_vocab() -> list[str]:
    """The tiny WordPiece vocabulary, in id order: specials, characters, `##` characters, whole words."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = [w for w in WORDS if w not in chars]
    return [*SPECIALS, *chars, *(f"##{c}" for c in chars), *words]


def save_bert_tokenizer(folder: Path) -> Any:
    """Save a 77-token BertTokenizer with the tiny vocabulary into `folder` (save_pretrained) and return it."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(tiny_vocab())}  # transformers 5 ignores `vocab_file=`
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=MAX_LENGTH)
    tok.save_pretrained(str(folder))
    return BertTokenizer.from_pretrained(str(folder))


def make_ldm_bert(hidden: int, layers: int, heads: int, vocab_size: int, pad_id: int, seed: int) -> torch.nn.Module:
    """A small diffusers `LDMBertModel` (random weights, seeded): `hidden` wide, 77 positions."""
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    config = LDMBertConfig(vocab_size=vocab_size, max_position_embeddings=MAX_LENGTH, encoder_layers=layers,
                           encoder_ffn_dim=2 * hidden, encoder_attention_heads=heads, head_dim=hidden // heads,
                           d_model=hidden, pad_token_id=pad_id)
    torch.manual_seed(seed)
    return LDMBertModel(config)
