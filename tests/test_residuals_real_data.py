"""Observation residuals on the real DIALS files: the decomposition against the table itself.

The references are computed directly from the table's own columns
(xyzcal.mm - xyzobs.mm, delpsical.rad, φcal - φobs), never from the program.
"""

from __future__ import annotations

import numpy as np
import pytest

from dials_qconsistency.core.statistics import summarise
from dials_qconsistency.core.decomposition import decompose
from conftest import run_core

PAIRS = [
    ("quartz_processed", "refined", {}),
    ("quartz_processed", "integrated", {"model_state": "integrate"}),
    ("ssx_CuNiR_test_data", "indexed", {}),
    ("ssx_CuNiR_test_data", "integrated", {}),
    ("centroid_test_data", "indexed", {}),
    ("dials_current", "centroid_refined", {}),
    ("dials_current", "cspad_stills_refined", {}),
]


@pytest.mark.parametrize("phi", ["calculated", "observed"])
@pytest.mark.parametrize("folder,stem,options", PAIRS, ids=[f"{f}/{s}" for f, s, _ in PAIRS])
def test_in_plane_rms_equals_table_calc_minus_obs(shared, folder, stem, options, phi):
    experiments, _, columns, result = run_core(
        shared(folder, stem + ".expt"), shared(folder, stem + ".refl"), q_pixel_source="observed", phi=phi, **options
    )
    parts = decompose(experiments, result)
    summary = summarise(result, experiments, parts)
    assert summary.experiments
    for e in summary.experiments:
        rows = result.used & (result.experiment == e.index)
        direct = columns["xyzcal.mm"][rows, :2] - columns["xyzobs.mm.value"][rows, :2]
        rms_direct = np.sqrt(np.mean(np.sum(direct**2, axis=1)))
        assert abs(e.residuals["rms_in_plane_mm"] - rms_direct) <= 1e-9, (e.index, e.residuals["rms_in_plane_mm"], rms_direct)
        assert e.residuals["rms_x_mm"] == pytest.approx(np.sqrt(np.mean(direct[:, 0] ** 2)), abs=1e-9)
        assert e.residuals["rms_y_mm"] == pytest.approx(np.sqrt(np.mean(direct[:, 1] ** 2)), abs=1e-9)
        assert rms_direct > 1e-3  # real residuals, so the equality above is not 0 = 0


@pytest.mark.parametrize("folder,stem", [("ssx_CuNiR_test_data", "indexed"), ("dials_current", "cspad_stills_refined")])
def test_delta_psi_is_dials_delpsical(shared, folder, stem):
    experiments, _, columns, result = run_core(shared(folder, stem + ".expt"), shared(folder, stem + ".refl"))
    parts = decompose(experiments, result)
    used = result.used
    reference = columns["delpsical.rad"][used]
    assert np.abs(parts.angle[used] - reference).max() <= 1e-12
    assert np.abs(reference).max() > 1e-3  # DIALS' values are not all zero
    assert not parts.rotation[used].any()


@pytest.mark.parametrize("folder,stem", [("quartz_processed", "refined"), ("dials_current", "centroid_refined")])
def test_delta_phi_with_observed_phi_is_calc_minus_obs(shared, folder, stem):
    experiments, _, columns, result = run_core(shared(folder, stem + ".expt"), shared(folder, stem + ".refl"), phi="observed")
    parts = decompose(experiments, result)
    used = result.used
    reference = columns["xyzcal.mm"][used, 2] - columns["xyzobs.mm.value"][used, 2]
    assert np.abs(parts.angle[used] - reference).max() <= 1e-9
    assert np.abs(reference).max() > 1e-4
    # with the calculated angle the lattice point is already on the sphere
    _, _, _, at_calculated = run_core(shared(folder, stem + ".expt"), shared(folder, stem + ".refl"))
    assert np.abs(decompose(experiments, at_calculated).angle[used]).max() <= 1e-9


def test_radial_and_transverse_match_dials_definition(shared):
    """DIALS: radial = unit(obs - beam centre), transverse = unit(radial × beam centre), Δ = cal - obs (lab)."""
    experiments, _, columns, result = run_core(
        shared("dials_current", "centroid_refined.expt"), shared("dials_current", "centroid_refined.refl"),
        q_pixel_source="observed",
    )
    parts = decompose(experiments, result)
    used = result.used
    panel = experiments[0].detector.panels[0]
    assert np.all(result.panel[used] == 0) or len(experiments[0].detector.panels) > 1
    s0 = experiments[0].beam.s0
    rows = used & (result.panel == 0)
    # the beam centre by hand: solve origin + x f + y s = t s0
    solve = np.linalg.solve(np.column_stack([panel.fast, panel.slow, -s0]), -panel.origin)
    centre = panel.origin + solve[0] * panel.fast + solve[1] * panel.slow
    obs = panel.origin + columns["xyzobs.mm.value"][rows, :1] * panel.fast + columns["xyzobs.mm.value"][rows, 1:2] * panel.slow
    delta = columns["xyzcal.mm"][rows, :1] * panel.fast + columns["xyzcal.mm"][rows, 1:2] * panel.slow
    delta -= columns["xyzobs.mm.value"][rows, :1] * panel.fast + columns["xyzobs.mm.value"][rows, 1:2] * panel.slow
    radial = (obs - centre) / np.linalg.norm(obs - centre, axis=1)[:, None]
    transverse = np.cross(radial, centre)
    transverse /= np.linalg.norm(transverse, axis=1)[:, None]
    assert np.abs(parts.radial_mm[rows] - np.einsum("ij,ij->i", delta, radial)).max() <= 1e-9
    assert np.abs(parts.transverse_mm[rows] - np.einsum("ij,ij->i", delta, transverse)).max() <= 1e-9


@pytest.mark.parametrize("folder,stem,options", PAIRS, ids=[f"{f}/{s}" for f, s, _ in PAIRS])
def test_decomposing_in_chunks_changes_no_bit(shared, folder, stem, options, monkeypatch):
    """Large tables are decomposed a block of rows at a time: 100-row blocks here
    (with unused rows between them), on 3 threads, give exactly the one-block result."""
    from dials_qconsistency.core import blocks

    experiments, _, _, result = run_core(shared(folder, stem + ".expt"), shared(folder, stem + ".refl"),
                                         q_pixel_source="observed", **options)
    monkeypatch.setattr(blocks, "BLOCK_ROWS", 1 << 30)
    whole = decompose(experiments, result)
    monkeypatch.setattr(blocks, "BLOCK_ROWS", 100)
    chunked = decompose(experiments, result, threads=3)
    assert result.used.sum() > 300
    for name in ("angle", "along_q", "delta_xy", "radial_mm", "transverse_mm", "radial", "transverse"):
        assert np.array_equal(getattr(whole, name), getattr(chunked, name), equal_nan=True), name
