"""The arguments of `latentrt bench MODEL|DIR -o OUT`, checked before anything is built or measured, and its
tqdm progress bar. The verb itself runs in `latentrt.workflows.cli_bench` (it may export and build)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from latentrt.buckets import check_multiple
from latentrt.choices import Precision
from latentrt.errors import InvalidRequest

from .cases import BACKENDS, PRECISIONS, SWEEPS, BenchEvent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL|DIR",
                        help="checkpoint (diffusers folder, tiny:<family>) exported and built here, an ONNX export, "
                             "or an engine folder")
    parser.add_argument("-o", "--output", required=True, help="folder for bench.json, bench.md, plots and built engines")
    parser.add_argument("--build-dir", help="where the ONNX export and built engines go (default: the -o folder)")
    parser.add_argument("--backends", default="reference,onnxruntime",
                        help=f"comma-separated, among {', '.join(BACKENDS)} (reference = the diffusers pipeline)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the family's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the family's; <= 1: no CFG batch)")
    parser.add_argument("--size", action="append", metavar="HxW",
                        help="image size, e.g. 512x512 (repeat for a size sweep; default: the family's)")
    parser.add_argument("--batch", type=int, default=1, help="images per prompt")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded warm-up rounds per case")
    parser.add_argument("--runs", type=int, default=5, help="measured rounds per case (interleaved across backends)")
    parser.add_argument("--sweep", action="append", metavar="KEY=V1,V2",
                        help="steps=1,2,4 | size=256x256,512x512 | batch=1,2 (repeatable)")
    parser.add_argument("--engines", action="append", metavar="NAME=DIR",
                        help="also measure the engine folder DIR (built by `latentrt build` from the same checkpoint) "
                             "under the label NAME, e.g. ours=engines-tuned (repeatable)")
    parser.add_argument("--compare-to", action="append", metavar="LABEL",
                        help="also rate every backend against LABEL (speedup and image difference), e.g. "
                             "openvino-naive (repeatable)")
    parser.add_argument("--precision", choices=PRECISIONS, default=Precision.FP32.value,
                        help="int8: also measure ONNX Runtime engines with an int8 UNet (onnxruntime-int8)")
    parser.add_argument("--int8-recipe", help="int8 quantization recipe (`latentrt build --help` lists them)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--seed", type=int, default=0, help="seed every run repeats")
    parser.add_argument("--prompt", help="prompt every run repeats")
    parser.add_argument("--no-flops", dest="flops", action="store_false", help="skip the UNet FLOP count")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")



def parse_sweeps(items: list[str] | None) -> dict[str, list[str]]:
    """['steps=1,2,4', 'size=256x256,512x512'] -> {'steps': ['1', '2', '4'], 'size': [...]}, every value checked
    before the benchmark starts (sizes: positive multiples of 64; steps and batch: whole numbers >= 1)."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise InvalidRequest(f"cannot read --sweep {item!r}; write KEY=V1,V2 (steps=1,2,4)")
        if key not in SWEEPS:
            raise InvalidRequest(f"cannot sweep {key!r}; choose one of {', '.join(SWEEPS)}")
        parts = [v.strip() for v in values.split(",")]
        if not all(parts):
            raise InvalidRequest(f"--sweep {item!r} has an empty value; write KEY=V1,V2 (steps=1,2,4)")
        for value in parts:
            if key == "size":
                check_size(value, "--sweep size")
            elif not value.isdigit() or int(value) < 1:
                raise InvalidRequest(f"--sweep {key} values must be whole numbers >= 1, got {value!r}")
        out[key] = parts
    return out


def parse_engines(items: list[str] | None) -> dict[str, str]:
    """['ours=/path/engines'] -> {'ours': '/path/engines'} (each name once; the folders are read later)."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, folder = item.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not name or not folder:
            raise InvalidRequest(f"cannot read --engines {item!r}; write NAME=DIR (ours=engines-tuned)")
        if name in out:
            raise InvalidRequest(f"--engines names {name!r} twice")
        out[name] = folder
    return out


def check_size(text: str, what: str = "--size") -> tuple[int, int]:
    """A HEIGHTxWIDTH size whose sides are positive multiples of 64 (with the nearest valid sizes if not)."""
    h, sep, w = text.lower().replace("*", "x").partition("x")
    if not sep or not h.strip().isdigit() or not w.strip().isdigit():
        raise InvalidRequest(f"cannot read {what} {text!r}; write HEIGHTxWIDTH, e.g. 512x512")
    size = (int(h), int(w))
    check_multiple(size)
    return size


class Bar:
    """tqdm over generations; phase messages are written above the bar."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, event: BenchEvent) -> None:
        if not self.enabled:
            if event.message:
                print(event.message, file=sys.stderr)
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=event.total, desc="bench", unit="run", file=sys.stderr)
        if event.total and self.bar.total != event.total:
            self.bar.total = event.total
        if event.message:
            self.bar.write(event.message, file=sys.stderr)
        self.bar.update(event.done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
