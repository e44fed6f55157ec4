"""Check the TensorRT path end to end on a CUDA + TensorRT machine; writes a JSON result to benchmarks/results/.

For each family: export the built-in tiny checkpoint to ONNX, build fp16 TensorRT engines (two
profiles), run every engine and the PyTorch (diffusers / transformers) module on the same inputs
at each profile's size, and record max |diff| against max |reference| and the GPU latency of
both. With --full it also builds full-size architectures with random weights (SD 1.5 and
SDXL-Turbo configurations; weights cannot be downloaded, so only numerics and speed are
meaningful, not images) and checks them the same way at their native size.

    python benchmarks/gpu_check.py                       # tiny sd1, sd2, sdxl, sdxl-turbo
    python benchmarks/gpu_check.py --families sd1 --full --work /tmp/gpu-check

Without TensorRT or a CUDA GPU it exits with status 2 and says which is missing.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_FAMILIES = "sd1,sd2,sdxl,sdxl-turbo"
TINY_SIZES = [(256, 256), (256, 384)]  # two per-bucket profiles: routing is exercised too
RELATIVE_TOLERANCE = 3e-2  # fp16 engine vs fp32 PyTorch: max |diff| <= 3e-2 * max(1, max |reference|)
WINDOW = 77  # tokens of one prompt window (text encoder input, UNet context)

log = logging.getLogger("gpu_check")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--families", default=DEFAULT_FAMILIES, help=f"tiny families to check ({DEFAULT_FAMILIES})")
    parser.add_argument("--full", action="store_true", help="also build full-size random-weight SD 1.5 and SDXL-Turbo")
    parser.add_argument("--work", type=Path, default=Path("gpu-check-work"), help="scratch folder for checkpoints, "
                        "ONNX and engines")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per component")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from latentrt.tensorrt_support import tensorrt_available

    ok, why = tensorrt_available()
    if not ok:
        print(f"gpu_check: TensorRT/CUDA not available: {why}", file=sys.stderr)
        return 2
    log.info("%s", why)
    result = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "environment": environment(),
              "checks": []}
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        result["checks"].append(check_model(f"tiny:{family}", family, args.work / "tiny" / family, TINY_SIZES,
                                            (1, 2), args.repeats))
    if args.full:
        for family in FULL_MODELS:
            folder = make_full_checkpoint(family, args.work / "full" / family / "checkpoint")
            native = native_size(family)
            result["checks"].append(check_model(str(folder), family, args.work / "full" / family, [native], (1, 1),
                                                args.repeats))
    result["passed"] = all(c["passed"] for c in result["checks"])
    path = write_result(result, args.out)
    print(summary(result, path))
    return 0 if result["passed"] else 1


def environment() -> dict[str, Any]:
    from latentrt.manifest import tool_versions
    from latentrt.tensorrt_support import gpu_info

    return {"gpu": gpu_info(), "tools": tool_versions()}


def native_size(family: str) -> tuple[int, int]:
    from latentrt.families import get_family

    return get_family(family).native_size


def check_model(model: str, family: str, work: Path, sizes: list[tuple[int, int]], batch: tuple[int, int],
                repeats: int) -> dict[str, Any]:
    """Export, build TensorRT engines and compare every component with PyTorch at every size."""
    from latentrt.engines.build import build_engines
    from latentrt.export.onnx import export_model
    from latentrt.reference.models import load_checkpoint

    start = time.perf_counter()
    onnx_dir = export_model(model, work / "onnx", family=family)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    engine_dir = build_engines(onnx_dir, work / "engines", backend="tensorrt", sizes=sizes, batch=batch,
                               strategy="per-bucket", timing_cache=work / "timing.cache")
    build_s = time.perf_counter() - start
    loaded = load_checkpoint(model, family=family)
    rows = compare_components(engine_dir, loaded, sizes, batch[1], repeats)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    return {"model": model, "family": family, "export_s": round(export_s, 1), "build_s": round(build_s, 1),
            "engines": {c: {k: e.get(k) for k in ("precision", "fp32_islands", "size_mb", "device_memory_mb",
                                                    "fp32_layers", "build_s")}
                        for c, e in manifest["components"].items()},
            "components": rows, "passed": all(r["passed"] for r in rows)}


def compare_components(engine_dir: Path, loaded: Any, sizes: list[tuple[int, int]], batch: int,
                       repeats: int) -> list[dict[str, Any]]:
    import torch

    from latentrt.names import (
        DIM_BATCH,
        DIM_LATENT_HEIGHT,
        DIM_LATENT_WIDTH,
        DIM_SEQUENCE,
        DIM_TOKENS,
        DIM_UNET_BATCH,
    )
    from latentrt.reference.wrappers import wrap
    from latentrt.runtime.backends.tensorrt import load_engines
    from latentrt.tensors import dummy_inputs, prompt_like

    engines = load_engines(engine_dir)
    factor = loaded.dims.vae_scale_factor
    rows = []
    for component, engine in engines.items():
        module = wrap(component, loaded).cuda().eval()
        for h, w in sizes:
            dims = {DIM_BATCH: batch, DIM_UNET_BATCH: batch * 2 if loaded.spec.uses_cfg else batch,
                    DIM_LATENT_HEIGHT: h // factor, DIM_LATENT_WIDTH: w // factor, DIM_TOKENS: WINDOW,
                    DIM_SEQUENCE: WINDOW}
            feed_np = prompt_like(dummy_inputs(engine.io, {k: v for k, v in dims.items() if k in engine.io.dims},
                                               seed=h + w), words=11)
            feed = {k: torch.from_numpy(v).cuda() for k, v in feed_np.items()}
            with torch.no_grad():
                reference = module(*(feed[n] for n in engine.io.input_names))
            got = engine.run(feed)
            rows.append(compare(component, (h, w), engine.io.output_names, got, reference)
                        | timings(engine, module, feed, repeats))
            log.info("%s %dx%d: max |diff| %s", component, h, w, rows[-1]["max_abs_diff"])
        del module
        torch.cuda.empty_cache()
    for engine in engines.values():
        engine.close()
    return rows


def compare(component: str, size: tuple[int, int], names: list[str], got: dict[str, Any],
            reference: Any) -> dict[str, Any]:
    """The engine's outputs against PyTorch's (`latentrt.parity.compare`; non-finite outputs fail)."""
    from latentrt.parity import Tolerance
    from latentrt.parity import compare as parity

    def host(t: Any) -> Any:
        return t.detach().float().cpu().numpy()

    tolerance = Tolerance(atol=0.0, rtol=RELATIVE_TOLERANCE, scale_floor=1.0)
    report = parity({n: host(got[n]) for n in names}, {n: host(r) for n, r in zip(names, reference)}, tolerance,
                    context=f"{component} at {size[0]}x{size[1]}")
    return {"component": component, "size": f"{size[0]}x{size[1]}", "passed": report.ok,
            "max_abs_diff": {t.name: t.max_abs_diff for t in report.tensors}, "parity": report.to_json()}


def timings(engine: Any, module: Any, feed: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Median GPU milliseconds: the TensorRT engine vs PyTorch fp16 autocast on the same inputs."""
    import torch

    from latentrt.runtime.timing import StageTimer

    timer = StageTimer(engine.device)
    for _ in range(repeats):
        engine.run(feed, timer)
    trt_ms = timer.record().times(engine.component)
    torch_ms = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        for _ in range(repeats + 2):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            module(*(feed[n] for n in engine.io.input_names))
            end.record()
            end.synchronize()
            torch_ms.append(start.elapsed_time(end))
    return {"tensorrt_ms": round(statistics.median(trt_ms), 3),
            "pytorch_fp16_ms": round(statistics.median(torch_ms[2:]), 3)}


# ---------------------------------------------------------------------------- full-size random checkpoints


def make_full_checkpoint(family: str, folder: Path) -> Path:
    """A diffusers folder with the real SD 1.5 or SDXL(-Turbo) architecture and seeded random weights."""
    if (folder / "model_index.json").is_file():
        return folder
    import diffusers
    import torch
    from transformers import CLIPTokenizer

    from latentrt.families import get_family
    from latentrt.reference.tiny import make_scheduler, make_text_encoder
    from latentrt.reference.tokenizers import EOS, save_clip_tokenizer

    spec = get_family(family)
    parts: dict[str, Any] = {}
    for te in spec.text_encoders:  # the released towers: CLIP ViT-L/14, OpenCLIP ViT-bigG/14 (SDXL encoder 2)
        tower, seed, pad = _full_towers(EOS)[te.tower]
        tok = CLIPTokenizer.from_pretrained(str(save_clip_tokenizer(folder.parent / f"{te.tokenizer}-src", pad)))
        parts[te.tokenizer] = tok
        parts[te.component] = make_text_encoder(tower, te.pooled, int(tok.pad_token_id), seed)
    torch.manual_seed(2)
    parts["unet"] = diffusers.UNet2DConditionModel(**FULL_UNETS[spec.name]).eval()
    torch.manual_seed(3)
    parts["vae"] = diffusers.AutoencoderKL(**VAE, scaling_factor=spec.vae_scaling_factor,
                                           force_upcast=spec.fp16_vae_overflows).eval()
    parts["scheduler"] = make_scheduler(spec)
    pipeline = getattr(diffusers, spec.pipeline_class)
    takes = inspect.signature(pipeline.__init__).parameters
    extra: dict[str, Any] = {k: None for k in ("safety_checker", "feature_extractor") if k in takes}
    extra.update({k: False for k in ("requires_safety_checker", "add_watermarker") if k in takes})
    pipeline(**extra, **parts).save_pretrained(str(folder), safe_serialization=True)
    return folder


SD15_UNET: dict[str, Any] = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET: dict[str, Any] = dict(  # stabilityai/sdxl-turbo unet/config.json (the SDXL base architecture)
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
FULL_UNETS = {"sd1": SD15_UNET, "sdxl-turbo": SDXL_UNET}  # family name -> its released UNet architecture
FULL_MODELS = tuple(FULL_UNETS)
VAE: dict[str, Any] = dict(  # the SD / SDXL AutoencoderKL
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512,
)



def _full_towers(eos: str) -> dict[Any, tuple[Any, int, str]]:
    """Text tower -> (its released size as a `TinyText` recipe, weight seed, pad token: OpenCLIP pads with "!")."""
    from latentrt.families import TextTower
    from latentrt.reference.tiny import TinyText

    return {TextTower.CLIP_L: (TinyText(768, "quick_gelu", layers=12, heads=12, projection=768), 1, eos),
            TextTower.OPENCLIP_BIGG: (TinyText(1280, "gelu", layers=32, heads=20, projection=1280), 4, "!")}


# ---------------------------------------------------------------------------- output


def write_result(result: dict[str, Any], folder: Path) -> Path:
    from latentrt.manifest import atomic_write_json

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"gpu_check-{stamp}.json"
    atomic_write_json(path, result)
    return path


def summary(result: dict[str, Any], path: Path) -> str:
    lines = [f"gpu_check on {(result['environment']['gpu'] or {}).get('name')}: "
             f"{'PASSED' if result['passed'] else 'FAILED'} (details in {path})"]
    for check in result["checks"]:
        for row in check["components"]:
            worst = max(row["max_abs_diff"].values())
            lines.append(f"  {check['model']:<28} {row['component']:<15} {row['size']:>9}  max|diff| {worst:.3g}  "
                         f"trt {row['tensorrt_ms']:.2f} ms  torch fp16 {row['pytorch_fp16_ms']:.2f} ms  "
                         f"{'ok' if row['passed'] else 'MISMATCH'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
