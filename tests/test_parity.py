"""The one comparator (`latentrt.parity`): limits, pass/fail, worst tensor, merged reports, errors.

Exact arithmetic on small hand-made arrays: a tensor passes when max |got - ref| <= atol + rtol *
max |ref| (max |ref| floored at `scale_floor` when set), compared in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from latentrt.errors import ExportMismatch
from latentrt.parity import Tolerance, compare, compare_tensor, merge


def test_limit_is_atol_plus_rtol_times_the_reference_scale() -> None:
    small, large = np.array([0.25, -0.5]), np.array([-4.0, 2.0])
    assert Tolerance(atol=1e-3, rtol=1e-2).limit(small) == pytest.approx(1e-3 + 1e-2 * 0.5)
    assert Tolerance(atol=1e-3, rtol=1e-2).limit(large) == pytest.approx(1e-3 + 1e-2 * 4.0)
    # scale_floor: rtol * max(floor, max |ref|), the engine-verification bound r * max(1, max |ref|)
    floored = Tolerance(atol=0.0, rtol=1e-3, scale_floor=1.0)
    assert floored.limit(small) == pytest.approx(1e-3)
    assert floored.limit(large) == pytest.approx(4e-3)
    assert floored.limit(np.zeros((0,))) == pytest.approx(1e-3)  # empty reference: scale 1
    assert Tolerance(atol=0.0, rtol=1e-3).limit(np.zeros((0,))) == 0.0


def test_compare_passes_within_the_limit_and_fails_beyond_it() -> None:
    ref = {"a": np.array([1.0, -2.0]), "b": np.array([0.5])}
    tol = Tolerance(atol=0.0, rtol=0.25)  # limits (exact in binary): a 0.5, b 0.125
    report = compare({"a": ref["a"] + 0.5, "b": ref["b"]}, ref, tol, context="64x64")
    assert report.ok and report.max_abs_diff == 0.5  # at the limit passes
    assert report.tensor("a").limit == 0.5 and report.tensor("b").psnr_db == math.inf
    assert report.raise_if_failed("unet") is report
    failed = compare({"a": ref["a"], "b": ref["b"] + 0.25}, ref, tol, context="64x64")
    assert not failed.ok and not failed.tensor("b").ok and failed.tensor("a").ok
    assert failed.tensor("b").rel_l2 == 0.5 and failed.worst is not None and failed.worst.name == "b"
    with pytest.raises(ExportMismatch) as caught:
        failed.raise_if_failed("unet")
    assert str(caught.value) == "unet: output 'b' at 64x64 differs from PyTorch by max |diff| 0.25 > tolerance 0.125"


def test_a_passing_tensor_is_never_the_worst_over_a_failing_one() -> None:
    ref = {"zero": np.zeros(3), "out": np.ones(3)}
    report = compare({"zero": np.zeros(3), "out": np.ones(3) + 1.0}, ref, Tolerance(atol=0.0, rtol=1e-3))
    assert report.tensor("zero").limit == 0.0 and report.tensor("zero").ok  # identical: passes at limit 0
    assert report.worst is not None and report.worst.name == "out"
    with pytest.raises(ExportMismatch, match="out"):
        report.raise_if_failed("vae_decoder")


def test_shape_mismatch_missing_and_non_finite_outputs_fail() -> None:
    ref = np.ones((2, 3))
    shape = compare_tensor("x", np.ones((3, 2)), ref)
    assert not shape.ok and shape.max_abs_diff == math.inf and shape.shape == (3, 2) and shape.ref_shape == (2, 3)
    for bad in (np.nan, np.inf):
        got = ref.copy()
        got[0, 0] = bad
        t = compare_tensor("x", got, ref, Tolerance(atol=1.0, rtol=1.0))
        assert not t.ok and t.max_abs_diff == math.inf
    missing = compare({}, {"x": ref})
    assert not missing.ok and missing.tensor("x").shape == ()
    with pytest.raises(ExportMismatch, match=r"shape \(3, 2\), reference \(2, 3\)"):
        compare({"x": np.ones((3, 2))}, {"x": ref}, context="ctx").raise_if_failed("unet")
    record = compare({"x": np.ones((3, 2))}, {"x": ref}).to_json()
    assert record["ok"] is False and record["tensors"][0]["max_abs_diff"] == "inf"
    assert record["tensors"][0]["shape"] == [3, 2]


def test_merge_keeps_each_tensors_run_furthest_from_its_limit() -> None:
    ref = {"x": np.ones(4), "y": np.ones(4)}
    tol = Tolerance(atol=0.0, rtol=1e-2)
    first = compare({"x": ref["x"] + 0.001, "y": ref["y"] + 0.009}, ref, tol, context="64x64")
    second = compare({"x": ref["x"] + 0.005, "y": ref["y"]}, ref, tol, context="128x128")
    merged = merge([first, second])
    assert merged.context == "64x64; 128x128" and merged.ok
    assert merged.tensor("x").max_abs_diff == pytest.approx(0.005)
    assert merged.tensor("y").max_abs_diff == pytest.approx(0.009)
    third = compare({"x": ref["x"] + 0.05, "y": ref["y"]}, ref, tol, context="256x256")
    assert not merge([first, second, third], context="sizes").ok
    assert merge([]).tensors == () and merge([]).worst is None
