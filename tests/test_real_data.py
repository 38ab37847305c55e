"""Acceptance on real DIALS output in ../shared/data: exact against DIALS' own s1."""

from __future__ import annotations

import numpy as np
import pytest

from dials_qconsistency.core.statistics import S1_OBSERVED, S1_PREDICTED, summarise
from dials_qconsistency.core.q_vectors import NOT_PREDICTED, REASONS, Options
from conftest import REAL_PAIRS, load, max_norm, run_core

EXACT = 1e-9  # Å⁻¹

PREDICTED_PAIRS = [
    ("quartz_processed", "refined.expt", "refined.refl", {}),
    ("quartz_processed", "integrated.expt", "integrated.refl", {"model_state": "integrate"}),
    ("ssx_CuNiR_test_data", "indexed.expt", "indexed.refl", {}),
    ("ssx_CuNiR_test_data", "integrated.expt", "integrated.refl", {}),
    ("dials_current", "centroid_refined.expt", "centroid_refined.refl", {}),
    ("dials_current", "cspad_stills_refined.expt", "cspad_stills_refined.refl", {}),
]


def test_quartz_refined_scan_varying_matches_refinement_state(shared):
    _, _, _, result = run_core(shared("quartz_processed", "refined.expt"), shared("quartz_processed", "refined.refl"))
    used = result.used
    assert used.sum() == 444  # README: 444 indexed rows
    assert max_norm(result.q_bragg[used], result.q_pred[used]) <= EXACT
    # negative control: the integrate-style state is measurably different on the
    # same table, so the bound above really tests the per-block state choice
    _, _, _, other = run_core(
        shared("quartz_processed", "refined.expt"), shared("quartz_processed", "refined.refl"), model_state="integrate"
    )
    assert max_norm(other.q_bragg[used], other.q_pred[used]) > 1e-6


def test_quartz_refined_other_block_width_breaks_agreement(shared):
    _, _, _, result = run_core(
        shared("quartz_processed", "refined.expt"), shared("quartz_processed", "refined.refl"), block_width=3.0
    )
    used = result.used
    assert max_norm(result.q_bragg[used], result.q_pred[used]) > 100 * EXACT


def test_quartz_integrated_with_integrate_interpolation(shared):
    experiments, _, columns, result = run_core(
        shared("quartz_processed", "integrated.expt"),
        shared("quartz_processed", "integrated.refl"),
        model_state="integrate",
    )
    used = result.used
    assert used.sum() == 1653
    scan = experiments[0].scan
    phi = columns["xyzcal.mm"][:, 2]
    start, stop = scan.oscillation_range
    inside = used & (phi >= start) & (phi < stop)
    assert inside.sum() < used.sum()  # the table holds predictions just outside the scan
    assert max_norm(result.q_bragg[inside], result.q_pred[inside]) <= EXACT
    # those outside take the first/last image's pair of states, as DIALS did: also exact
    outside = used & ~inside
    assert np.array_equal(result.outside_scan[used], outside[used])
    assert max_norm(result.q_bragg[outside], result.q_pred[outside]) <= EXACT


@pytest.mark.parametrize(
    "folder,name,n_used",
    [("ssx_CuNiR_test_data", "indexed", 360), ("dials_current", "cspad_stills_refined", 1167)],
)
def test_stills_delta_psi_relation(shared, folder, name, n_used):
    """DIALS moves each still's lattice point onto the Ewald sphere by Δψ."""
    _, _, columns, result = run_core(shared(folder, name + ".expt"), shared(folder, name + ".refl"))
    used = result.used
    assert used.sum() == n_used
    q = np.linalg.norm(result.q_bragg[used], axis=1)
    expected = 2 * q * np.abs(np.sin(columns["delpsical.rad"][used] / 2))
    observed = np.linalg.norm(result.q_bragg[used] - result.q_pred[used], axis=1)
    assert np.max(np.abs(observed - expected)) <= EXACT
    assert observed.max() > 1e-5  # the relation is not trivially 0 = 0


def test_ssx_integrated_ellipsoid_s2(shared):
    experiments, _, columns, result = run_core(
        shared("ssx_CuNiR_test_data", "integrated.expt"), shared("ssx_CuNiR_test_data", "integrated.refl")
    )
    used = result.used
    assert used.sum() == 5203
    s0 = np.array([experiments[i].beam.s0 for i in result.experiment[used]])
    assert max_norm(result.q_bragg[used], columns["s2"][used] - s0) <= EXACT


def test_dials_current_rotation_static(shared):
    _, _, _, result = run_core(
        shared("dials_current", "centroid_refined.expt"), shared("dials_current", "centroid_refined.refl")
    )
    used = result.used
    assert used.sum() == 568
    assert max_norm(result.q_bragg[used], result.q_pred[used]) <= EXACT


@pytest.mark.parametrize("folder,expt,refl,options", PREDICTED_PAIRS)
def test_q_pixel_at_calculated_position_equals_q_pred(shared, folder, expt, refl, options):
    experiments, _, _, result = run_core(shared(folder, expt), shared(folder, refl), **options)
    used = result.used
    assert used.any()
    assert max_norm(result.q_pixel[used], result.q_pred[used]) <= EXACT
    summary = summarise(result, experiments)
    assert {e.s1_kind for e in summary.experiments} == {S1_PREDICTED}


def test_centroid_indexed_s1_follows_observations(shared):
    experiments, _, _, result = run_core(
        shared("centroid_test_data", "indexed.expt"), shared("centroid_test_data", "indexed.refl")
    )
    summary = summarise(result, experiments)
    (only,) = summary.experiments
    assert only.s1_kind == S1_OBSERVED
    used = result.used
    to_observed = result.observed_to_pred[used]
    _, _, _, at_observed = run_core(shared("centroid_test_data", "indexed.expt"), shared("centroid_test_data", "indexed.refl"),
                                    q_pixel_source="observed")  # q_pixel at xyzobs.mm.value, computed as such
    both = used & at_observed.used
    assert both.sum() > 500 and np.allclose(result.observed_to_pred[both], np.linalg.norm(
        at_observed.q_pixel[both] - result.q_pred[both], axis=1), rtol=0, atol=1e-15)
    to_calculated = np.linalg.norm(result.q_pixel_calculated[used] - result.q_pred[used], axis=1)
    # s1 was computed from the centroids with the geometry before indexing refined it
    assert np.median(to_observed) < 0.5 * np.median(to_calculated)
    assert only.max_pixel_calculated_vs_pred > 1e-4  # would be a false failure if read as a prediction
    # README: 569 indexed rows; one has no calculated position (xyzcal.mm x = y = 0)
    assert summary.counts["used"] == 568
    assert summary.counts[REASONS[NOT_PREDICTED]] == 1


@pytest.mark.parametrize("folder, name", REAL_PAIRS)
@pytest.mark.parametrize("options", [
    {},
    {"q_pixel_source": "observed_px", "phi": "observed"},
    {"q_pixel_source": "observed", "model_state": "integrate"},
])
def test_blocks_change_no_bit(shared, monkeypatch, folder, name, options):
    """compute_q works in blocks of BLOCK_ROWS rows; blocks of 7 rows (many
    blocks, experiments and panels split across them), computed on 3 threads,
    give the same bits."""
    import dials_qconsistency.core.q_vectors as compute
    from dials_qconsistency.core import blocks

    experiments, table, columns = load(shared(folder, name + ".expt"), shared(folder, name + ".refl"))
    monkeypatch.setattr(blocks, "BLOCK_ROWS", 1 << 30)
    whole = compute.compute_q(experiments, columns, table.identifiers, Options(**options))
    monkeypatch.setattr(blocks, "BLOCK_ROWS", 7)
    blocks = compute.compute_q(experiments, columns, table.identifiers, Options(**options, threads=3))
    assert table.nrows > 7 * 10
    for field in ("q_bragg", "q_pixel", "q_pred", "q_pixel_calculated", "observed_to_pred", "s0", "rotation_axis",
                  "position_mm", "phi", "outside_scan", "reason"):
        a, b = getattr(whole, field), getattr(blocks, field)
        assert (a is None) == (b is None), field
        if a is not None:
            np.testing.assert_array_equal(a, b, err_msg=field)
