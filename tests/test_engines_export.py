"""Integration: `latentrt export` of each tiny family -> ONNX Runtime engines -> same outputs as the diffusers modules."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from latentrt.engines.build import build_engines
from latentrt.engines.profiles import route
from latentrt.families import FamilyId, get_family
from latentrt.manifest import ENGINE_KIND, MANIFEST, read_manifest
from latentrt.names import INPUT_IDS
from latentrt.tensors import dummy_inputs, io_from_json, prompt_like

# shapes that differ from the export's own parity checks (batch 3, 24x16 latents)
CHECK_SIZES = {"batch": 3, "unet_batch": 3, "latent_height": 24, "latent_width": 16, "tokens": 77, "sequence": 77}


def pytorch_outputs(loaded, component: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    from latentrt.reference.wrappers import wrap

    module = wrap(component, loaded)
    with torch.no_grad():
        return [y.numpy() for y in module(*(torch.from_numpy(v) for v in feed.values()))]




@pytest.mark.parametrize("family", [f.value for f in FamilyId])
def test_engines_from_a_real_export_match_pytorch(onnx_export_dir: Callable[[str], Path], tmp_path: Path,
                                                  family: str) -> None:
    from latentrt.reference.models import load_checkpoint

    out = build_engines(onnx_export_dir(family), tmp_path / "engines", backend="onnxruntime", threads=1)
    manifest = read_manifest(out, ENGINE_KIND)
    assert list(manifest["components"]) == list(get_family(family).components)
    loaded = load_checkpoint(f"tiny:{family}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for c, entry in manifest["components"].items():
        io = io_from_json(entry["io"])
        feed = dummy_inputs(io, {k: v for k, v in CHECK_SIZES.items() if k in io.dims}, seed=7)
        if not any(t.high for t in io.inputs if t.name == INPUT_IDS):  # CLIP ids; a bounded vocab (LDM-BERT) as drawn
            feed = prompt_like(feed)
        session = ort.InferenceSession(str(out / entry["path"]), options, providers=["CPUExecutionProvider"])
        got = [np.asarray(y) for y in session.run(io.output_names, feed)]
        for name, g, r in zip(io.output_names, got, pytorch_outputs(loaded, c, feed)):
            assert g.shape == r.shape
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(r).max())),
                                       err_msg=f"{family} {c}.{name}")


def test_tensorrt_plan_of_a_real_export(onnx_export_dir: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    """The plan reads the real export's IO: every SDXL bucket routes to a profile of every component."""
    from latentrt.cli import main
    from latentrt.engines.build import plan_for_export, read_onnx_export

    export = read_onnx_export(onnx_export_dir("sdxl"))
    plan = plan_for_export(export, strategy="grouped")
    for h, w in plan.sizes:
        sizes = {"unet_batch": 2, "latent_height": h // 8, "latent_width": w // 8, "sequence": 77}
        assert plan.profiles[route(plan, "unet", sizes)].covers("unet", sizes)
    assert main(["build", str(export.folder), "--backend", "tensorrt", "--plan"]) == 0
    assert "family sdxl: 3 profile(s)" in capsys.readouterr().out
    assert json.loads((export.folder / MANIFEST).read_text())["family"] == "sdxl"
