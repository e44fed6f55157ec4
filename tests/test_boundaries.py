"""The stage boundary and the one timer: every core module is held to the import-linter contract that keeps
it free of stages, and `StageTimer` serves both the pipeline (`stage`) and module hooks (`start` / `stop`).
No timed assertions: only which entries are recorded, in which order."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from latentrt.runtime.bench.runner import engine_ms, stages_of
from latentrt.runtime.timing import StageTimer, TimingRecord

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"__init__", "cli"}  # may import every stage


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["name"]: c for c in config["contracts"]}


def test_every_core_module_is_forbidden_from_importing_stages() -> None:
    core = {f"latentrt.{p.stem}" for p in (ROOT / "latentrt").glob("*.py") if p.stem not in ENTRY_POINTS}
    contract = _contracts()["core imports no stage"]
    assert set(contract["source_modules"]) == core
    assert {"latentrt.reference", "latentrt.export", "latentrt.engines", "latentrt.runtime",
            "latentrt.workflows"} <= set(contract["forbidden_modules"])


def test_every_stage_package_is_installed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, folder in config["package-dir"].items():
        assert package in config["packages"] and (ROOT / folder / "__init__.py").is_file(), package


def test_stage_timer_start_stop_for_hooks_nests_by_name() -> None:
    timer = StageTimer("cpu")
    timer.start("total")
    timer.start("unet")
    timer.start("unet")  # re-entered: stop ends the latest
    timer.stop("unet")
    timer.stop("unet")
    with timer.prefixed("refiner_"), timer.stage("vae_decoder"):
        pass
    timer.stop("total")
    record = timer.record()
    assert [s for s, _ in record.entries] == ["unet", "unet", "refiner_vae_decoder", "total"]
    assert all(ms >= 0 for _, ms in record.entries)
    with pytest.raises(KeyError, match="not started"):
        timer.stop("unet")


def test_engine_time_is_the_engine_components_stages() -> None:
    record = TimingRecord([("text_encoder", 1.0), ("unet", 2.0), ("unet", 3.0), ("refiner_unet", 4.0),
                           ("vae_decoder", 5.0), ("total", 20.0)])
    assert engine_ms(record, {"text_encoder", "unet", "vae_decoder"}) == 15.0
    assert stages_of(record)["unet"] == [2.0, 3.0] and stages_of(record)["total"] == [20.0]
