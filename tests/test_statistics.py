"""The summary statistics against numpy's own functions, computed a second way."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import run_core
from dials_qconsistency.core.statistics import summarise
from dials_qconsistency.core.row_statistics import contiguous, norm_statistics, row_distances
from dials_qconsistency.core.blocks import rows_by_group
from dials_qconsistency.core.decomposition import decompose


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
        copy = values.copy()
        assert norm_statistics(copy, overwrite=True) == stats  # partitioned in place, after the sums
        assert n < 5 or not np.array_equal(copy, values)  # ... and so reordered
        assert np.array_equal(np.sort(copy), np.sort(values))


def test_contiguous_rows_become_slices():
    assert contiguous(np.arange(3, 9), 20) == slice(3, 9)
    assert contiguous(slice(None), 20) == slice(0, 20)
    assert contiguous(np.zeros(0, dtype=int), 20) == slice(0, 0)
    gaps = np.array([1, 2, 4])
    assert contiguous(gaps, 20) is gaps


def test_row_distances_in_blocks(monkeypatch):
    from dials_qconsistency.core import blocks

    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(1000, 3)), rng.normal(size=(1000, 3))
    rows = np.sort(rng.choice(1000, 300, replace=False))
    expected = np.linalg.norm(a[rows] - b[rows], axis=1)
    monkeypatch.setattr(blocks, "BLOCK_ROWS", 7)
    np.testing.assert_array_equal(row_distances(a, b, rows), expected)
    np.testing.assert_array_equal(row_distances(a, rows=np.arange(10, 500)), np.linalg.norm(a[10:500], axis=1))


def test_largest_distance_in_blocks_is_the_largest_finite_one(monkeypatch):
    from dials_qconsistency.core import blocks
    from dials_qconsistency.core.row_statistics import largest_distance

    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(1000, 3)), rng.normal(size=(1000, 3))
    a[::5] = np.nan  # rows not used: NaN vectors
    rows = np.sort(rng.choice(1000, 300, replace=False))
    monkeypatch.setattr(blocks, "BLOCK_ROWS", 7)
    d = np.linalg.norm(a[rows] - b[rows], axis=1)
    assert largest_distance(a, b, rows) == float(np.nanmax(d))
    assert largest_distance(a, b, slice(10, 400)) == float(np.nanmax(np.linalg.norm(a[10:400] - b[10:400], axis=1)))
    assert largest_distance(a, b, np.arange(0, 1000, 5)) is None  # no finite distance
    assert largest_distance(a, b, np.zeros(0, dtype=np.int64)) is None


def test_summary_of_one_experiment_is_the_overall_one_in_separate_dicts(shared):
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


def _rms(values):
    values = values[np.isfinite(values)]
    return float(np.sqrt(np.mean(values**2))) if values.size else None


@pytest.mark.parametrize("folder,stem", [("dials_current", "cspad_stills_refined"), ("quartz_processed", "integrated")])
def test_grouped_statistics_equal_each_group_masked_directly(shared, folder, stem, monkeypatch):
    """Per panel, per panel group and per resolution shell (one pass of bincounts
    over 50-row blocks) against each group's rows taken by a mask."""
    from dials_qconsistency.core import blocks

    experiments, _, _, result = run_core(shared(folder, stem + ".expt"), shared(folder, stem + ".refl"),
                                         q_pixel_source="observed")
    parts = decompose(experiments, result)
    monkeypatch.setattr(blocks, "BLOCK_ROWS", 50)
    summary = summarise(result, experiments, parts)
    used = result.used
    norm = np.linalg.norm(result.q_bragg - result.q_pixel, axis=1)
    angle = np.degrees(parts.angle)
    d = 1.0 / np.linalg.norm(result.q_bragg, axis=1)
    selections = [(entry, result.panel == entry["panel"]) for entry in summary.per_panel]
    selections += [(entry, np.isin(result.panel, entry["panels"])) for entry in summary.per_panel_group]
    selections += [(entry, (d <= entry["d_max"] * (1 + 1e-12)) & (d >= entry["d_min"] * (1 - 1e-12)))
                   for entry in summary.per_resolution_shell]
    assert len(summary.per_panel) > (30 if folder == "dials_current" else 0)
    assert len(summary.per_resolution_shell) == 10
    assert len(summary.per_panel_group) == (4 if folder == "dials_current" else 0)  # CSPAD: 4 quadrants
    for entry, mask in selections:
        rows = used & mask
        assert entry["n"] == rows.sum() > 0
        assert {k: entry[k] for k in ("n", "median", "p95", "max")} == {
            k: norm_statistics(norm[rows])[k] for k in ("n", "median", "p95", "max")}
        assert entry["mean"] == norm_statistics(norm[rows])["mean"]
        expected = {
            "rms_in_plane_mm": _rms(np.hypot(parts.delta_xy[rows, 0], parts.delta_xy[rows, 1])),
            "rms_x_mm": _rms(parts.delta_xy[rows, 0]),
            "rms_radial_mm": _rms(parts.radial_mm[rows]),
            "rms_transverse": _rms(parts.transverse[rows]),
            "rms_along_q": _rms(parts.along_q[rows]),
            "mean_along_q": float(np.mean(parts.along_q[rows])),
            "rms_delta_phi_deg": _rms(angle[rows & parts.rotation]),
            "rms_delta_psi_deg": _rms(angle[rows & ~parts.rotation]),
        }
        for name, value in expected.items():
            assert (entry[name] is None) == (value is None), name
            if value is not None:
                assert entry[name] == pytest.approx(value, rel=1e-12, abs=1e-300), name
        assert expected["rms_in_plane_mm"] > 1e-3  # observed positions: real residuals, not 0 = 0


@pytest.mark.parametrize("count", [1, 3, 40000])
@pytest.mark.parametrize("in_order", [True, False])
def test_rows_by_group_equals_a_mask_per_group(count, in_order):
    rng = np.random.default_rng(count)
    labels = rng.integers(-1, count + 1, 5000)  # -1 and count belong to no group
    if in_order:
        labels.sort()
    select = rng.random(5000) < 0.7
    groups = rows_by_group(labels, count, select)
    assert len(groups) == count
    for group in list(range(min(count, 50))) + [count - 1]:
        assert np.array_equal(groups[group], np.flatnonzero(select & (labels == group))), group
    assert sum(g.size for g in groups) == np.count_nonzero(select & (labels >= 0) & (labels < count))
    assert np.array_equal(rows_by_group(labels, count)[count - 1], np.flatnonzero(labels == count - 1))
    one = np.zeros(5000, dtype=np.int64)  # every row selected, one group: the shortcut without gathering
    assert np.array_equal(rows_by_group(one, 1, np.ones(5000, dtype=bool))[0], np.arange(5000))
    one[::7] = -1
    assert np.array_equal(rows_by_group(one, 1, np.ones(5000, dtype=bool))[0], np.flatnonzero(one == 0))


@pytest.mark.parametrize("folder,stem", [("dials_current", "cspad_stills_refined"), ("quartz_processed", "integrated")])
def test_summary_on_threads_is_the_same_floats(shared, folder, stem, monkeypatch):
    """The blocks' sums computed by three threads (and 50-row blocks, so many
    finish out of order) are added in block order: the same floats as one thread."""
    from dials_qconsistency.core import blocks

    experiments, _, _, result = run_core(shared(folder, stem + ".expt"), shared(folder, stem + ".refl"),
                                         q_pixel_source="observed")
    parts = decompose(experiments, result)
    monkeypatch.setattr(blocks, "BLOCK_ROWS", 50)
    one, three = (summarise(result, experiments, parts, threads=threads) for threads in (1, 3))
    assert result.used.sum() > 1000
    for name in ("residuals", "per_panel", "per_panel_group", "per_resolution_shell"):
        assert getattr(one, name) == getattr(three, name), name
    assert [e.residuals for e in one.experiments] == [e.residuals for e in three.experiments]
    assert one.per_panel and one.residuals["rms_in_plane_mm"] > 1e-3


def test_resolution_shells_in_blocks_are_the_whole_table_formula(monkeypatch):
    """Shells of equal volume in 1/d³ by blocks of 64 rows: the same shells and
    edges as the formula on the whole column; none when some d is infinite."""
    from dials_qconsistency.core import blocks
    from dials_qconsistency.core.statistics import resolution_shells

    monkeypatch.setattr(blocks, "BLOCK_ROWS", 64)
    q = np.random.default_rng(3).normal(size=(1000, 3)) * 0.3
    rows = np.flatnonzero(np.arange(1000) % 7 != 3)
    shell, edges = resolution_shells(q, rows, 10)
    inverse_cubed = 1.0 / (1.0 / np.linalg.norm(q[rows], axis=1)) ** 3
    low, high = inverse_cubed.min(), inverse_cubed.max()
    expected = np.clip(np.floor((inverse_cubed - low) / ((high - low) / 10)).astype(int), 0, 9)
    assert np.array_equal(shell, expected) and shell.dtype == np.int32
    assert np.unique(shell).size >= 5 and edges[0] > edges[-1]  # shells used; low resolution first
    assert np.array_equal(edges, np.linspace(low, high, 11) ** (-1.0 / 3.0))
    q[rows[500]] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # |q| = 0: no shells, and no division warning
        assert resolution_shells(q, rows, 10) is None


def test_map_blocks_yields_in_block_order_a_few_blocks_ahead(monkeypatch):
    """Blocks finishing out of order come back in block order; only a few are
    handed to the pool ahead of the one taken; an error in one is raised."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from dials_qconsistency.core import blocks

    monkeypatch.setattr(blocks, "BLOCK_ROWS", 10)
    started = []

    def work(block):
        started.append(block.start)
        time.sleep(0.05 if block.start == 0 else 0.002 * ((block.start // 10) % 3))  # later blocks finish first
        return block.start

    with ThreadPoolExecutor(3) as pool:
        results = blocks.map_blocks(200, work, pool)
        first = next(results)
        assert first == 0 and len(started) <= blocks.BLOCKS_AHEAD + 1
        assert [first, *results] == list(range(0, 200, 10))

    def failing(block):
        if block.start == 50:
            raise ValueError("block 50")
        return block.start

    with ThreadPoolExecutor(2) as pool, pytest.raises(ValueError, match="block 50"):
        list(blocks.map_blocks(200, failing, pool))


@pytest.mark.parametrize("name", ["indexed.refl", "integrated.refl"])
def test_releasing_the_input_a_block_at_a_time_changes_no_number(name, shared, monkeypatch, tmp_path):
    """compute_q and the decomposition tell the table which rows they have
    read, a block at a time, so that it lets their pages go: the released
    ranges cover the rows used, and every number is the one computed without
    releasing (with blocks of 128 rows, so that the 654/2269-row tables of the
    centroid sweep make many, and on two threads). Blocks of fewer than
    RELEASE_ROWS rows (experiments of a few rows) are not told."""
    from dials_qconsistency.core import blocks
    from dials_qconsistency.core.q_vectors import Options, compute_q
    from dials_qconsistency.io.refl import ReflectionTable
    from dials_qconsistency.io.expt import read_experiments

    monkeypatch.setattr(blocks, "BLOCK_ROWS", 128)
    monkeypatch.setattr(blocks, "RELEASE_ROWS", 1)
    expt = shared("centroid_test_data", "indexed.expt" if name == "indexed.refl" else "experiments.json")
    experiments = read_experiments(expt)
    table = ReflectionTable.from_file(shared("centroid_test_data", name))
    released = []

    def release(start, stop):
        released.append((start, stop))
        table.release_rows(start, stop)

    options = Options(q_pixel_source="observed", threads=2)
    kept = compute_q(experiments, table.columns(), table.identifiers, options)
    result = compute_q(experiments, table.columns(), table.identifiers, options, release_input=release)
    covered = np.zeros(table.nrows, dtype=bool)
    for start, stop in released:
        covered[start:stop] = True
    assert len(released) > 3 and covered[result.used].all()
    told = []
    monkeypatch.setattr(blocks, "RELEASE_ROWS", 32)
    blocks.release_block(lambda *rows: told.append(rows), np.arange(5, 36))
    blocks.release_block(lambda *rows: told.append(rows), slice(40, 72))
    assert told == [(40, 72)]
    parts = decompose(experiments, result, 2, release)
    for field in ("q_bragg", "q_pixel", "q_pred", "position_mm", "s0"):
        assert np.array_equal(getattr(result, field), getattr(kept, field), equal_nan=True), field
    expected = decompose(experiments, kept, 2)
    for field in ("angle", "along_q", "delta_xy", "radial", "transverse", "radial_mm", "transverse_mm"):
        assert np.array_equal(getattr(parts, field), getattr(expected, field), equal_nan=True), field


@pytest.mark.parametrize("n_groups,low", [(1, 0), (361, -1), (5000, 7), (40, 10**6)])
def test_values_sorted_by_group_are_the_lexsorts_bit_for_bit(n_groups, low, monkeypatch):
    """The segment sort of few groups (and the lexsort of many, or of keys
    spanning 2**15 or more) give values[np.lexsort((values, groups))] to the
    bit: ties (±0, repeated values, NaN) in their first order; and
    grouped_statistics of it equal norm_statistics of each group."""
    from dials_qconsistency.core import row_statistics

    rng = np.random.default_rng(n_groups)
    n = 20_000
    groups = low + rng.integers(0, n_groups, n) * (1000 if low == 10**6 else 1)  # the last spans > 2**15
    values = np.round(rng.exponential(1.0, n), 2)  # many ties
    values[rng.integers(0, n, 50)] = -0.0
    values[rng.integers(0, n, 50)] = 0.0
    values[rng.integers(0, n, 5)] = np.nan
    reference = values[np.lexsort((values, groups))]
    for limit in (4096, 0):  # the segment sort where it applies, and the lexsort always
        monkeypatch.setattr(row_statistics, "SEGMENT_SORT_GROUPS", limit)
        keys, starts, counts, ordered = row_statistics._sorted_by_group(groups, values)
        assert np.array_equal(ordered.view(np.int64), reference.view(np.int64))
        assert np.array_equal(keys, np.unique(groups)) and counts.sum() == n
        assert np.array_equal(np.repeat(keys, counts), np.sort(groups))
    finite = np.abs(values)  # |Δq|-like: no NaN
    finite[np.isnan(finite)] = 1.0
    keys, stats = row_statistics.grouped_statistics(groups, finite)
    for i in rng.integers(0, keys.size, 5):
        expected = norm_statistics(finite[groups == keys[i]])
        assert stats["n"][i] == expected["n"] and stats["median"][i] == expected["median"]
        assert stats["p95"][i] == expected["p95"] and stats["max"][i] == expected["max"]
        assert abs(stats["mean"][i] - expected["mean"]) <= 1e-15 * abs(expected["mean"])


def test_histogram_of_values_within_a_few_ulps_has_finite_bins():
    """|Δq| = |Δs0| in every row (a beam tilted alone, the quartz sweep) spans
    a few ulps: numpy cannot make 50 finite bins of that range and the report
    stopped with an internal error. The bins are then a millionth of the value
    wide about it; any other spread gets numpy's own bins."""
    from dials_qconsistency.core.row_statistics import histogram

    value = 0.13918089
    values = value + np.spacing(value) * np.array([0, 1, 1, 2, 3, 3, 3, 5], dtype=float)
    with pytest.raises(ValueError):
        np.histogram(values, bins=50)
    counts, edges = histogram(values)
    assert counts.sum() == values.size and len(edges) == 51
    assert edges[0] < values.min() and values.max() < edges[-1]
    assert (edges[-1] - edges[0]) == pytest.approx(1e-6 * value + (values.max() - values.min()), rel=1e-6)
    spread = np.linspace(1e-4, 3e-3, 97)
    for mine, numpy_own in zip(histogram(spread), np.histogram(spread, bins=50)):
        assert np.array_equal(mine, numpy_own)
    counts, _ = histogram(np.array([np.nan, 0.0, 0.0]))
    assert counts.sum() == 2
