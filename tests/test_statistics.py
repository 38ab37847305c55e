"""The summary statistics against numpy's own functions, computed a second way."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_core
from dials_qconsistency.analysis import contiguous, norm_statistics, row_distances, summarise
from dials_qconsistency.decomposition import decompose


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 19, 20, 21, 100, 1001, 65537])
def test_norm_statistics_are_numpys_median_and_percentile(n):
    """One partition gives the same floats as np.median and np.percentile(…, 95)."""
    rng = np.random.default_rng(n)
    for values in (rng.exponential(0.01, n), np.round(rng.exponential(3, n)), rng.exponential(1e-16, n)):
        stats = norm_statistics(values)
        assert stats["median"] == float(np.median(values))
        assert stats["p95"] == float(np.percentile(values, 95))
        assert stats["mean"] == float(values.mean())
        assert stats["max"] == float(values.max())
        assert stats["rms"] == float(np.sqrt(np.mean(values**2)))
        assert stats["n"] == n


def test_contiguous_rows_become_slices():
    assert contiguous(np.arange(3, 9), 20) == slice(3, 9)
    assert contiguous(slice(None), 20) == slice(0, 20)
    assert contiguous(np.zeros(0, dtype=int), 20) == slice(0, 0)
    gaps = np.array([1, 2, 4])
    assert contiguous(gaps, 20) is gaps


def test_row_distances_in_blocks(monkeypatch):
    from dials_qconsistency import compute

    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(1000, 3)), rng.normal(size=(1000, 3))
    rows = np.sort(rng.choice(1000, 300, replace=False))
    expected = np.linalg.norm(a[rows] - b[rows], axis=1)
    monkeypatch.setattr(compute, "BLOCK_ROWS", 7)
    np.testing.assert_array_equal(row_distances(a, b, rows), expected)
    np.testing.assert_array_equal(row_distances(a, rows=np.arange(10, 500)), np.linalg.norm(a[10:500], axis=1))


def test_summary_of_repeated_row_sets_is_computed_once_and_not_shared(shared):
    """One experiment: its statistics, the overall ones and the residual table are
    the same rows; they agree with a direct computation and are separate dicts."""
    experiments, _, _, result = run_core(shared("quartz_processed", "refined.expt"),
                                         shared("quartz_processed", "refined.refl"))
    summary = summarise(result, experiments, decompose(experiments, result))
    used = result.used
    direct = norm_statistics(np.linalg.norm(result.q_bragg[used] - result.q_pixel[used], axis=1))
    (only,) = summary.experiments
    assert summary.delta_q == direct == only.delta_q
    assert {k: summary.residuals[k] for k in direct} == direct
    assert only.residuals == summary.residuals
    only.residuals["mean"] = -1.0
    assert summary.residuals["mean"] == direct["mean"]
