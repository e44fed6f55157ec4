"""`benchmarks/matrix_summary.py`: one table per case from several real bench runs that share anchors."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest

pytest.importorskip("openvino")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "matrix_summary.py"


def _script():
    spec = importlib.util.spec_from_file_location("matrix_summary", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_sharing_anchors_make_one_table(onnx_export_dir, tmp_path: Path, monkeypatch, capsys) -> None:
    from latentrt.engines.build import build_engines
    from latentrt.workflows.bench import run_bench

    export = onnx_export_dir("sd1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = build_engines(export, tmp_path / "ours", backend="openvino", precision="bf16")
        for name, backends in (("case-a", ["reference", "onnxruntime", "openvino-naive"]),
                               ("case-b", ["openvino", "openvino-naive"])):
            run_bench(export, backends=backends, engines={"ours": ours}, compare_to=["openvino-naive"], steps=1,
                      sizes=[(64, 64)], warmup=0, runs=1, out_dir=tmp_path / name, build_dir=tmp_path / "build",
                      flops=False, plots=False)
    out = tmp_path / "matrix.md"
    monkeypatch.setattr("sys.argv", ["matrix_summary", str(tmp_path / "case-a"), str(tmp_path / "case-b"), "-o",
                                     str(out)])
    _script().main()
    md = out.read_text()
    assert md.strip() in capsys.readouterr().out  # printed as well as written
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in md.splitlines()
            if line.startswith("| ") and not line.startswith("| backend")}
    assert list(rows) == ["reference", "onnxruntime", "openvino", "openvino-naive", "ours"]  # one table, one case
    assert rows["reference"][1] == "A" and rows["openvino"][1] == "B" and rows["ours"][1] == "A, B"
    a, b = (json.loads((tmp_path / n / "bench.json").read_text())["cases"][0] for n in ("case-a", "case-b"))
    ratio = [c["vs"]["openvino-naive"]["ours"]["speedup"]["end_to_end"] for c in (a, b)]
    assert rows["ours"][3] == f"{ratio[0]:.2f}x / {ratio[1]:.2f}x"  # within-run ratios, both runs
    chained = a["results"]["reference"]["end_to_end_ms"]["p50"] / a["results"]["openvino-naive"]["end_to_end_ms"]["p50"] \
        * b["vs"]["openvino-naive"]["openvino"]["speedup"]["end_to_end"]
    assert rows["openvino"][4] == f"{chained:.2f}x (chained)"  # put against diffusers through the anchor
    assert rows["onnxruntime"][4] == f"{a['vs_reference']['onnxruntime']['end_to_end']:.2f}x"
    assert rows["openvino"][7].startswith("(baseline)")  # B has no diffusers: its fp32 OpenVINO is the baseline
