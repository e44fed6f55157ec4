"""The real CLIP BPE tokenizer files, made from the vocabulary LatentRT ships.

`latentrt/data/bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's BPE merge list (MIT, as shipped by
open_clip). The conversion to Hugging Face's `vocab.json` + `merges.txt` follows CLIP's own
`SimpleTokenizer`: 256 byte symbols, the same with `</w>`, one token per merge, then the two
special tokens, so `<|endoftext|>` is the highest id (49407) as CLIP's pooling expects.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP keeps merges 1..48894 of the file (line 0 is a header)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character map (keeps printable bytes as themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@lru_cache(maxsize=1)
def clip_merges() -> tuple[tuple[str, str], ...]:
    """The 48894 BPE merges CLIP uses, in rank order."""
    raw = resources.files("latentrt").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : N_MERGES + 1]
    return tuple((a, b) for a, b in (line.split() for line in lines))


def clip_vocab() -> dict[str, int]:
    """Token -> id, 49408 entries, in CLIP's order."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in clip_merges()] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_clip_bpe(folder: Path) -> Path:
    """Write `vocab.json` and `merges.txt` (Hugging Face CLIP layout) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(), ensure_ascii=False))
    merges = "\n".join(f"{a} {b}" for a, b in clip_merges())
    (folder / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
    return folder


def save_clip_tokenizer(folder: Path, pad_token: str = EOS) -> Path:
    """Save a complete CLIPTokenizer folder (77 tokens, given pad token) and return it."""
    from transformers import CLIPTokenizer

    write_clip_bpe(folder)
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_LENGTH, pad_token=pad_token)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink()
    tok.save_pretrained(str(folder))
    return folder
