"""Pure pieces of the runtime: timing records and tables, image conversions (vs diffusers' VaeImageProcessor)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from latentrt.errors import InvalidRequest
from latentrt.runtime.cli_generate import output_paths
from latentrt.runtime.images import (
    float_to_pil,
    image_to_tensor,
    load_image,
    mask_to_tensor,
    read_png_metadata,
    save_png,
    tensor_to_float,
)
from latentrt.runtime.pipeline import parse_aspect
from latentrt.runtime.timing import StageTimer, TimingRecord, format_table, merge

# ---------------------------------------------------------------------------- timing


def test_timing_record_summary() -> None:
    record = TimingRecord([("text_encoder", 2.0), ("unet", 10.0), ("unet", 14.0), ("vae_decoder", 6.0),
                           ("total", 40.0)])
    stats = record.summary()
    assert list(stats) == ["text_encoder", "unet", "vae_decoder", "total"]
    assert (stats["unet"].count, stats["unet"].total_ms, stats["unet"].mean_ms) == (2, 24.0, 12.0)
    assert (stats["unet"].min_ms, stats["unet"].max_ms) == (10.0, 14.0)
    assert TimingRecord.from_json(record.to_json()).entries == record.entries
    assert record.to_json()["summary"]["unet"] == {"count": 2, "total_ms": 24.0, "mean_ms": 12.0}
    assert merge([record, record]).summary()["unet"].count == 4


def test_stage_order_puts_known_stages_first_and_total_last() -> None:
    record = TimingRecord([("custom", 1.0), ("total", 5.0), ("vae_decoder", 1.0), ("refiner_unet", 1.0),
                           ("unet", 1.0), ("text_encoder_2", 1.0)])
    assert record.stages() == ["text_encoder_2", "unet", "refiner_unet", "vae_decoder", "custom", "total"]


def test_format_table() -> None:
    table = format_table(TimingRecord([("unet", 30.0), ("unet", 10.0), ("vae_decoder", 10.0), ("total", 50.0)]),
                         title="timing")
    lines = table.splitlines()
    assert lines[0] == "timing" and lines[1].split() == ["stage", "calls", "total", "ms", "mean", "ms", "share"]
    assert lines[3].split() == ["unet", "2", "40.00", "20.00", "80.0%"]
    assert lines[4].split() == ["vae_decoder", "1", "10.00", "10.00", "20.0%"]
    assert lines[5].split() == ["total", "1", "50.00", "50.00"]


def test_stage_timer_on_cpu() -> None:
    timer = StageTimer("cpu")
    with timer.stage("total"):
        with timer.stage("unet"):
            time.sleep(0.01)
        with timer.prefixed("refiner_"):
            with timer.stage("unet"):
                pass
            timer.add("vae_decoder", 3.5)
    record = timer.record()
    assert [s for s, _ in record.entries] == ["unet", "refiner_unet", "refiner_vae_decoder", "total"]
    ms = dict(record.entries)
    assert ms["unet"] >= 10.0 and ms["total"] >= ms["unet"] and ms["refiner_vae_decoder"] == 3.5


def test_stage_timer_stops_on_error() -> None:
    timer = StageTimer()
    with pytest.raises(RuntimeError), timer.stage("unet"):
        raise RuntimeError("engine failed")
    assert [s for s, _ in timer.record().entries] == ["unet"]


# ---------------------------------------------------------------------------- images


def photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(1)
    channels = 4 if mode == "RGBA" else 3
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode)


def test_image_to_tensor_matches_diffusers() -> None:
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=8)
    for image, (h, w) in [(photo(64, 96), (96, 64)), (photo(100, 70), (64, 128))]:
        ref = proc.preprocess(image, height=h, width=w)
        ours = image_to_tensor(image, h, w)
        assert ours.shape == ref.shape == (1, 3, h, w) and ours.dtype == torch.float32
        assert torch.equal(ours, ref)


def test_mask_to_tensor_matches_diffusers() -> None:
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    mask = Image.new("RGB", (80, 72), (0, 0, 0))
    ImageDraw.Draw(mask).ellipse((10, 10, 60, 50), fill=(255, 255, 255))
    ImageDraw.Draw(mask).rectangle((0, 60, 80, 72), fill=(127, 128, 129))  # near the 0.5 threshold
    ref = proc.preprocess(mask, height=64, width=64)
    ours = mask_to_tensor(mask, 64, 64)
    assert ours.shape == ref.shape == (1, 1, 64, 64)
    assert torch.equal(ours, ref) and set(ours.unique().tolist()) == {0.0, 1.0}


def test_postprocess_matches_diffusers() -> None:
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=8)
    decoded = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 1.5
    ref_np: Any = proc.postprocess(decoded, output_type="np")
    ref_pil: Any = proc.postprocess(decoded, output_type="pil")
    ours = tensor_to_float(decoded)
    assert np.array_equal(ours, ref_np)
    for a, b in zip(float_to_pil(ours), ref_pil):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_png_metadata_roundtrip(tmp_path: Path) -> None:
    path = save_png(photo(32, 16), tmp_path / "sub" / "x.png", {"prompt": "a fox", "seed": 7, "settings": {"a": 1}})
    assert read_png_metadata(path) == {"prompt": "a fox", "seed": "7", "settings": '{"a": 1}'}
    assert not [p for p in path.parent.iterdir() if p.name != "x.png"]  # no temporary files left
    assert load_image(path).size == (32, 16)


def test_load_image_errors(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(InvalidRequest, match="cannot read the mask"):
        load_image(tmp_path / "x.png", "mask")


# ---------------------------------------------------------------------------- small helpers


def test_parse_aspect() -> None:
    assert parse_aspect("16:9") == pytest.approx(16 / 9)
    assert parse_aspect("3/2") == 1.5 and parse_aspect("1.25") == 1.25 and parse_aspect(2) == 2.0
    for bad in ("wide", "16:0", "-1", "0"):
        with pytest.raises(InvalidRequest):
            parse_aspect(bad)


def test_output_paths() -> None:
    assert output_paths("out.png", 1) == [Path("out.png")]
    assert output_paths("dir/out.png", 3) == [Path("dir/out-0.png"), Path("dir/out-1.png"), Path("dir/out-2.png")]
    assert output_paths("picture", 1) == [Path("picture.png")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stage_timer_on_cuda() -> None:
    """CUDA events resolve at `record()`; entries keep the order stages end in."""
    timer = StageTimer("cuda")
    x = torch.randn(2048, 2048, device="cuda")
    with timer.stage("total"):
        with timer.stage("unet"):
            for _ in range(5):
                x = x @ x / 2048
    record = timer.record()
    assert [s for s, _ in record.entries] == ["unet", "total"]
    ms = dict(record.entries)
    assert 0 < ms["unet"] <= ms["total"]
