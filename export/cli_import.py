"""`latentrt import-onnx DIR -o OUT`: an Optimum ONNX folder -> a LatentRT ONNX export (see latentrt.export.optimum)."""

from __future__ import annotations

import argparse
import time

from latentrt.families import FAMILIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="an ONNX folder exported by Hugging Face Optimum (model_index.json, "
                                       "unet/model.onnx, vae_decoder/model.onnx, ...)")
    parser.add_argument("-o", "--output", required=True, help="LatentRT export folder to create")
    parser.add_argument("--checkpoint", help="the PyTorch checkpoint it was exported from (diffusers folder, hub id, "
                                             "tiny:<family>): gives the configs and checks parity of every graph")
    parser.add_argument("--family", help="family id, overriding detection ("
                                         + ", ".join(dict.fromkeys(s.name for s in FAMILIES.values())) + ")")
    parser.add_argument("--components", help="comma-separated subset, e.g. text_encoder,unet,vae_decoder")
    parser.add_argument("--overwrite", action="store_true", help="replace another model's export in OUTPUT")


def run(args: argparse.Namespace) -> int:
    from latentrt.export.optimum import import_optimum
    from latentrt.manifest import read_manifest

    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    start = time.perf_counter()
    out = import_optimum(args.folder, args.output, checkpoint=args.checkpoint, family=args.family,
                         components=components, overwrite=args.overwrite, progress=lambda line: print(line, flush=True))
    manifest = read_manifest(out)
    print(f"done in {time.perf_counter() - start:.1f} s: {manifest['family']} -> {out} "
          f"({len(manifest['components'])} components, opset {manifest['opset']}, from Optimum)")
    return 0
