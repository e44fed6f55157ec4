"""Does static-shape compilation pay for OpenVINO engines on this CPU? UNet and VAE decoder, dynamic vs static.

Loads one OpenVINO engine folder twice: as built (dynamic IR) and with the given latent size compiled static
(what `latentrt build --backend openvino --static --sizes HxW` asks the runtime to do), then times single calls
of each component on the same random inputs, interleaved (dynamic, static, dynamic, ...), and writes the p50s:

    python benchmarks/openvino_static.py ENGINES --size 256x256 --runs 10 -o out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from latentrt.manifest import read_manifest
from latentrt.names import DIM_LATENT_HEIGHT, DIM_LATENT_WIDTH
from latentrt.runtime.backends.openvino import OpenVinoEngine
from latentrt.tensors import dummy_inputs, io_from_json, opt_sizes


def time_component(folder: Path, component: str, sizes: dict[str, int], runs: int) -> dict[str, Any]:
    """p50 ms of one component's call, dynamic vs static, interleaved."""
    entry = read_manifest(folder)["components"][component]
    io = io_from_json(entry["io"])
    info = entry["openvino"]
    latent = [{DIM_LATENT_HEIGHT: sizes[DIM_LATENT_HEIGHT], DIM_LATENT_WIDTH: sizes[DIM_LATENT_WIDTH]}]
    engines = {name: OpenVinoEngine(folder / entry["path"], io, inference_precision=info["inference_precision"],
                                    threads=info.get("threads") or None, static_latents=static)
               for name, static in (("dynamic", ()), ("static", latent))}
    full = dict(opt_sizes(io), **{k: v for k, v in sizes.items() if k in io.dims})
    feed = {k: torch.from_numpy(v) for k, v in dummy_inputs(io, full, seed=0).items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for e in engines.values():
        e.run(feed)  # compile + first run, not timed
    for _ in range(runs):
        for name, e in engines.items():
            start = time.perf_counter()
            e.run(feed)
            times[name].append(1000 * (time.perf_counter() - start))
    p50 = {name: statistics.median(t) for name, t in times.items()}
    return {"sizes": full, "p50_ms": p50, "static_speedup": p50["dynamic"] / p50["static"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("engines", type=Path)
    parser.add_argument("--size", default="256x256", help="HxW pixels")
    parser.add_argument("--unet-batch", type=int, default=2, help="UNet rows (2: one image with CFG)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    latent = {DIM_LATENT_HEIGHT: h // 8, DIM_LATENT_WIDTH: w // 8}
    out = {"engines": str(args.engines), "size": args.size, "runs": args.runs,
           "unet": time_component(args.engines, "unet", {**latent, "unet_batch": args.unet_batch}, args.runs),
           "vae_decoder": time_component(args.engines, "vae_decoder", {**latent, "batch": 1}, args.runs)}
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
