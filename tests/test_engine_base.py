"""One engine base for every backend: feed checks, shape preparation, timing into a StageTimer, output packing.

Every backend class available on CPU (the PyTorch reference and ONNX Runtime, loaded from the tiny sd1
export) refuses a bad feed the same way (UnsupportedShape, before anything runs or is timed), records
one stage per run, and the two agree through `latentrt.parity.compare`.

Tolerance (torch vs ONNX Runtime, fp32 both): atol = 1e-4, rtol = 1e-4 (pass if max |diff| <= atol + rtol
* max |torch|), the export's own parity tolerance; measured on the tiny model: max |diff| 1.1e-5
(vae_decoder images), ~1e-6 for the other components (limits 1.8e-4 .. 4.3e-4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch

from latentrt.errors import StaleArtifact, UnsupportedShape
from latentrt.parity import Tolerance, compare
from latentrt.runtime.backends.base import Engine
from latentrt.runtime.engine_set import EngineSet, load_engines
from latentrt.runtime.timing import StageTimer
from latentrt.tensors import ComponentIO, Sizes, dummy_inputs

TOLERANCE = Tolerance(atol=1e-4, rtol=1e-4)
SIZES = [{"batch": 1, "unet_batch": 2, "latent_height": 8, "latent_width": 16},
         {"batch": 2, "unet_batch": 3, "latent_height": 16, "latent_width": 8}]
BACKENDS = ["torch", "onnxruntime"]


@pytest.fixture(scope="module")
def engine_sets(onnx_export_dir: Callable[[str], Path]) -> dict[str, EngineSet]:
    folder = onnx_export_dir("sd1")
    return {b: load_engines(folder, backend=b) for b in BACKENDS}


def feed_for(io: ComponentIO, sizes: Mapping[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    own = {k: v for k, v in sizes.items() if k in io.dims}
    return {k: torch.from_numpy(v) for k, v in dummy_inputs(io, own, seed).items()}


def bad_feeds(io: ComponentIO) -> list[tuple[str, dict[str, torch.Tensor], str]]:
    """(what, feed, expected message) for the UNet: one of each way a feed can be wrong."""
    good = feed_for(io, SIZES[0])
    lo = io.dims["latent_height"].min
    return [
        ("missing input", {k: v for k, v in good.items() if k != "timestep"}, "unet: missing input 'timestep'"),
        ("wrong rank", good | {"sample": good["sample"][None]}, "input 'sample' has rank 5, expected 4"),
        ("inconsistent dims", good | {"timestep": torch.zeros(5)}, "inconsistent unet_batch: 2 vs 5"),
        ("fixed axis", good | {"sample": good["sample"][:, :1]}, "input 'sample' has shape"),
        ("out of range", good | {"sample": torch.zeros(2, 4, lo - 1, 16)},
         f"latent_height={lo - 1} is outside the supported range"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_feeds_are_refused_before_running(backend: str, engine_sets: dict[str, EngineSet]) -> None:
    unet = engine_sets[backend]["unet"]
    timer = StageTimer()
    for what, feed, message in bad_feeds(unet.io):
        with pytest.raises(UnsupportedShape, match=message):
            unet.run(feed, timer)
        assert timer.record().entries == [], what  # refused before the backend ran: nothing timed


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_stage_per_run(backend: str, engine_sets: dict[str, EngineSet]) -> None:
    es = engine_sets[backend]
    timer = StageTimer()
    es["text_encoder"].run(feed_for(es["text_encoder"].io, SIZES[0]), timer)
    for sizes in SIZES:
        es["unet"].run(feed_for(es["unet"].io, sizes), timer)
    with timer.prefixed("refiner_"):
        es["vae_decoder"].run(feed_for(es["vae_decoder"].io, SIZES[0]), timer)
    es["unet"].run(feed_for(es["unet"].io, SIZES[0]))  # no timer: runs, records nothing
    entries = timer.record().entries
    assert [s for s, _ in entries] == ["text_encoder", "unet", "unet", "refiner_vae_decoder"]
    assert all(math.isfinite(ms) and ms >= 0 for _, ms in entries)
    assert not any(hasattr(e, "last_latency_ms") for e in es.engines.values())  # the timer is the one record


def test_torch_and_onnxruntime_agree(engine_sets: dict[str, EngineSet]) -> None:
    ort_set, ref_set = engine_sets["onnxruntime"], engine_sets["torch"]
    for name, engine in ort_set.engines.items():
        for seed, sizes in enumerate(SIZES):
            feed = feed_for(engine.io, sizes, seed)
            got, ref = engine.run(feed), ref_set[name].run(feed)
            assert list(got) == list(ref) == engine.io.output_names
            assert all(y.dtype == torch.float32 and y.device == engine.device for y in got.values())
            report = compare({k: v.numpy() for k, v in got.items()}, {k: v.numpy() for k, v in ref.items()},
                             TOLERANCE, context=f"{name} onnxruntime vs torch at {sizes}")
            assert report.ok, report.to_json()


class _Fixed(Engine):
    """A complete backend in a few lines: it implements only `_run` (here: fixed outputs) and `_prepare`."""

    backend = "fixed"

    def __init__(self, io: ComponentIO, outputs: Callable[[Sizes], dict[str, torch.Tensor]]):
        super().__init__(io)
        self.outputs = outputs
        self.prepared: list[dict[str, int]] = []
        self.seen: dict[str, torch.Tensor] = {}

    def _prepare(self, sizes: Sizes) -> None:
        self.prepared.append(dict(sizes))

    def _run(self, inputs: dict[str, torch.Tensor], sizes: Sizes) -> Mapping[str, torch.Tensor]:
        self.seen = inputs
        return self.outputs(sizes)


def test_base_prepares_casts_and_checks_outputs(engine_sets: dict[str, EngineSet]) -> None:
    """The base hands `_run` cast, contiguous inputs after `_prepare`, and refuses outputs unlike the IO spec."""
    io = engine_sets["onnxruntime"]["unet"].io
    engine = _Fixed(io, lambda sizes: {t.name: torch.zeros(2, 4, 8, 16, dtype=torch.float16) for t in io.outputs})
    feed = feed_for(io, SIZES[0])
    feed["timestep"] = feed["timestep"].double()
    feed["sample"] = feed["sample"].transpose(2, 3).contiguous().transpose(2, 3)  # not contiguous
    out = engine.run(feed)
    assert engine.prepared == [{"unet_batch": 2, "latent_height": 8, "latent_width": 16, "sequence": 77}]
    assert engine.seen["timestep"].dtype == torch.float32 and engine.seen["sample"].is_contiguous()
    assert out["out_sample"].dtype == torch.float32  # outputs in the IO spec's dtype
    with pytest.raises(StaleArtifact, match=r"gave 'out_sample' shape \(2, 4, 8, 16\), the IO spec \(2, 4, 16, 8\)"):
        engine.run(feed_for(io, {"unet_batch": 2, "latent_height": 16, "latent_width": 8}))
    empty = _Fixed(io, lambda sizes: {})
    with pytest.raises(StaleArtifact, match="gave no output 'out_sample'"):
        empty.run(feed)
