"""dials.q_map: per-pixel q against analytic geometry, against dials.q_consistency's
q_pixel on the real files, fractional Miller indices against the integer ones, and
the HDF5 / .npz files the command writes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tracemalloc

import h5py
import numpy as np
import pytest

from conftest import BACKENDS, REAL_PAIRS, REPO_ROOT, run_core
from dials_qconsistency.core import geometry
from dials_qconsistency.command_line import q_map
from dials_qconsistency.io.expt import read_experiments
from dials_qconsistency.core.scan_varying import image_setting
from dials_qconsistency.model.experiment import Panel
from dials_qconsistency.core.pixel_map import MapSetting, QUANTITIES, panel_blocks, pixel_q, quantities_at

PAIRS = REAL_PAIRS
ALL = list(QUANTITIES)


def exact_pixels(panel, xy_mm):
    """The sub-pixel point that the panel's px -> mm mapping takes to ``xy_mm``
    (Newton-style iteration; dxtbx's own mm -> px is only approximate with parallax)."""
    args = (panel.pixel_size, panel.origin, panel.fast, panel.slow, panel.mu, panel.thickness, panel.parallax)
    px = geometry.millimetre_to_pixel(xy_mm, *args)
    for _ in range(30):
        px = px + (xy_mm - geometry.pixel_to_millimetre(px, *args)) / panel.pixel_size
    assert np.abs(geometry.pixel_to_millimetre(px, *args) - xy_mm).max() < 1e-11
    return px


def map_at_reflections(experiments, columns, result):
    """The map function evaluated at each used reflection's xyzcal point (its own s0),
    a panel of an experiment at a time."""
    rows = np.flatnonzero(result.used)
    q = np.full((rows.size, 3), np.nan)
    keys = result.experiment[rows] * 10_000 + columns["panel"][rows].astype(np.int64)
    for key in np.unique(keys):
        mine = keys == key
        panel = experiments[int(key // 10_000)].detector.panels[int(key % 10_000)]
        x, y = exact_pixels(panel, columns["xyzcal.mm"][rows[mine], :2]).T
        q[mine] = np.stack(pixel_q(panel, result.s0[rows[mine]], x, y), axis=-1)
    return rows, q


# --- analytic geometry -------------------------------------------------------------


def test_flat_detector_normal_to_the_beam_matches_closed_forms():
    wavelength, distance, size = 0.8, 180.0, 0.1
    beam_x, beam_y = 14.15, 9.05  # beam centre in panel mm
    panel = Panel("flat", np.array([-beam_x, beam_y, -distance]), np.array([1.0, 0, 0]), np.array([0, -1.0, 0]),
                  np.array([size, size]), np.array([300, 200]))
    setting = MapSetting(np.array([0, 0, -1.0 / wavelength]))
    i, j = np.meshgrid(np.arange(300), np.arange(200))
    X = (i + 0.5) * size - beam_x
    Y = beam_y - (j + 0.5) * size
    r = np.hypot(X, Y)
    two_theta = np.arctan2(r, distance)
    maps = quantities_at(panel, setting, (np.arange(300) + 0.5)[None, :], (np.arange(200) + 0.5)[:, None], ALL[:-1])
    assert np.abs(maps["two_theta"] - np.degrees(two_theta)).max() < 1e-11
    assert np.abs(maps["q_norm"] - 2 * np.sin(two_theta / 2) / wavelength).max() < 1e-13
    with np.errstate(divide="ignore"):
        expected_d = wavelength / (2 * np.sin(two_theta / 2))
    off_beam = two_theta > 0
    assert np.abs(maps["d_spacing"][off_beam] - expected_d[off_beam]).max() < 1e-9
    assert np.isinf(maps["d_spacing"][~off_beam]).all()
    assert np.abs(maps["azimuth"] - np.degrees(np.arctan2(Y, X))).max() < 1e-9
    length = np.sqrt(r**2 + distance**2)
    expected_q = np.stack([X / length, Y / length, -distance / length + 1.0], axis=-1) / wavelength
    assert np.abs(maps["q"] - expected_q).max() < 1e-14
    # the direct beam hits pixel (141, 90) at (0.5, 0.5) of it: |q| there is zero to rounding
    assert maps["q_norm"][90, 141] < 1e-15 and maps["two_theta"].min() < 1e-12


def test_tilted_panel_and_tilted_beam_against_a_second_way():
    """q, 2θ and the azimuth's reference plane from explicit vectors (d-matrix, s1 − s0)."""
    fast = geometry.rotation_matrix([0, 1, 0], 0.3) @ np.array([1.0, 0, 0])
    slow = geometry.rotation_matrix([1, 0, 0], -0.2) @ np.array([0, -1.0, 0])
    origin = np.array([-40.0, 35.0, -150.0])
    panel = Panel("tilted", origin, fast, slow, np.array([0.172, 0.172]), np.array([487, 195]))
    direction = geometry.unit(np.array([0.01, -0.02, 1.0]))
    wavelength = 1.3
    s0 = -direction / wavelength
    x = (np.arange(0, 487, 7) + 0.5)[None, :]
    y = (np.arange(0, 195, 5) + 0.5)[:, None]
    maps = quantities_at(panel, MapSetting(s0), x, y, ALL[:-1])
    d = np.column_stack([fast, slow, origin])
    grid = np.stack(np.broadcast_arrays(x * 0.172, y * 0.172, np.ones((1, 1))), axis=-1)
    lab = grid @ d.T
    s1 = lab / np.linalg.norm(lab, axis=-1, keepdims=True) / wavelength
    assert np.abs(maps["q"] - (s1 - s0)).max() < 1e-14
    cos_2theta = (s1 @ s0) * wavelength**2
    assert np.abs(maps["two_theta"] - np.degrees(np.arccos(cos_2theta))).max() < 1e-9
    # azimuth 0 is the half-plane of lab x and the beam; ±90° the half-planes normal to it
    e_x, e_y = MapSetting(s0).azimuth_basis()
    assert abs(e_x @ direction) < 1e-15 and abs(e_x @ [0, 1, 0]) < 0.03 and e_x[0] > 0.99
    assert np.allclose(np.cross(e_x, e_y), direction)
    az = np.radians(maps["azimuth"])
    perpendicular = maps["q"] - (maps["q"] @ direction)[..., None] * direction
    rebuilt = np.cos(az)[..., None] * e_x + np.sin(az)[..., None] * e_y
    assert np.abs(rebuilt * np.linalg.norm(perpendicular, axis=-1, keepdims=True) - perpendicular).max() < 1e-12


def test_blocks_threads_and_subsampling_do_not_change_a_value():
    panel = Panel("p", np.array([-30.0, 40.0, -120.0]), np.array([1.0, 0, 0]), np.array([0, -1.0, 0]),
                  np.array([0.075, 0.075]), np.array([333, 517]), thickness=0.32, mu=3.9, parallax=True)
    setting = MapSetting(np.array([0, 0, -1.0]), np.diag([0.02, 0.03, 0.05]))
    whole = quantities_at(panel, setting, (np.arange(333) + 0.5)[None, :], (np.arange(517) + 0.5)[:, None], ALL)
    for rows, workers, step in ((7, 2, 1), (517, 1, 1), (10, 2, 3)):
        for name in ALL:
            stitched = np.concatenate(
                [b[name] for _, _, b in panel_blocks(panel, setting, [name], step, rows, np.float64, workers)]
            )
            assert np.array_equal(stitched, whole[name][::step, ::step]), (name, rows, workers, step)


def test_memory_stays_near_one_block_not_the_panel(tmp_path):
    """numpy reports its buffers to tracemalloc: the peak while writing a 112 MB
    (float32) map in 64-row blocks stays at the float64 working set of one block
    (a few tens of arrays of 64 × 2000 values), far below the map."""
    panel = Panel("big", np.array([-100.0, 100.0, -200.0]), np.array([1.0, 0, 0]), np.array([0, -1.0, 0]),
                  np.array([0.1, 0.1]), np.array([2000, 2000]))
    full_map_bytes = 2000 * 2000 * 4 * (3 + 4)
    from dials_qconsistency.io.map_files import NpzMapWriter

    tracemalloc.start()
    try:
        writer = NpzMapWriter(str(tmp_path / "m.npz"), {})
        names = ALL[:-1]
        shapes = {n: ((2000, 2000) + ((3,) if n == "q" else ()), np.float32, "", "") for n in names}
        writer.begin_panel("p", {}, shapes, {})
        for start, stop, arrays in panel_blocks(panel, MapSetting(np.array([0, 0, -1.0])), names, 1, 64, np.float32, 1):
            writer.write_rows(start, stop, arrays)
        writer.end_panel()
        writer.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_block_array = 64 * 2000 * 8
    assert peak < 25 * one_block_array and peak < full_map_bytes / 5, (peak, full_map_bytes)
    with np.load(tmp_path / "m.npz") as stored:
        assert stored["p/q"].shape == (2000, 2000, 3) and stored["p/q_norm"].dtype == np.float32


# --- the real files ------------------------------------------------------------------


@pytest.mark.parametrize("folder,name", PAIRS)
def test_map_at_each_reflection_equals_q_pixel(shared, folder, name):
    """The map function at each reflection's xyzcal point is q_consistency's q_pixel."""
    experiments, table, columns, result = run_core(shared(folder, name + ".expt"), shared(folder, name + ".refl"))
    rows, q = map_at_reflections(experiments, columns, result)
    assert rows.size > 300
    assert np.abs(q - result.q_pixel[rows]).max() <= 1e-9
    # without parallax, DIALS' own xyzcal.px is that point too
    panels = [experiments[int(result.experiment[r])].detector.panels[int(columns["panel"][r])] for r in rows]
    simple = np.array([not panel.parallax for panel in panels])
    if simple.any() and "xyzcal.px" in columns:
        q_px = np.array([
            pixel_q(panel, result.s0[r], columns["xyzcal.px"][r, 0], columns["xyzcal.px"][r, 1])
            for panel, r in zip(np.array(panels, dtype=object)[simple], rows[simple])
        ])
        assert np.abs(q_px - result.q_pixel[rows[simple]]).max() <= 1e-9


def test_stills_fractional_indices_are_off_by_exactly_delta_psi(shared):
    """Stills: h = A⁻¹·q at the predicted spot; DIALS rotated A·h by delpsical.rad
    onto the sphere, so |A·(h_frac − h)| = 2|A·h| sin(|Δψ|/2)."""
    experiments, table, columns, result = run_core(
        shared("ssx_CuNiR_test_data", "indexed.expt"), shared("ssx_CuNiR_test_data", "indexed.refl")
    )
    rows = np.flatnonzero(result.used)
    gaps, expected = [], []
    for row in rows:
        experiment = experiments[int(result.experiment[row])]
        M, s0, phi = image_setting(experiment)
        assert phi is None and np.array_equal(M, experiment.crystal.A)
        panel = experiment.detector.panels[int(columns["panel"][row])]
        x, y = exact_pixels(panel, columns["xyzcal.mm"][row, :2])
        h = quantities_at(panel, MapSetting(s0, M), np.array(x), np.array(y), ["miller_index"])["miller_index"]
        hkl = columns["miller_index"][row].astype(float)
        gaps.append(np.linalg.norm(M @ (h - hkl)))
        expected.append(2 * np.linalg.norm(M @ hkl) * abs(math.sin(columns["delpsical.rad"][row] / 2)))
    gaps, expected = np.array(gaps), np.array(expected)
    assert expected.max() > 1e-4  # a real test: the spots are off the sphere by up to this
    assert np.abs(gaps - expected).max() < 1e-9


def test_rotation_fractional_indices_follow_the_rotation_from_the_image_centre(shared):
    """Static rotation model: M(φc)⁻¹·M(φ) = (F·A)⁻¹·R(φ − φc)·(F·A), so h_frac − h
    rotates F·A·h by φ − φc about the axis: |F·A·(h_frac − h)| = 2|r⊥| sin(|φ − φc|/2)."""
    experiments, table, columns, result = run_core(
        shared("dials_current", "centroid_refined.expt"), shared("dials_current", "centroid_refined.refl")
    )
    experiment = experiments[0]
    scan, gonio = experiment.scan, experiment.goniometer
    FA = gonio.fixed_rotation @ experiment.crystal.A
    axis = geometry.unit(gonio.axis)
    gaps, expected = [], []
    for row in np.flatnonzero(result.used):
        phi = columns["xyzcal.mm"][row, 2]
        image = int(np.floor(scan.array_index_from_angle(phi))) + 1
        image = min(max(image, scan.image_range[0]), scan.image_range[1])
        M, s0, phi_c = image_setting(experiment, image)
        assert scan.angle_from_array_index(image - 0.5) == pytest.approx(phi_c, abs=1e-15)
        panel = experiment.detector.panels[int(columns["panel"][row])]
        x, y = exact_pixels(panel, columns["xyzcal.mm"][row, :2])
        h = quantities_at(panel, MapSetting(s0, M), np.array(x), np.array(y), ["miller_index"])["miller_index"]
        r = FA @ columns["miller_index"][row]
        r_perpendicular = r - (r @ axis) * axis
        gaps.append(np.linalg.norm(FA @ (h - columns["miller_index"][row])))
        expected.append(2 * np.linalg.norm(r_perpendicular) * abs(math.sin((phi - phi_c) / 2)))
    gaps, expected = np.array(gaps), np.array(expected)
    assert len(gaps) == 568 and expected.max() > 1e-3
    assert np.abs(gaps - expected).max() < 1e-9


def test_scan_varying_setting_at_an_image_from_the_raw_json(shared):
    """quartz: M at the centre of image 50 is the mean of S·R(φ)·F·A at its two
    boundaries, with A from the file's A_at_scan_points (parsed here, not by the reader)."""
    path = shared("quartz_processed", "refined.expt")
    raw = json.load(open(path))
    crystal, gonio = raw["crystal"][0], raw["goniometer"][0]
    A_points = np.array(crystal["A_at_scan_points"]).reshape(-1, 3, 3)
    start, width = (math.radians(v) for v in raw["scan"][0]["oscillation"])
    axis = np.array(gonio["rotation_axis"]) / np.linalg.norm(gonio["rotation_axis"])
    F, S = np.array(gonio["fixed_rotation"]).reshape(3, 3), np.array(gonio["setting_rotation"]).reshape(3, 3)

    def rodrigues(angle):
        K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K

    experiment = read_experiments(path)[0]
    for image in (1, 50, 100):
        M, s0, phi = image_setting(experiment, image)
        i = image - 1
        begin, end = start + i * width, start + (i + 1) * width
        expected = 0.5 * (S @ rodrigues(begin) @ F @ A_points[i] + S @ rodrigues(end) @ F @ A_points[i + 1])
        assert phi == pytest.approx(start + (i + 0.5) * width, abs=1e-15)
        assert np.abs(M - expected).max() < 1e-15
    with pytest.raises(ValueError, match="image 101 is outside the scan"):
        image_setting(experiment, 101)


# --- the command -----------------------------------------------------------------------


def run_map(*args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "dials_qconsistency.command_line.q_map", *map(str, args), "backend=standalone"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def test_command_writes_hdf5_and_npz_with_the_same_maps(shared, tmp_path):
    expt = shared("ssx_CuNiR_test_data", "indexed.expt")
    done = run_map(expt, "experiments=1", "subsample=16", "miller_indices=True", "output.npz=maps.npz", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["dials.q_map.log", "maps.npz", "q_map.h5"]
    assert "panel 0 (Panel, 2463 x 2527 px)" in (tmp_path / "dials.q_map.log").read_text()
    experiment = read_experiments(expt)[1]
    panel = experiment.detector.panels[0]
    x, y = (np.arange(0, 2463, 16) + 0.5), (np.arange(0, 2527, 16) + 0.5)
    reference = quantities_at(panel, MapSetting(experiment.beam.s0, experiment.crystal.A), x[None, :], y[:, None], ALL)
    with h5py.File(tmp_path / "q_map.h5", "r") as h5, np.load(tmp_path / "maps.npz") as npz:
        assert list(h5) == ["experiment_1"] and list(h5["experiment_1"]) == ["panel_0"]
        group = h5["experiment_1/panel_0"]
        assert h5["experiment_1"].attrs["identifier"] == experiment.identifier
        assert np.array_equal(group.attrs["origin"], panel.origin) and bool(group.attrs["parallax_corrected"])
        assert np.array_equal(group["x_px"][()], x) and np.array_equal(group["y_px"][()], y)
        metadata = json.loads(str(npz["metadata"]))
        for name, (units, per_pixel, _) in QUANTITIES.items():
            stored = group[name]
            assert stored.attrs["units"] == units and stored.dtype == np.float32
            assert stored.shape == (158, 154) + ((3,) if per_pixel == 3 else ())
            assert np.array_equal(stored[()], npz[f"experiment_1/panel_0/{name}"])
            assert metadata["datasets"][f"experiment_1/panel_0/{name}"]["units"] == units
            assert np.array_equal(stored[()], reference[name].astype(np.float32)), name
        assert metadata["groups"]["experiment_1"]["identifier"] == experiment.identifier


def test_float64_selected_panels_and_the_cspad_layout(shared, tmp_path, monkeypatch):
    """The standalone mapping, bit for bit (the native one: test_native_backend)."""
    monkeypatch.chdir(tmp_path)
    expt = shared("dials_current", "cspad_stills_refined.expt")
    assert q_map.run([expt, "experiments=3", "panels=0,63", "precision=float64", "rows_per_block=5", "mp.nthreads=2",
                      "backend=standalone"]) == 0
    experiment = read_experiments(expt)[3]
    with h5py.File("q_map.h5", "r") as h5:
        assert list(h5["experiment_3"]) == ["panel_0", "panel_63"]
        for index in (0, 63):
            panel = experiment.detector.panels[index]
            stored = h5[f"experiment_3/panel_{index}/q"][()]
            assert stored.dtype == np.float64 and stored.shape == (185, 194, 3)
            expected = quantities_at(panel, MapSetting(experiment.beam.s0), (np.arange(194) + 0.5)[None, :],
                                     (np.arange(185) + 0.5)[:, None], ["q"])["q"]
            assert np.array_equal(stored, expected)
            assert h5[f"experiment_3/panel_{index}"].attrs["name"] == panel.name


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("args,message", [
    (("quartz_processed/refined.expt", "image=101"), "experiment 0: image 101 is outside the scan (images 1 to 100)"),
    (("quartz_processed/refined.expt", "panels=1"), "panels=1 does not exist (there are 1)"),
    (("quartz_processed/refined.expt", "experiments=2"), "experiments=2 does not exist (there are 1)"),
    (("ssx_CuNiR_test_data/imported_with_ref_5.expt", "miller_indices=True"),
     "experiment 0 has no crystal, so miller_indices=True cannot be met"),
    (("ssx_CuNiR_test_data/indexed.expt", "image=3"),
     "experiment 0: image= is for rotation and time-of-flight data; a still has one setting"),
    (("quartz_processed/refined.expt", "panels=0,0"), "panels= names 0 twice (panels=0,0)"),
    (("ssx_CuNiR_test_data/indexed.expt", "experiments=1,3,1"), "experiments= names 1 twice (experiments=1,3,1)"),
    (("quartz_processed/refined.expt", "output.hdf5=None"), "nothing to write: set output.hdf5 or output.npz"),
    (("quartz_processed/refined.expt", "quartz_processed/refined.refl"), "is not an experiment list (.expt)"),
    (("quartz_processed/refined.expt", "output.npz=quartz_processed/refined.expt"),
     "output.npz would overwrite the input file"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_choices_are_one_line_errors_and_write_nothing(shared, in_tmp, capsys, args, message, backend):
    argv = [shared(a) if a.startswith(("quartz", "ssx")) else a.replace("=quartz", "=" + shared("quartz")) for a in args]
    argv.append(f"backend={backend}")
    assert q_map.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dials.q_map: error: ") and message in err, err
    if "=None" not in args[-1] and "nothing" not in message and "overwrite" not in message and ".refl" not in args[-1]:
        assert "refined.expt" in err or "imported_with_ref_5.expt" in err or "indexed.expt" in err
    assert os.listdir(in_tmp) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failure_while_writing_leaves_nothing(shared, in_tmp, monkeypatch, capsys, backend):
    from dials_qconsistency.io.map_files import NpzMapWriter

    def full_disk(self, start, stop, arrays):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(NpzMapWriter, "write_rows", full_disk)
    assert q_map.main([shared("quartz_processed", "refined.expt"), "output.npz=m.npz", f"backend={backend}"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "q_map.h5 and m.npz" in err
    assert os.listdir(in_tmp) == ["dials.q_map.log"]
    assert "Error:" in (in_tmp / "dials.q_map.log").read_text()


def test_ctrl_c_while_writing_leaves_the_log_saying_so(shared, in_tmp, monkeypatch, capsys):
    """An interrupted map leaves no map, and a log that says none was written."""
    from dials_qconsistency.io.map_files import NpzMapWriter

    def interrupted(self, start, stop, arrays):
        raise KeyboardInterrupt

    monkeypatch.setattr(NpzMapWriter, "write_rows", interrupted)
    assert q_map.main([shared("quartz_processed", "refined.expt"), "output.npz=m.npz", "backend=standalone"]) == 130
    assert capsys.readouterr().err == "dials.q_map: interrupted (outputs are all written or none)\n"
    assert os.listdir(in_tmp) == ["dials.q_map.log"]
    assert (in_tmp / "dials.q_map.log").read_text().endswith(
        "\nInterrupted by Ctrl-C (SIGINT): none of the outputs was written (files of their names are an earlier "
        "run's, not this log's)\n")


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_experiment_list_is_an_error(shared, tmp_path_factory, in_tmp, capsys, backend):
    empty = tmp_path_factory.mktemp("input") / "empty.expt"
    document = json.load(open(shared("quartz_processed", "refined.expt")))
    empty.write_text(json.dumps(dict(document, experiment=[])))
    assert q_map.main([str(empty), f"backend={backend}"]) == 1
    assert capsys.readouterr().err == (
        f"dials.q_map: error: {empty}: the experiment list is empty: there is nothing to map\n")
    assert os.listdir(in_tmp) == []


@pytest.mark.parametrize("output, free_blocks, needed", [
    ("output.hdf5=q_map.h5", 1000, 1),  # 4.1 MB free
    ("output.npz=q_map.npz", 50_000, 2),  # 204.8 MB free: the .npz's panel is also held in scratch files
])
def test_maps_larger_than_the_room_left_are_refused_before_any_file(shared, in_tmp, capsys, monkeypatch, output,
                                                                    free_blocks, needed):
    """The PILATUS 6M's five float32 maps (q is three) take 2463 x 2527 x 7 x 4
    bytes; the .npz writer holds a panel's arrays in scratch files beside the
    zip until they are copied in, twice that. A file system with less free is
    told so before anything is written."""
    size = 2463 * 2527 * 7 * 4
    real = os.statvfs

    def nearly_full(path):
        status = real(path)
        return os.statvfs_result((status.f_bsize, 4096, status.f_blocks, free_blocks, free_blocks) + tuple(status)[5:])

    monkeypatch.setattr(os, "statvfs", nearly_full)
    argv = [shared("dials_current", "centroid_refined.expt"), output, "backend=standalone"]
    if "npz" in output:
        argv.append("output.hdf5=None")
    assert q_map.main(argv) == 1
    target = output.split("=")[1]
    assert capsys.readouterr().err == (
        f"dials.q_map: error: {target}: cannot be written: the maps need about {needed * size / 1e6:.1f} MB of disk "
        f"and {in_tmp} has {free_blocks * 4096 / 1e6:.1f} MB free; map less with experiments=, panels= or subsample=\n")
    assert os.listdir(in_tmp) == []


def _q_map_process(args, cwd, file_size_limit, check_room=True):
    """dials.q_map as the installed command, with a file-size limit (ulimit -f);
    ``check_room=False`` skips its check of the maps' size first."""
    import resource

    code = ("import sys\nfrom dials_qconsistency.command_line import q_map\n"
            + ("" if check_room else "q_map.check_room = lambda params, size: None\n")
            + f"sys.argv = ['dials.q_map'] + {list(args)!r}\nq_map.console()\n")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO_ROOT),
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit,) * 2))


def test_maps_beyond_the_file_size_limit_are_refused_before_any_file(shared, tmp_path):
    done = _q_map_process([shared("dials_current", "centroid_refined.expt"), "backend=standalone"], tmp_path,
                          20_000_000)
    assert done.returncode == 1
    size = 2463 * 2527 * 7 * 4  # the PILATUS 6M's five float32 maps, q of three
    assert done.stderr == (f"dials.q_map: error: q_map.h5: cannot be written: the maps take about {size / 1e6:.1f} MB, "
                           "more than the file-size limit (ulimit -f) of 20.0 MB; map less with experiments=, panels= "
                           "or subsample=\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_write_that_fails_half_way_ends_with_one_line(shared, tmp_path, backend):
    """Past the check (a disk filled by another process meanwhile; here a
    file-size limit the check is told to ignore) libhdf5 fails half-way. The
    system's words, status 1, only the log; Debian's libhdf5 1.10 (inside
    DIALS) crashed the process afterwards, freeing the abandoned file."""
    done = _q_map_process([shared("dials_current", "centroid_refined.expt"), "output.npz=m.npz", f"backend={backend}"],
                          tmp_path, 20_000_000, check_room=False)
    assert done.returncode == 1, done.stderr[-500:]
    assert done.stderr.endswith("dials.q_map: error: q_map.h5 and m.npz: cannot be written (File too large)\n")
    assert os.listdir(tmp_path) == ["dials.q_map.log"]
    assert (tmp_path / "dials.q_map.log").read_text().endswith(
        "\nError: q_map.h5 and m.npz: cannot be written (File too large)\n")


@pytest.mark.parametrize("backend", BACKENDS)
def test_experiments_sharing_detector_and_beam_share_their_maps(shared, in_tmp, backend):
    """The five CuNiR stills share one detector and one beam: the HDF5 file holds
    their q, d, 2θ and azimuth maps once (the other experiments' are hard links
    to them) and each its own Miller indices, h = A⁻¹·q with its own crystal;
    the .npz holds a copy each, the same numbers."""
    expt = shared("ssx_CuNiR_test_data", "indexed.expt")
    assert q_map.main([expt, "miller_indices=True", "subsample=16", "output.npz=m.npz", f"backend={backend}"]) == 0
    experiments = read_experiments(expt)
    npz = np.load("m.npz")
    with h5py.File("q_map.h5", "r") as f:
        first = f["experiment_0/panel_0"]
        q = first["q"][()]
        pixels = q.shape[0] * q.shape[1]
        for k in range(1, 5):
            group = f[f"experiment_{k}/panel_0"]
            assert group.attrs["same_maps_as"] == "experiment_0/panel_0"
            for name in ("q", "q_norm", "d_spacing", "two_theta", "azimuth", "x_px", "y_px"):
                assert group[name] == first[name]  # one object in the file (a hard link), not a copy
                np.testing.assert_array_equal(npz[f"experiment_{k}/panel_0/{name}"], first[name][()])
            assert group["miller_index"] != first["miller_index"]
            inverse = np.linalg.inv(experiments[k].crystal.A)
            np.testing.assert_allclose(group["miller_index"][()], np.einsum("ij,yxj->yxi", inverse, q), atol=2e-4)
            np.testing.assert_array_equal(npz[f"experiment_{k}/panel_0/miller_index"], group["miller_index"][()])
    # the maps once (3 + 1 + 1 + 1 + 1 float32 per pixel) and five sets of Miller indices (3 each)
    arrays = pixels * 4 * (7 + 5 * 3)
    assert arrays < os.path.getsize("q_map.h5") < arrays + 200_000
    log = open("dials.q_map.log").read()
    assert log.count("(the same maps as experiment_0/panel_0)") == 4
