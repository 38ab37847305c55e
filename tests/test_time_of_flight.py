"""Neutron time-of-flight Laue data (ISIS SXD, NaCl; ../shared/data/tof_sxd_nacl):
a polychromatic beam, one wavelength per reflection.

References computed here, independently of the program: q_bragg = S·F·A·h from
the .expt's real-space axes (A = inverse of the matrix with rows a, b, c),
q_pred = s1 − s0_cal from the table's own columns (decoded with msgpack), and
s0_i = −unit(direction)/wavelength_cal.
"""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest

from dials_qconsistency.core.q_vectors import NOT_INDEXED, REASONS, USED, Options, compute_q
from conftest import BACKENDS, joined_pairs

SXD = ("tof_sxd_nacl", "sxd_refined")


def raw_table(path):
    obj = msgpack.unpackb(open(path, "rb").read(), raw=False, strict_map_key=False)
    data, n = obj[2]["data"], obj[2]["nrows"]
    dtypes = {"double": ("<f8", ()), "vec3<double>": ("<f8", (3,)), "int": ("<i4", ()),
              "cctbx::miller::index<>": ("<i4", (3,))}

    def column(name):
        dtype, shape = dtypes[data[name][0]]
        return np.frombuffer(data[name][1][1], dtype=dtype).reshape((n,) + shape)

    return column


@pytest.fixture
def sxd(shared):
    expt, refl = shared(SXD[0], SXD[1] + ".expt"), shared(SXD[0], SXD[1] + ".refl")
    return expt, refl


def reference(expt, refl):
    document = json.load(open(expt))
    crystal, beam, gonio = document["crystal"][0], document["beam"][0], document["goniometer"][0]
    A = np.linalg.inv(np.array([crystal["real_space_a"], crystal["real_space_b"], crystal["real_space_c"]]))
    S = np.array(gonio["setting_rotation"]).reshape(3, 3)
    F = np.array(gonio["fixed_rotation"]).reshape(3, 3)
    column = raw_table(refl)
    ids, hkl = column("id"), column("miller_index").astype(float)
    indexed = ids >= 0
    q_bragg = (S @ F @ A @ hkl.T).T
    direction = np.array(beam["direction"]) / np.linalg.norm(beam["direction"])
    with np.errstate(divide="ignore", invalid="ignore"):  # unindexed rows hold wavelength_cal = 0
        s0 = -direction / column("wavelength_cal")[:, None]
    return indexed, q_bragg, column("s1") - column("s0_cal"), s0, column("s0_cal")


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_vectors_of_every_indexed_row_against_dials_own_prediction(sxd, backend):
    """Over the 455 indexed rows: q_bragg and q_pixel(xyzcal) equal the table's
    s1 − s0_cal to ≤ 1e-9 Å⁻¹ (in practice ~1e-15), q_bragg equals S·F·A·h and
    s0 equals −unit(direction)/wavelength_cal; the 52 unindexed rows (zeros in
    wavelength_cal) are counted and left out."""
    from dials_qconsistency.io import backends

    expt, refl = sxd
    experiments, table = backends.read_pair(backends.get(backend), expt, refl)
    assert experiments[0].kind == "tof" and experiments[0].beam.sample_to_source_distance == 8300.0
    assert experiments[0].scan.time_of_flight.size == 1821 and not experiments[0].is_rotation
    result = compute_q(experiments, table.columns(), table.identifiers, Options())
    indexed, q_bragg, q_pred, s0, s0_cal = reference(expt, refl)
    used = result.used
    assert used.sum() == 455 == indexed.sum() and np.sum(result.reason == NOT_INDEXED) == 52
    assert np.array_equal(used, indexed) and set(np.unique(result.reason)) == {USED, NOT_INDEXED}
    largest = lambda a, b: float(np.max(np.linalg.norm(a[used] - b[used], axis=1)))
    assert largest(result.q_bragg, q_pred) <= 1e-9 and largest(result.q_pixel_calculated, q_pred) <= 1e-9
    assert largest(result.q_pred, q_pred) <= 1e-15
    assert largest(result.q_bragg, q_bragg) <= 1e-12
    assert largest(result.s0, s0) <= 1e-15 and largest(result.s0, s0_cal) <= 1e-12
    assert np.all(np.isnan(result.q_bragg[~used]))
    assert REASONS[NOT_INDEXED].startswith("not indexed")


@pytest.mark.dials
def test_both_backends_agree_to_1e_12(sxd):
    from dials_qconsistency.io import backends

    expt, refl = sxd
    results = []
    for name in ("standalone", "native"):
        experiments, table = backends.read_pair(backends.get(name), expt, refl)
        for source in ("calculated", "observed"):
            results.append(compute_q(experiments, table.columns(), table.identifiers, Options(q_pixel_source=source)))
    for a, b in ((results[0], results[2]), (results[1], results[3])):
        for field in ("q_bragg", "q_pixel", "q_pred", "s0"):
            x, y = getattr(a, field)[a.used], getattr(b, field)[b.used]
            assert np.max(np.abs(x - y)) <= 1e-12, field


def test_the_command_calls_the_refined_model_consistent_and_says_what_it_checked(sxd, tmp_path, monkeypatch):
    from dials_qconsistency.command_line.q_consistency import main

    expt, refl = sxd
    monkeypatch.chdir(tmp_path)
    assert main([expt, refl, "output.json=qc.json", "rows=indexed", "fail_if.inconsistent=True",
                 "backend=standalone"]) == 0
    report = json.load(open("qc.json"))
    assert report["verdict"]["consistent"] is True
    assert report["verdict"]["checks"]["rms_delta_q_laue"] <= 1e-9
    (experiment,) = report["per_experiment"]
    assert experiment["kind"] == "tof" and experiment["s1"].startswith("prediction")
    assert experiment["max_q_bragg_vs_q_pred"] <= 1e-9 and experiment["max_q_pixel_calculated_vs_q_pred"] <= 1e-9
    log = open("dials.q_consistency.log").read()
    assert "Laue data |q_bragg - q_pixel| at the calculated positions RMS" in log and "expt 0 (tof)" in log
    assert "the table's s0_cal agrees to 0 1/Angstrom (as it should)" in log


def test_q_map_of_a_time_of_flight_bin_at_each_spot_is_dials_prediction(sxd):
    """dials.q_map's per-pixel wavelength for a time-of-flight bin (λ = t / (L0 +
    |pixel|)·h/m_n): at each indexed spot's xyzcal.px, with the spot's own
    calculated time (xyzcal.mm z), q equals the table's s1 − s0_cal, and 2θ the
    angle between s1 and s0_cal."""
    from dials_qconsistency.core.pixel_map import MapSetting, quantities_at
    from dials_qconsistency.io.expt import read_experiments

    expt, refl = sxd
    experiment = read_experiments(expt)[0]
    column = raw_table(refl)
    indexed = np.flatnonzero(column("id") >= 0)[::9]  # 51 spots on several panels
    obj = msgpack.unpackb(open(refl, "rb").read(), raw=False, strict_map_key=False)
    panel_of = np.frombuffer(obj[2]["data"]["panel"][1][1], dtype="<u8")
    xyz_px, xyz_mm = column("xyzcal.px"), column("xyzcal.mm")
    q_pred, s1, s0_cal = column("s1") - column("s0_cal"), column("s1"), column("s0_cal")
    assert len(set(panel_of[indexed])) >= 5
    for row in indexed:
        setting = MapSetting(experiment.beam.unit_s0, None, float(xyz_mm[row, 2]),
                             experiment.beam.sample_to_source_distance)
        values = quantities_at(experiment.detector.panels[int(panel_of[row])], setting,
                               np.array([xyz_px[row, 0]]), np.array([xyz_px[row, 1]]), ["q", "two_theta"])
        assert np.abs(values["q"][0] - q_pred[row]).max() <= 1e-9
        cosine = s1[row] @ s0_cal[row] / np.linalg.norm(s1[row]) / np.linalg.norm(s0_cal[row])
        assert abs(values["two_theta"][0] - np.degrees(np.arccos(cosine))) <= 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_q_map_of_a_polychromatic_beam(sxd, tmp_path, monkeypatch, backend):
    """Without a wavelength only 2θ and the azimuth (which do not depend on it);
    with wavelength= every quantity; Miller indices need one of them."""
    import h5py

    from dials_qconsistency.command_line import q_map
    from dials_qconsistency.errors import QConsistencyError

    expt, _ = sxd
    monkeypatch.chdir(tmp_path)
    assert q_map.run([expt, "panels=0", "output.hdf5=a.h5", f"backend={backend}"]) == 0
    assert sorted(h5py.File("a.h5")["experiment_0/panel_0"]) == ["azimuth", "two_theta", "x_px", "y_px"]
    assert q_map.run([expt, "panels=0", "wavelength=1.5", "miller_indices=True", "output.hdf5=b.h5",
                      f"backend={backend}"]) == 0
    group = h5py.File("b.h5")["experiment_0/panel_0"]
    assert np.allclose(h5py.File("a.h5")["experiment_0/panel_0/two_theta"][()], group["two_theta"][()], atol=1e-4)
    q = group["q"][()].astype(float)
    assert np.allclose(np.linalg.norm(q, axis=-1), 2 * np.sin(np.radians(group["two_theta"][()] / 2)) / 1.5, rtol=1e-5)
    with pytest.raises(QConsistencyError, match="no one wavelength; give wavelength= or image="):
        q_map.run([expt, "panels=0", "miller_indices=True", "output.hdf5=c.h5", f"backend={backend}"])


@pytest.mark.dials
def test_s1_made_from_the_observed_centroids_is_recognised(sxd, tmp_path, monkeypatch):
    """After dials.index alone the s1 column of time-of-flight data is the
    observed s1: towards the observed centroid, |s1| = 1/the observed wavelength.
    Such a table, made here with dxtbx's own lab coordinates and the table's
    observed wavelengths, is classified as observed (its s1 is not compared by
    length, which is another wavelength's), the refined one as a prediction."""
    from dials.array_family import flex

    from dials_qconsistency.command_line.q_consistency import main
    from dials_qconsistency.io import native

    expt, refl = sxd
    from dxtbx.model.experiment_list import ExperimentListFactory

    models = ExperimentListFactory.from_dict(native.models_only(json.load(open(expt))), check_format=False)
    table = flex.reflection_table.from_file(refl)
    detector = models[0].detector
    s1 = flex.vec3_double(len(table))
    x, y, _ = table["xyzobs.mm.value"].parts()
    for i in range(len(table)):
        lab = detector[int(table["panel"][i])].get_lab_coord((x[i], y[i]))
        length = (lab[0] ** 2 + lab[1] ** 2 + lab[2] ** 2) ** 0.5
        s1[i] = tuple(c / length / table["wavelength"][i] for c in lab)
    table["s1"] = s1
    observed_table = str(tmp_path / "indexed_like.refl")
    table.as_file(observed_table)
    monkeypatch.chdir(tmp_path)
    for path, kind in ((observed_table, "observed"), (refl, "prediction")):
        main([expt, path, "output.json=qc.json", "output.reflections=None", "output.html=None", "rows=indexed",
              "q_pixel.source=observed", "backend=standalone"])
        assert json.load(open("qc.json"))["per_experiment"][0]["s1"].startswith(kind), path


def _mistaken(document, kind):
    document = json.loads(json.dumps(document))
    if kind == "flight path 10 mm longer":
        document["beam"][0]["sample_to_source_distance"] += 10.0
    elif kind == "crystal turned -90 degrees about X":
        turn = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
        for crystal in document["crystal"]:
            for axis in ("real_space_a", "real_space_b", "real_space_c"):
                crystal[axis] = list(turn @ np.array(crystal[axis]))
    elif kind == "cell 1 % long":
        for crystal in document["crystal"]:
            for axis in ("real_space_a", "real_space_b", "real_space_c"):
                crystal[axis] = list(1.01 * np.array(crystal[axis]))
    elif kind == "detector moved 1 mm along the beam":
        direction = np.array(document["beam"][0]["direction"], dtype=float)
        root = document["detector"][0]["hierarchy"]
        root["origin"] = list(np.array(root["origin"]) + direction / np.linalg.norm(direction))
    return document


@pytest.mark.parametrize("kind, mistake, size_key, size", [
    ("flight path 10 mm longer", "flight_path", "flight_path_mm", 10.0),
    ("crystal turned -90 degrees about X", "lab_axis_rotation", "angle_deg", 90.0),
    ("detector moved 1 mm along the beam", "detector_distance", "distance_mm", -1.0),
    ("cell 1 % long", "cell_scale", "scale", 1.01),
])
def test_a_real_mistake_in_the_time_of_flight_model_is_named_with_its_size(sxd, tmp_path, monkeypatch, kind, mistake,
                                                                           size_key, size):
    """The SXD model with one mistake: inconsistent, the gate exits 2, and the
    diagnosis names it with its size. A flight path (L0) error does not move a
    spot: only the time of flight tells it (the model's wavelengths against the
    table's calculated times), and the time fit gives its length."""
    from dials_qconsistency.command_line.q_consistency import main

    expt, refl = sxd
    monkeypatch.chdir(tmp_path)
    json.dump(_mistaken(json.load(open(expt)), kind), open("mistaken.expt", "w"))
    assert main(["mistaken.expt", refl, "output.json=qc.json", "output.reflections=None", "output.html=None",
                 "fail_if.inconsistent=True", "backend=standalone"]) == 2
    report = json.load(open("qc.json"))
    assert report["verdict"]["consistent"] is False
    (finding,) = report["diagnosis"][0]["findings"]
    assert finding["mistake"] == mistake
    assert abs(abs(finding["size"][size_key]) - abs(size)) <= 0.01 * abs(size), finding["size"]
    if mistake == "flight_path":
        assert finding["size"][size_key] == pytest.approx(size, abs=0.01)
        assert report["verdict"]["checks"]["rms_wavelength_rel"] == pytest.approx(10.0 / 8550, rel=0.02)


def test_one_cell_scale_in_two_experiments_is_named_once(sxd, tmp_path, monkeypatch):
    """SXD twice in one list, both cells 1 % long, the second without the
    indexed rows of panels 0-5: both name a cell scale 1.01000, with other
    residuals; the pooled scope names it once for both (the residuals' sizes,
    compared as the mistake's, made it "diagnosed differently")."""
    from dials_qconsistency.command_line.q_consistency import main
    from dials_qconsistency.io.refl import ReflectionTable

    expt, refl = sxd
    fewer = ReflectionTable.from_file(refl)
    ids = fewer.get("id").copy()
    ids[fewer.get("panel") <= 5] = -1
    fewer.set_column("id", "int", ids)
    fewer.write(str(tmp_path / "fewer.refl"))

    def longer(document, offsets):
        for crystal in document["crystal"]:
            for axis in ("real_space_a", "real_space_b", "real_space_c"):
                crystal[axis] = list(1.01 * np.array(crystal[axis]))

    joined = joined_pairs(tmp_path, [(expt, refl), (expt, str(tmp_path / "fewer.refl"))], longer, unique_identifiers=True)
    monkeypatch.chdir(tmp_path)
    main([*joined, "output.json=qc.json", "output.reflections=None", "output.html=None", "backend=standalone"])
    pooled, *each = json.load(open("qc.json"))["diagnosis"]
    assert [f["mistake"] for d in each for f in d["findings"]] == ["cell_scale", "cell_scale"]
    assert each[0]["findings"][0]["size"]["rms_delta_q_before"] != each[1]["findings"][0]["size"]["rms_delta_q_before"]
    (finding,) = pooled["findings"]
    assert finding["mistake"] == "cell_scale" and finding["message"].startswith("every experiment: ")
    assert finding["size"]["scale"] == pytest.approx(1.01, abs=1e-4)


def test_a_wavelength_scale_is_told_from_a_flight_path_error(sxd, tmp_path, monkeypatch):
    """The table's calculated times all 0.1 % longer (a time calibration, or a
    conversion constant): the time error grows with each reflection's own path
    L0 + L1, not with the wavelength alone as a flight-path error does, and the
    exact calculated times tell the two apart: named a wavelength scale of
    0.999 (model / data), not a flight path."""
    from dials_qconsistency.command_line.q_consistency import main

    expt, refl = sxd
    obj = msgpack.unpackb(open(refl, "rb").read(), raw=False, strict_map_key=False)
    data, n = obj[2]["data"], obj[2]["nrows"]
    xyz = np.frombuffer(data["xyzcal.mm"][1][1], dtype="<f8").reshape(n, 3).copy()
    xyz[:, 2] *= 1.001
    data["xyzcal.mm"][1][1] = xyz.tobytes()
    monkeypatch.chdir(tmp_path)
    open("scaled.refl", "wb").write(msgpack.packb(obj, use_bin_type=True))
    assert main([expt, "scaled.refl", "output.json=qc.json", "output.reflections=None", "output.html=None",
                 "fail_if.inconsistent=True", "backend=standalone"]) == 2
    (finding,) = json.load(open("qc.json"))["diagnosis"][0]["findings"]
    assert finding["mistake"] == "wavelength_scale" and finding["size"]["wavelength_scale"] == pytest.approx(0.999, abs=1e-6)


def test_the_figures_gain_the_wavelength_axis(sxd, tmp_path, monkeypatch):
    """output.plots on time-of-flight data: every figure of stills, and
    vs_wavelength (|Δq| and the time-of-flight error against λ), no vs_image."""
    from dials_qconsistency.command_line.q_consistency import main

    expt, refl = sxd
    monkeypatch.chdir(tmp_path)
    assert main([expt, refl, "output.plots=figures/", "output.reflections=None", "output.html=None",
                 "q_pixel.source=observed", "backend=standalone"]) == 0
    names = sorted(p.stem for p in (tmp_path / "figures").iterdir())
    assert "vs_wavelength" in names and "vs_image" not in names and len(names) == 12
    assert (tmp_path / "figures" / "vs_wavelength.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_observed_pixel_positions_give_the_times_of_flight_too(sxd, tmp_path, monkeypatch):
    """q_pixel.source=observed_px: the frame z goes through the scan's
    time_of_flight (DIALS' frame -> time), so the wavelength and time errors are
    those of observed (mm) positions to well within the centroid's time
    uncertainty (~1 µs)."""
    from dials_qconsistency.core.decomposition import decompose
    from dials_qconsistency.core.pipeline import load_pair

    expt, refl = sxd
    parts = {}
    for source in ("observed", "observed_px"):
        pair = load_pair("standalone", expt, refl, Options(q_pixel_source=source), "indexed")
        parts[source] = decompose(pair.experiments, pair.result).tof_us[pair.result.used]
    assert np.isfinite(parts["observed_px"]).all()
    assert np.abs(parts["observed_px"] - parts["observed"]).max() < 0.05  # µs; the positions differ by parallax-free px->mm


def test_a_table_of_polychromatic_and_monochromatic_experiments(sxd, shared, tmp_path, monkeypatch):
    """The SXD pair and the centroid sweep in one .expt and .refl: each row is
    computed with its own beam (DIALS' own predictions reproduced for both), and
    the s0_cal note speaks of the polychromatic rows only."""
    from dials_qconsistency.command_line.q_consistency import main
    from dials_qconsistency.io.refl import ReflectionTable

    expt, refl = sxd
    other = shared("dials_current", "centroid_refined.expt"), shared("dials_current", "centroid_refined.refl")
    a, b = json.load(open(expt)), json.load(open(other[0]))
    combined = dict(a)
    for model in ("beam", "detector", "goniometer", "scan", "crystal"):
        combined[model] = a[model] + b[model]
    shift = {m: len(a[m]) for m in ("beam", "detector", "goniometer", "scan", "crystal")}
    second = [{**e, **{m: e[m] + shift[m] for m in shift if m in e}} for e in b["experiment"]]
    for e in second:
        e.pop("imageset", None)
    combined["experiment"] = [dict(a["experiment"][0], imageset=0)] + second
    monkeypatch.chdir(tmp_path)
    json.dump(combined, open("both.expt", "w"))
    first, then = ReflectionTable.from_file(refl), ReflectionTable.from_file(other[1])
    table = ReflectionTable(first.nrows + then.nrows, {0: a["experiment"][0]["identifier"],
                                                       1: b["experiment"][0]["identifier"]})
    for name in ("miller_index", "s1", "xyzcal.mm", "xyzobs.mm.value", "panel", "flags"):
        table.set_column(name, first.column_type(name), np.concatenate([first.get(name), then.get(name)]))
    ids = np.concatenate([first.get("id"), np.where(then.get("id") >= 0, 1, -1)]).astype(np.int32)
    table.set_column("id", "int", ids)
    for name, width in (("wavelength_cal", None), ("s0_cal", 3)):
        zeros = np.zeros((then.nrows,) + ((width,) if width else ()))
        table.set_column(name, first.column_type(name), np.concatenate([first.get(name), zeros]))
    table.write("both.refl")
    assert main(["both.expt", "both.refl", "output.json=qc.json", "output.reflections=None", "output.html=None",
                 "rows=indexed", "fail_if.inconsistent=True", "backend=standalone"]) == 0
    report = json.load(open("qc.json"))
    assert [e["kind"] for e in report["per_experiment"]] == ["tof", "rotation"]
    assert all(e["max_q_bragg_vs_q_pred"] <= 1e-9 for e in report["per_experiment"])
    assert any("the table's s0_cal agrees to 0 1/Angstrom" in note for note in report["notes"])


def test_a_laue_beam_without_a_flight_path(sxd, tmp_path, monkeypatch):
    """dxtbx's defaults for a polychromatic beam (no sample_to_source_distance,
    wavelength_range (0, 0)), as X-ray Laue data have them: read, q vectors as
    before, no time-of-flight parts."""
    from dials_qconsistency.command_line.q_consistency import main

    expt, refl = sxd
    document = json.load(open(expt))
    document["beam"][0].update(sample_to_source_distance=0.0, wavelength_range=[0.0, 0.0])
    monkeypatch.chdir(tmp_path)
    json.dump(document, open("laue.expt", "w"))
    assert main(["laue.expt", refl, "output.json=qc.json", "output.reflections=out.refl", "output.html=None",
                 "backend=standalone"]) == 0
    report = json.load(open("qc.json"))
    assert report["verdict"]["consistent"] is True and "rms_wavelength_rel" not in report["verdict"]["checks"]


def test_q_map_refuses_a_wavelength_it_would_ignore(sxd, shared, tmp_path, monkeypatch):
    """wavelength= with image= on a polychromatic beam, or on a monochromatic
    beam (which has its own), is a one-line error, not silently ignored."""
    from dials_qconsistency.command_line import q_map
    from dials_qconsistency.errors import QConsistencyError

    expt, _ = sxd
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QConsistencyError, match="give wavelength= or image= for a polychromatic beam, not both"):
        q_map.run([expt, "wavelength=1.5", "image=500", "output.hdf5=a.h5", "backend=standalone"])
    with pytest.raises(QConsistencyError, match="wavelength= is for polychromatic beams"):
        q_map.run([shared("dials_current", "centroid_refined.expt"), "wavelength=1.5", "output.hdf5=b.h5",
                   "backend=standalone"])
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "b.h5").exists()
