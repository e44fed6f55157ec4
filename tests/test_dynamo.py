"""The dynamo (torch.export) exporter: every family's UNet exports with `--dynamo` and matches PyTorch.

`dynamic_shapes` are built from the IO spec (one named `torch.export.Dim` per symbolic dim, shared across
inputs), not converted from `dynamic_axes` (which failed on SDXL's added conditions). Each UNet graph
structure the registry has (its conditioning inputs, concatenated pieces, time-id width) is exported once
from its tiny checkpoint, opset 18; `test_every_family_unet_structure_is_exported` checks that every
registered family's UNet is one of them (families differing only in widths or scheduler settings share
a graph). Parity: the exporter's own check (`latentrt.export.onnx.parity_runs`, ONNX Runtime CPU vs PyTorch,
fp32, atol 1e-4 + rtol 1e-4, at batch 1 and 2, square and non-square latents, one and two prompt windows),
recorded in the manifest (measured 1.1e-6 to 1.4e-6); plus one run at a batch, latent size and context
length not among the traced or parity shapes. The non-SDXL UNets are marked slow (~20-30 s each here).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from latentrt.errors import InvalidRequest
from latentrt.families import FAMILIES, FamilySpec
from latentrt.manifest import ONNX_KIND, read_manifest
from latentrt.names import DIM_LATENT_HEIGHT, DIM_LATENT_WIDTH, DIM_SEQUENCE, DIM_UNET_BATCH, TIME_IDS
from latentrt.tensors import ComponentIO, Dim, TensorSpec, dummy_inputs, io_from_json

# one tiny checkpoint per UNet graph structure (tiny:sd1-lcm adds the LCM guidance embedding `timestep_cond`)
SLOW = pytest.mark.slow  # ~15-30 s each on 2 cores; the SDXL ones (the reported crash) always run
UNET_MODELS = ["tiny:sdxl", "tiny:sdxl-refiner", pytest.param("tiny:sd1", marks=SLOW),
               pytest.param("tiny:sd1-inpaint", marks=SLOW), pytest.param("tiny:sd1-lcm", marks=SLOW),
               # issue 12: UNet2DModel denoisers (no context; a class embedding; a low-res image concatenated)
               pytest.param("tiny:ldm", marks=SLOW), pytest.param("tiny:ldm-class-cond", marks=SLOW),
               pytest.param("tiny:ldm-super-res", marks=SLOW),
               pytest.param("tiny:sd2-depth", marks=SLOW), pytest.param("tiny:sd-x4-upscaler", marks=SLOW),
               pytest.param("tiny:ldm-text2img", marks=SLOW), pytest.param("tiny:sd2-unclip", marks=SLOW)]
STRUCTURE_OF = {"tiny:sd1": "sd1", "tiny:sd1-inpaint": "sd1-inpaint", "tiny:sdxl": "sdxl",
                "tiny:sdxl-refiner": "sdxl-refiner", "tiny:sd1-lcm": "sd1",
                "tiny:ldm": "ldm", "tiny:ldm-class-cond": "ldm-class-cond", "tiny:ldm-super-res": "ldm-super-res",
                "tiny:sd2-depth": "sd2-depth", "tiny:sd-x4-upscaler": "sd-x4-upscaler",
                "tiny:ldm-text2img": "ldm-text2img", "tiny:sd2-unclip": "sd2-unclip"}


def unet_structure(spec: FamilySpec) -> tuple[object, ...]:
    """What decides a UNet's graph apart from widths: conditioning inputs, concatenated pieces, time-id width."""
    d = spec.denoiser
    ids = d.conditioning_input(TIME_IDS)
    return (tuple((c.name, c.keyword, c.dtype, c.sequence, c.optional) for c in d.conditioning),
            tuple((c.name, c.channels) for c in d.concat), ids.width if ids is not None else None)


def test_every_family_unet_structure_is_exported() -> None:
    tested = {unet_structure(FAMILIES[f]) for f in STRUCTURE_OF.values()}
    untested = [s.name for s in FAMILIES.values() if unet_structure(s) not in tested]
    assert not untested, f"add a tiny checkpoint of these UNet structures to UNET_MODELS: {untested}"


@pytest.mark.parametrize("model", UNET_MODELS)
def test_dynamo_unet_export_matches_pytorch(model: str, tmp_path: Path) -> None:
    from latentrt.export.onnx import export_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_model(model, tmp_path / "onnx", dynamo=True, components=["unet"])
    m = read_manifest(out, ONNX_KIND)
    assert m["exporter"] == "dynamo" and m["opset"] == 18 and list(m["components"]) == ["unet"]
    checks = m["components"]["unet"]["parity"]["checks"]
    assert len(checks) >= 2 and {c["sizes"][DIM_UNET_BATCH] for c in checks} == {1, 2}
    print(model, "dynamo unet parity max|diff|", max(max(c["max_abs_diff"].values()) for c in checks))
    # the graph's dims are symbolic: a batch, latent size and context length it was neither traced nor checked at
    io = io_from_json(m["components"]["unet"]["io"])
    sizes = {DIM_UNET_BATCH: 3, DIM_LATENT_HEIGHT: 32, DIM_LATENT_WIDTH: 8}
    if DIM_SEQUENCE in io.dims:
        sizes[DIM_SEQUENCE] = 3 * io.dims[DIM_SEQUENCE].min
    feed = dummy_inputs(io, sizes, seed=7)
    session = ort.InferenceSession(str(out / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    (sample,) = session.run(None, feed)
    assert np.asarray(sample).shape == (3, io.outputs[0].shape[1], 32, 8)


class DataDependent(torch.nn.Module):
    """A branch on a tensor's values, which torch.export cannot trace."""

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        return (latent * 2 if bool(latent.sum() > 0) else latent - 1,)


def test_dynamo_refuses_clearly_what_it_cannot_trace(tmp_path: Path) -> None:
    from latentrt.export.onnx import export_component

    dim = Dim("batch", 1, 1, 8)
    io = ComponentIO("toy", (TensorSpec("latent", "float32", (dim, 4)),), (TensorSpec("out", "float32", (dim, 4)),))
    with pytest.raises(InvalidRequest, match="dynamo exporter cannot export toy .*export without --dynamo"):
        export_component(DataDependent().eval(), io, tmp_path / "toy", opset=18, dynamo=True)
