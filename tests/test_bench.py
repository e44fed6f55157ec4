"""`latentrt bench` on the tiny SD 1.x model: the record is complete and consistent (no timing assertions)."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from latentrt.cli import main
from latentrt.errors import InvalidRequest, OutputConflict
from latentrt.runtime.bench import (
    BenchCase,
    _linear_fit,
    percentile_stats,
    psnr_db,
    rotated,
    sweep_cases,
)
from latentrt.runtime.bench.cli import parse_sweeps

STEPS, RUNS = 2, 2
BACKENDS = ("reference", "onnxruntime", "onnxruntime-int8")
STAGES = ("text_encoder", "unet", "vae_decoder", "total")


@pytest.fixture(scope="module")
def bench(onnx_export_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One CLI run: reference vs ONNX Runtime fp32 vs int8, 128x128, 2 steps, a steps sweep; (out dir, record)."""
    out = tmp_path_factory.mktemp("bench")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["bench", str(onnx_export_dir("sd1")), "-o", str(out), "--backends", "reference,onnxruntime",
                   "--precision", "int8", "--steps", str(STEPS), "--size", "128x128", "--warmup", "1",
                   "--runs", str(RUNS), "--sweep", "steps=1,2", "--no-progress"])
    assert rc == 0
    return out, json.loads((out / "bench.json").read_text())


def _stats_blocks(record: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = []
    for case in record["cases"]:
        for r in case["results"].values():
            blocks.append(r["end_to_end_ms"])
            for s in r["stages"].values():
                blocks += [b for b in (s["per_run"], s["per_call"]) if b]
    return blocks


def test_every_stage_of_every_backend_is_recorded(bench) -> None:
    _, record = bench
    assert record["settings"]["backends"] == list(BACKENDS)
    assert [c["name"] for c in record["cases"]] == ["128x128 b1 s2", "128x128 b1 s1"]  # main case first, once
    for case in record["cases"]:
        assert set(case["results"]) == set(BACKENDS)
        for label, r in case["results"].items():
            assert set(STAGES) <= set(r["stages"]), label
            assert r["stages"]["unet"]["calls_per_run"] == case["case"]["steps"]  # one (CFG-batched) call per step
            assert r["stages"]["total"]["per_run"]["n"] == RUNS and len(r["runs_ms"]) == RUNS
            assert r["images_per_s"] > 0
    for label in BACKENDS:
        info = record["backends"][label]
        assert info["cold"]["end_to_end_ms"] > 0 and info["load_s"] > 0 and info["describe"]


def test_percentiles_are_ordered(bench) -> None:
    for block in _stats_blocks(bench[1]):
        assert block["min"] <= block["p50"] <= block["p90"] <= block["p99"] <= block["max"]
        assert block["min"] <= block["mean"] <= block["max"]


def test_stages_fit_inside_end_to_end(bench) -> None:
    for case in bench[1]["cases"]:
        for label, r in case["results"].items():
            staged = sum(s["per_run"]["mean"] for name, s in r["stages"].items() if name != "total")
            assert staged <= r["end_to_end_ms"]["mean"] + 1e-3, label
            assert r["overhead"]["untimed_ms"] >= -1e-3
            if label != "reference":  # engine compute is inside the stages, which are inside the total
                assert 0 < r["overhead"]["engine_ms"] <= staged + 1e-3
                assert r["overhead"]["pipeline_ms"] == pytest.approx(r["end_to_end_ms"]["mean"] - r["overhead"]["engine_ms"],
                                                                     abs=1e-2)


def test_speedups_are_reference_over_backend(bench) -> None:
    for case in bench[1]["cases"]:
        ref = case["results"]["reference"]
        for label in ("onnxruntime", "onnxruntime-int8"):
            r, ratio = case["results"][label], case["vs_reference"][label]
            assert ratio["end_to_end"] == pytest.approx(ref["end_to_end_ms"]["p50"] / r["end_to_end_ms"]["p50"], rel=1e-3)
            unet = ref["stages"]["unet"]["per_call"]["p50"] / r["stages"]["unet"]["per_call"]["p50"]
            assert ratio["unet_per_step"] == pytest.approx(unet, rel=1e-3)
        q = case["int8_vs_fp32"]["speedup"]["end_to_end"]
        assert q == pytest.approx(case["results"]["onnxruntime"]["end_to_end_ms"]["p50"]
                                  / case["results"]["onnxruntime-int8"]["end_to_end_ms"]["p50"], rel=1e-3)


def test_images_agree_with_the_diffusers_pipeline(bench) -> None:
    case = bench[1]["cases"][0]
    assert case["image_vs_reference"]["onnxruntime"]["max_abs_diff"] < 1e-2  # same seed, fp32: same image
    int8 = case["int8_vs_fp32"]["image"]
    assert 0 < int8["max_abs_diff"] < 0.5 and int8["psnr_db"] > 15  # int8 changes pixels, not the picture


def test_build_quantize_and_flops_are_reported(bench) -> None:
    record = bench[1]
    assert record["build"]["build_onnxruntime_s"] > 0 and record["build"]["quantize_s"] > 0
    assert record["build"]["int8"]["calibration_feeds"] > 0  # static recipe: calibrated on recorded UNet inputs
    flops = record["cases"][0]["flops"]
    assert flops["unet_gflop_per_call"] > 0 and set(flops["unet_gflops"]) == set(BACKENDS)
    assert record["machine"]["peak"]["fp32_gemm_gflops"] > 0 and record["machine"]["peak_rss_mb"] > 0
    assert record["machine"]["cpu"] and record["machine"]["tools"]["onnxruntime"]


def test_steps_sweep_fits_a_fixed_and_per_step_cost(bench) -> None:
    sweep = bench[1]["sweeps"]["steps"]
    assert sweep["x"] == [1, 2] and set(sweep["series"]) == set(BACKENDS)
    for label, fit in sweep["fit"].items():  # two points: the line goes through both
        y = sweep["series"][label]["end_to_end_p50_ms"]
        assert fit["fixed_ms"] + fit["slope_ms"] * 2 == pytest.approx(y[1], abs=0.05)


def test_markdown_and_png_reports_are_written(bench) -> None:
    out, record = bench
    md = (out / "bench.md").read_text()
    assert all(label in md for label in BACKENDS) and "speedup vs reference" in md
    pngs = [out / p for p in record["files"].values() if p.endswith(".png")]
    assert {p.name for p in pngs} == {"stages.png", "sweep-steps.png"}
    for p in pngs:
        with Image.open(p) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100


# ---------------------------------------------------------------------------- pure helpers


def test_percentile_stats_of_known_values() -> None:
    s = percentile_stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["p50"] == 3.0 and s["mean"] == 22.0 and s["min"] == 1.0 and s["max"] == 100.0
    assert s["p90"] == pytest.approx(61.6) and s["p99"] == pytest.approx(96.16)


def test_rotation_puts_every_backend_in_every_position() -> None:
    labels = ["a", "b", "c"]
    orders = [rotated(labels, i) for i in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert all(sorted(o[k] for o in orders) == labels for k in range(3))


def test_linear_fit_recovers_fixed_and_per_step_cost() -> None:
    fit = _linear_fit([1, 2, 4, 8], [100 + 25 * s for s in (1, 2, 4, 8)])
    assert fit == {"fixed_ms": 100.0, "slope_ms": 25.0}
    assert _linear_fit([4, 4], [1.0, 2.0]) is None


def test_psnr() -> None:
    a = np.zeros((1, 4, 4, 3), np.float32)
    assert math.isinf(psnr_db(a, a))
    assert psnr_db(a, a + 0.1) == pytest.approx(20.0)


def test_sweep_parsing_and_validation() -> None:
    assert parse_sweeps(["steps=1,2,4", "size=256x256, 512x768"]) == {"steps": ["1", "2", "4"],
                                                                      "size": ["256x256", "512x768"]}
    main_case = BenchCase(512, 512, 1, 30)
    cases = sweep_cases(main_case, {"size": ["512x768", "256x256"], "batch": ["2"], "steps": ["1", "4"]})
    assert [(c.height, c.width) for c in cases["size"]] == [(256, 256), (512, 512), (512, 768)]  # main included
    assert [(c.batch, c.steps) for c in cases["batch"]] == [(1, 30), (2, 30)]
    assert [c.steps for c in cases["steps"]] == [1, 4, 30]
    for bad in ({"seed": [1]}, {"steps": ["0"]}, {"size": ["big"]}):
        with pytest.raises(InvalidRequest):
            sweep_cases(main_case, bad)
    with pytest.raises(InvalidRequest):
        parse_sweeps(["steps"])


def test_unknown_backend_is_refused(tmp_path: Path) -> None:
    from latentrt.workflows.bench import run_bench

    with pytest.raises(InvalidRequest, match="unknown backend"):
        run_bench("tiny:sd1", backends=["coreml"], out_dir=tmp_path)  # openvino is a backend now (issue 11)


def test_bench_takes_a_built_engine_folder_and_finds_its_checkpoint(onnx_export_dir, tmp_path: Path) -> None:
    from latentrt.engines.build import build_engines
    from latentrt.runtime.bench import read_targets
    from latentrt.workflows.bench import run_bench

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engines = build_engines(onnx_export_dir("sd1"), tmp_path / "engines", backend="onnxruntime")
    targets = read_targets(engines)
    assert targets.checkpoint == "tiny:sd1" and targets.folders == {"onnxruntime": engines}
    record = run_bench(engines, backends=["reference", "onnxruntime"], steps=1, sizes=[(128, 128)], warmup=0,
                       runs=1, out_dir=tmp_path / "out", flops=False, plots=False)
    assert record.build == {}  # nothing exported or built: the folder was used as it is
    assert record.backends["onnxruntime"]["folder"] == str(engines)
    assert set(record.cases[0]["results"]) == {"reference", "onnxruntime"}
    assert (tmp_path / "out" / "bench.json").is_file() and not (tmp_path / "out" / "stages.png").exists()


def test_a_second_bench_reuses_the_engines_it_built(onnx_export_dir, tmp_path: Path) -> None:
    from latentrt.workflows.bench import prepare_targets

    said: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = prepare_targets(onnx_export_dir("sd1"), ["onnxruntime"], tmp_path, torch.device("cpu"), said.append)
        engine = first.folders["onnxruntime"] / "unet" / "model.onnx"
        stamp = engine.stat().st_mtime_ns
        manifest = (first.folders["onnxruntime"] / "manifest.json").read_text()
        second = prepare_targets(onnx_export_dir("sd1"), ["onnxruntime"], tmp_path, torch.device("cpu"), said.append)
    assert second.folders == first.folders
    assert engine.stat().st_mtime_ns == stamp  # unchanged cache keys: not rebuilt
    assert json.loads((second.folders["onnxruntime"] / "manifest.json").read_text())["components"] == \
        json.loads(manifest)["components"]
    # a folder there that is not engines is replaced only when LatentRT wrote it: a stranger's file is refused
    (tmp_path / "engines-onnxruntime" / "notes.txt").write_text("mine")
    with pytest.raises(OutputConflict):
        prepare_targets(onnx_export_dir("sd1"), ["onnxruntime"], tmp_path, torch.device("cpu"), said.append)
    assert (tmp_path / "engines-onnxruntime" / "notes.txt").read_text() == "mine"


def test_diffusers_baselines_in_bfloat16_and_on_one_thread(onnx_export_dir, tmp_path: Path) -> None:
    from latentrt.workflows.bench import run_bench

    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = run_bench(onnx_export_dir("sd1"), backends=["reference", "reference-bf16", "reference-1thread"],
                           steps=1, sizes=[(128, 128)], warmup=0, runs=1, out_dir=tmp_path / "out", flops=False,
                           plots=False)
    assert torch.get_num_threads() == threads  # the one-thread runs leave torch as they found it
    one = record.backends["reference-1thread"]  # float32 on one thread runs the float32 pipeline already loaded
    assert "weights shared" in one["describe"][0] and one["load_s"] == 0 and one["rss_load_mb"] == 0
    assert "weights shared" not in record.backends["reference-bf16"]["describe"][0]  # its own bfloat16 copy
    assert "bfloat16" in record.backends["reference-bf16"]["describe"][0]
    assert "1 thread(s)" in record.backends["reference-1thread"]["describe"][0]
    case = record.cases[0]
    assert set(case["vs_reference"]) == {"reference-bf16", "reference-1thread"}
    same = case["image_vs_reference"]["reference-1thread"]
    assert same["max_abs_diff"] < 1e-4  # float32 on fewer threads: the same picture, summed in another order
    bf16 = case["image_vs_reference"]["reference-bf16"]
    assert 0 < bf16["max_abs_diff"] and bf16["psnr_db"] > 20  # bfloat16 rounds, the picture stays
    assert case["vs_fp32"]["reference-bf16"]["fp32"] == "reference" and "reference-1thread" not in case["vs_fp32"]


def test_named_engine_folders_are_measured_and_compared(onnx_export_dir, tmp_path: Path) -> None:
    """`--engines ours=DIR`: a folder of the user's own build runs next to the standard labels (on the backend its
    manifest names) and `--compare-to` rates every backend against one of them."""
    from latentrt.engines.build import build_engines

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = build_engines(onnx_export_dir("sd1"), tmp_path / "mine", backend="onnxruntime")
        out = tmp_path / "out"
        rc = main(["bench", str(onnx_export_dir("sd1")), "-o", str(out), "--backends", "onnxruntime",
                   "--engines", f"ours={ours}", "--compare-to", "onnxruntime", "--steps", "1", "--size", "128x128",
                   "--warmup", "0", "--runs", "1", "--no-flops", "--no-plots", "--no-progress"])
    assert rc == 0
    record = json.loads((out / "bench.json").read_text())
    assert record["settings"]["backends"] == ["onnxruntime", "ours"]
    assert record["settings"]["engines"] == {"ours": str(ours)} and record["settings"]["compare_to"] == ["onnxruntime"]
    assert record["backends"]["ours"]["folder"] == str(ours)
    assert "onnxruntime unet" in " ".join(record["backends"]["ours"]["describe"])
    case = record["cases"][0]
    assert case["image_baseline"] == "onnxruntime"  # a named folder is never the fp32 baseline
    assert "ours" not in case["vs_fp32"]
    vs = case["vs"]["onnxruntime"]["ours"]
    assert vs["speedup"]["end_to_end"] > 0
    assert vs["image"]["max_abs_diff"] < 1e-5  # the same engines built twice: the same picture
    md = (out / "bench.md").read_text()
    assert "vs onnxruntime (speedup = onnxruntime p50 / backend p50" in md and "| ours |" in md


def test_named_engine_folders_are_checked(onnx_export_dir, tmp_path: Path) -> None:
    from latentrt.engines.build import build_engines
    from latentrt.runtime.bench import read_targets
    from latentrt.runtime.bench.cli import parse_engines
    from latentrt.runtime.bench.targets import add_named
    from latentrt.workflows.bench import run_bench

    for bad in ("ours", "=x", "ours=", "a=x,a=y"):
        with pytest.raises(InvalidRequest, match="--engines"):
            parse_engines(bad.split(","))
    assert parse_engines(["ours = /x"]) == {"ours": "/x"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = build_engines(onnx_export_dir("sd1"), tmp_path / "mine", backend="onnxruntime")
        other = onnx_export_dir("sd2")
    t = read_targets(onnx_export_dir("sd1"))
    for label, folder, message in (("on nx", ours, "letters, digits"), ("openvino", ours, "backend's own name"),
                                   ("ours", tmp_path, "no manifest.json"), ("ours", other, "not engines")):
        with pytest.raises(InvalidRequest, match=message):
            add_named(t, label, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd2 = build_engines(other, tmp_path / "sd2-engines", backend="onnxruntime")
    with pytest.raises(InvalidRequest, match="engines; the benchmark's model is 'sd1'"):
        add_named(t, "ours", sd2)
    add_named(t, "ours", ours)
    with pytest.raises(InvalidRequest, match="given twice"):
        add_named(t, "ours", ours)
    with pytest.raises(InvalidRequest, match="--compare-to openvino"):
        run_bench(onnx_export_dir("sd1"), backends=["onnxruntime"], compare_to=["openvino"], out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
