"""`latentrt export MODEL -o OUT`: checkpoint -> ONNX with parity checks (see latentrt.export.onnx)."""

from __future__ import annotations

import argparse
import time

from latentrt.families import FAMILIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="diffusers folder (with model_index.json), hub id (org/name), tiny:<family> "
                                      "or a single original-layout .safetensors file (with --config)")
    parser.add_argument("-o", "--output", required=True, help="export folder to create")
    parser.add_argument("--family", help="family id, overriding detection ("
                                         + ", ".join(dict.fromkeys(s.name for s in FAMILIES.values())) + ")")
    parser.add_argument("--config", help="for a single .safetensors file: a local diffusers folder of the same "
                                         "family whose configs and tokenizers describe it (weights not needed), "
                                         "or a hub id; without it, the family's reference configs are fetched")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17; dynamo uses >= 18)")
    parser.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter (slower)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the ONNX Runtime vs PyTorch parity check")
    parser.add_argument("--components", help="comma-separated subset, e.g. unet,vae_decoder")
    parser.add_argument("--step-cache", action="store_const", const=1, default=None,
                        help="also export what `latentrt generate --step-cache N` needs (DeepCache, arXiv:2312.00858): "
                             "the UNet returns the feature entering its last up block, plus a unet_shallow component")
    parser.add_argument("--tiny-vae", metavar="PATH_OR_HUB_ID",
                        help="also export a tiny VAE decoder (TAESD, a diffusers AutoencoderTiny folder or hub id, e.g. "
                             "madebyollin/taesd for SD 1.x / 2.x, madebyollin/taesdxl for SDXL) as the component "
                             "tiny_vae_decoder; `latentrt generate --tiny-vae` decodes with it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace another model's export (or another LatentRT artifact) in OUTPUT; without it, "
                             "an export of the same model is updated. A folder holding anything LatentRT did "
                             "not write is never replaced, with or without --overwrite")


def run(args: argparse.Namespace) -> int:
    import warnings

    from latentrt.export.onnx import export_model
    from latentrt.manifest import read_manifest
    from latentrt.reference.models import check_opset

    check_opset(max(args.opset, 18) if args.dynamo else args.opset, args.dynamo)
    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        out = export_model(args.model, args.output, family=args.family, opset=args.opset, dynamo=args.dynamo,
                           verify=args.verify, components=components, overwrite=args.overwrite, config=args.config,
                           step_cache=args.step_cache, tiny_vae=args.tiny_vae,
                           progress=lambda line: print(line, flush=True))
    manifest = read_manifest(out)
    total_mb = sum(c["size_mb"] for c in manifest["components"].values())
    print(f"done in {time.perf_counter() - start:.1f} s: {manifest['family']} -> {out} "
          f"({len(manifest['components'])} components, {total_mb:.1f} MB, opset {manifest['opset']}, "
          f"{manifest['exporter']})")
    return 0
