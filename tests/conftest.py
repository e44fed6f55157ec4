"""Shared fixtures. Sections: environment, checkpoints and exports (export stage). Add new sections below."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# ---------------------------------------------------------------------------- environment


@pytest.fixture(scope="session", autouse=True)
def latentrt_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A per-session LATENTRT_CACHE, so tiny checkpoints are built fresh and shared within the session."""
    cache = tmp_path_factory.mktemp("latentrt-cache")
    old = os.environ.get("LATENTRT_CACHE")
    os.environ["LATENTRT_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("LATENTRT_CACHE", None)
    else:
        os.environ["LATENTRT_CACHE"] = old


# ---------------------------------------------------------------------------- checkpoints and exports


@pytest.fixture(scope="session")
def tiny_checkpoint(latentrt_cache: Path) -> Callable[[str], Path]:
    """Factory: family id -> the built-in tiny diffusers folder of that family (built once per session)."""
    from latentrt.reference.tiny import tiny_folder

    return tiny_folder


@pytest.fixture(scope="session")
def onnx_export_dir(latentrt_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: family id -> an ONNX export folder of tiny:<family> (all components, parity checked, cached)."""
    from latentrt.export.onnx import export_model

    exported: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("onnx-exports")

    def get(family: str) -> Path:
        if family not in exported:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                exported[family] = export_model(f"tiny:{family}", root / family)
        return exported[family]

    return get
