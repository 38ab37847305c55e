"""Analytic geometry and the simulator: exact q from known models."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dials_qconsistency.core import geometry
from dials_qconsistency.core.q_vectors import Options, compute_q
from dials_qconsistency.io.expt import experiments_from_dict
from dials_qconsistency.model.experiment import Beam, Crystal, Detector, Experiment, ExperimentList, Goniometer, Panel, Scan
from simulation.simulate import (
    multi_axis_goniometer_dict,
    simulate_rotation,
    simulate_stills,
    tiled_detector,
)
from conftest import max_norm


def Rx(t):
    c, s = math.cos(t), math.sin(t)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def Ry(t):
    c, s = math.cos(t), math.sin(t)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def Rz(t):
    c, s = math.cos(t), math.sin(t)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def test_rotation_matrices_match_elementary_rotations():
    angles = np.array([0.3, -1.2, 2.5])
    for axis, elementary in (((1, 0, 0), Rx), ((0, 1, 0), Ry), ((0, 0, 2), Rz)):
        got = geometry.rotation_matrices(axis, angles)
        for matrix, angle in zip(got, angles):
            assert np.abs(matrix - elementary(angle)).max() < 1e-15


def test_hand_computed_reflection_on_a_single_axis_sweep():
    """Cubic a = 10 Å, U = I, λ = 1 Å, beam along -z, axis x, h = (0, 1, 0).

    The Ewald condition gives sin φ = 0.05 and q = (0, 0.1 cos φ, 0.1 sin φ);
    the spot lands on a plane 100 mm away at y = 100 · 0.1 cos φ / 0.995.
    """
    phi = math.asin(0.05)
    q_expected = np.array([[0.0, 0.1 * math.cos(phi), 0.005]])
    lab_y = 100.0 * 0.1 * math.cos(phi) / 0.995
    panel = Panel("p", np.array([-50.0, 50.0, -100.0]), np.array([1.0, 0, 0]), np.array([0, -1.0, 0]),
                  np.array([0.1, 0.1]), np.array([1000, 1000]))
    experiment = Experiment(
        "", Beam(np.array([0, 0, -1.0]), 1.0), Detector([panel]),
        Goniometer(np.array([1.0, 0, 0]), np.eye(3), np.eye(3)), Scan((1, 10), (0.0, math.radians(1.0))),
        Crystal(np.diag([0.1, 0.1, 0.1])),
    )
    columns = {
        "id": np.array([0]),
        "miller_index": np.array([[0, 1, 0]]),
        "panel": np.array([0]),
        "s1": q_expected + [0, 0, -1.0],
        "xyzcal.mm": np.array([[50.0, 50.0 - lab_y, phi]]),
    }
    result = compute_q(ExperimentList([experiment]), columns, {})
    for name in ("q_bragg", "q_pixel", "q_pred"):
        assert max_norm(getattr(result, name), q_expected) <= 1e-12, name


def test_two_level_hierarchy_composes_like_explicit_rotations():
    panels = experiments_from_dict(
        {"__id__": "ExperimentList", "experiment": [{"detector": 0}], "detector": [tiled_detector(160.0)]}
    )[0].detector.panels
    root = np.column_stack([[1, 0, 0], [0, -1, 0], [0, 0, -1]])  # [f s n] of the root
    width = 400 * 0.172
    # group 1: tilted 3° about its fast axis; its panel 0 turned 1° in plane
    g_orientation = root @ np.column_stack([[1, 0, 0], Rx(math.radians(3)) @ [0, 1, 0], Rx(math.radians(3)) @ [0, 0, 1]])
    g_origin = root @ [-width - 1.0, 2.0, 1.5] + [0, 0, -160.0]
    panel = panels[2]
    assert np.abs(panel.fast - g_orientation @ Rz(math.radians(1)) @ [1, 0, 0]).max() < 1e-14
    assert np.abs(panel.slow - g_orientation @ Rz(math.radians(1)) @ [0, 1, 0]).max() < 1e-14
    assert np.abs(panel.origin - g_origin).max() < 1e-12
    # the panels are really rotated, so the test exercises the composition
    assert abs(panel.fast @ [1, 0, 0] - 1) > 1e-5 and abs(panel.normal @ [0, 0, 1]) < 1 - 1e-4


def test_multi_axis_goniometer_F_and_S():
    gonio = experiments_from_dict(
        {"__id__": "ExperimentList", "experiment": [{"goniometer": 0}], "goniometer": [multi_axis_goniometer_dict()]}
    )[0].goniometer
    chi_axis = np.array([math.cos(0.5), 0, math.sin(0.5)])
    assert np.abs(gonio.fixed_rotation - Rx(math.radians(10))).max() < 1e-15
    assert np.abs(gonio.setting_rotation - geometry.rotation_matrix(chi_axis, math.radians(-25))).max() < 1e-15
    assert np.abs(gonio.axis - [0, 1, 0]).max() == 0


def test_parallax_pixel_to_mm_inverts_dxtbx_mm_to_pixel():
    fast, slow, origin = np.array([1.0, 0, 0]), np.array([0, -1.0, 0]), np.array([-100.0, 100.0, -150.0])
    xy_mm = np.array([[10.0, 20.0], [150.0, 180.0], [99.5, 3.25]])
    px = geometry.millimetre_to_pixel(xy_mm, (0.172, 0.172), origin, fast, slow, 3.96, 0.45, True)
    back = geometry.pixel_to_millimetre(px, (0.172, 0.172), origin, fast, slow, 3.96, 0.45, True)
    # dxtbx's inverse is approximate at second order in the attenuation length
    assert np.abs(back - xy_mm).max() < 1e-4
    # the correction itself is real: tens of microns at these angles
    simple = px * 0.172
    assert np.abs(simple - xy_mm).max() > 0.01


@pytest.fixture(scope="module")
def rotation():
    document, table = simulate_rotation()
    experiments = experiments_from_dict(document)
    columns = {name: table.get(name) for name in table.keys()}
    return experiments, table, columns


def test_simulated_rotation_is_exact(rotation):
    experiments, table, columns = rotation
    experiment = experiments[0]
    assert not np.allclose(experiment.goniometer.fixed_rotation, np.eye(3))
    assert not np.allclose(experiment.goniometer.setting_rotation, np.eye(3))
    assert all(p.parallax for p in experiment.detector.panels)
    result = compute_q(experiments, columns, table.identifiers)
    used = result.used
    assert used.sum() > 1000 and set(columns["panel"][used]) == {0, 1, 2, 3}
    assert max_norm(result.q_bragg[used], result.q_pixel[used]) <= 1e-12
    assert max_norm(result.q_bragg[used], result.q_pred[used]) <= 1e-12


def test_observed_px_goes_through_the_parallax_mapping(rotation):
    experiments, table, columns = rotation
    mm = compute_q(experiments, columns, table.identifiers, Options(q_pixel_source="observed"))
    px = compute_q(experiments, columns, table.identifiers, Options(q_pixel_source="observed_px"))
    used = mm.used
    # xyzobs.px was written with dxtbx's mm->px; reading it back agrees to the
    # accuracy of dxtbx's approximate inverse (< 1e-4 mm, i.e. ~1e-7 Å⁻¹)
    assert max_norm(mm.q_pixel[used], px.q_pixel[used]) < 5e-7
    assert max_norm(mm.q_pixel[used], mm.q_bragg[used]) > 1e-5  # observed noise is seen


def test_simulated_stills_delta_psi():
    document, table = simulate_stills()
    experiments = experiments_from_dict(document)
    columns = {name: table.get(name) for name in table.keys()}
    result = compute_q(experiments, columns, table.identifiers)
    used = result.used
    assert max_norm(result.q_pixel[used], result.q_pred[used]) <= 1e-12
    q = np.linalg.norm(result.q_bragg[used], axis=1)
    expected = 2 * q * np.abs(np.sin(columns["delpsical.rad"][used] / 2))
    assert np.abs(np.linalg.norm(result.q_bragg[used] - result.q_pred[used], axis=1) - expected).max() <= 1e-12


def test_parallax_corrected_pixel_to_q_by_hand():
    """One panel facing the beam at 100 mm; spot at pixel (600, 0) on the fast axis.

    dxtbx: the ray to the uncorrected point has cos t = 100 / L; the photon is
    absorbed at depth o = 1/μ - (t0/cos t + 1/μ) exp(-μ t0 / cos t); the mm
    position moves back along the panel by (ray · fast) · o.
    """
    mu, t0, pixel = 3.96, 0.45, 0.172
    x_simple = 600 * pixel
    length = math.hypot(x_simple, 100.0)
    cos_t = 100.0 / length
    depth = 1 / mu - (t0 / cos_t + 1 / mu) * math.exp(-mu * t0 / cos_t)
    x_mm = x_simple - (x_simple / length) * depth
    k = 1 / 0.9
    q_expected = np.array([[x_mm, 0.0, -100.0]]) / math.hypot(x_mm, 100.0) * k - [0, 0, -k]

    panel = Panel("p", np.array([0.0, 0, -100.0]), np.array([1.0, 0, 0]), np.array([0, 1.0, 0]),
                  np.array([pixel, pixel]), np.array([1000, 1000]), thickness=t0, mu=mu, parallax=True)
    experiment = Experiment("", Beam(np.array([0, 0, -k]), 0.9), Detector([panel]), crystal=Crystal(np.eye(3)))
    columns = {
        "id": np.array([0]),
        "miller_index": np.array([[1, 0, 0]]),
        "panel": np.array([0]),
        "s1": np.array([[0.0, 0, -k]]),
        "xyzcal.mm": np.array([[1.0, 1.0, 0.0]]),
        "xyzobs.px.value": np.array([[600.0, 0.0, 0.5]]),
    }
    result = compute_q(ExperimentList([experiment]), columns, {}, Options(q_pixel_source="observed_px"))
    assert max_norm(result.q_pixel, q_expected) <= 1e-12
    assert depth > 0.1  # the correction is large enough to matter here


def test_wrap_angle_is_numpys_mod_bit_for_bit():
    """The wrap takes a turn off or adds one where np.mod does, and calls it elsewhere."""
    turn = 2 * np.pi
    edges = [0.0, -0.0, np.pi, -np.pi, turn, -turn, 3 * np.pi, -3 * np.pi, np.nextafter(np.pi, 0),
             np.nextafter(-np.pi, 0), 5 * np.pi, -7 * np.pi, 1e6, np.nan, np.inf, -np.inf]
    angles = np.concatenate([np.random.default_rng(7).uniform(-4 * turn, 4 * turn, 100_000), edges])
    with np.errstate(invalid="ignore"):
        expected = np.mod(angles + np.pi, turn) - np.pi
        assert geometry.wrap_angle(angles).tobytes() == expected.tobytes()
    assert geometry.wrap_angle(np.array([np.pi]))[0] == -np.pi  # [-π, π)


@pytest.mark.parametrize("static", [True, False])
def test_ewald_rotation_puts_the_point_on_the_sphere_and_matches_the_stacked_form(static):
    """Both angles put R(axis, δ)·r on the sphere |s0 + q| = |s0|; the component
    form gives the bits of the einsum form on stacked vectors."""
    rng = np.random.default_rng(8)
    n = 5000
    r = rng.normal(size=(n, 3)) * 0.2
    if static:
        axis, s0 = np.broadcast_to([1.0, 0.01, 0.02], (n, 3)), np.broadcast_to([0.003, 0.001, -1.01], (n, 3))
    else:
        axis, s0 = rng.normal(size=(n, 3)), geometry.unit(rng.normal(size=(n, 3))) * 1.01
    pair = geometry.ewald_rotation_angles(r, axis, s0)
    reach = np.isfinite(pair[:, 0])
    assert 0.2 < reach.mean() < 1.0  # some rows in the blind region, most not
    for k in range(2):
        q = geometry.rotate_about_axes(r[reach], axis[reach], pair[reach, k])
        assert np.max(np.abs(geometry.norms(s0[reach] + q) - geometry.norms(s0[reach]))) < 1e-12
    e = geometry.unit(np.asarray(axis))
    along = geometry.rowdot(r, e)
    a = geometry.rowdot(r - along[:, None] * e, s0)
    b = geometry.rowdot(geometry.cross(e, r), s0)
    c = -0.5 * geometry.rowdot(r, r) - along * geometry.rowdot(e, s0)
    with np.errstate(invalid="ignore"):
        spread = np.arccos(c / np.hypot(a, b))
    base = np.arctan2(b, a)
    assert pair.tobytes() == np.stack([base - spread, base + spread], axis=-1).tobytes()


@pytest.mark.parametrize("static", [True, False])
def test_axis_rotations_are_the_stacked_rodrigues_formula_bit_for_bit(static):
    """AxisRotations (sines and cosines once, a component at a time, one axis as
    scalars) gives the bits of v cos θ + (e × v) sin θ + e (e·v)(1 − cos θ) on
    stacked vectors, whole or a block of rows at a time, and rotates as the
    rotation matrices do."""
    rng = np.random.default_rng(9)
    n = 4000
    v = rng.normal(size=(n, 3))
    angles = rng.uniform(-4, 4, n)
    axis = np.broadcast_to([0.3, -1.0, 0.2], (n, 3)) if static else rng.normal(size=(n, 3))
    e = geometry.unit(np.ascontiguousarray(axis))  # one unit axis per row, even when they are all one
    cos = np.cos(angles)[:, None]
    expected = v * cos + geometry.cross(e, v) * np.sin(angles)[:, None] + e * geometry.rowdot(e, v)[:, None] * (1 - cos)
    rotations = geometry.AxisRotations.of(axis, angles)
    assert rotations.apply(v).tobytes() == expected.tobytes()
    assert geometry.rotate_about_axes(v, axis, angles).tobytes() == expected.tobytes()
    blocks = [rotations.rows(slice(i, i + 333)).apply(v[i:i + 333]) for i in range(0, n, 333)]
    assert np.concatenate(blocks).tobytes() == expected.tobytes()
    matrices = np.stack([geometry.rotation_matrix(a, t) for a, t in zip(np.asarray(axis)[:50], angles[:50])])
    assert np.max(np.abs(np.einsum("nij,nj->ni", matrices, v[:50]) - expected[:50])) < 1e-14


def test_one_vector_if_same_only_when_every_row_has_the_bits():
    """Rows all of one vector become a broadcast of it; rows equal but not the
    same bits (0.0 and -0.0) stay as they are; rows of NaN (no axis) are one."""
    rows = np.tile([1.0, 0.0, -2.0], (5, 1))
    one = geometry.one_vector_if_same(rows)
    assert one.strides[0] == 0 and one.tobytes() == rows.tobytes()
    signed = rows.copy()
    signed[3, 1] = -0.0
    assert geometry.one_vector_if_same(signed) is signed
    different = rows.copy()
    different[4, 2] = np.nextafter(-2.0, 0)
    assert geometry.one_vector_if_same(different) is different
    assert geometry.one_vector_if_same(np.full((4, 3), np.nan)).strides[0] == 0
