"""The verdict on real refined DIALS models: consistent as they are; inconsistent,
with the mistake named, once a real mistake is put into them; and the gate on
it (fail_if.inconsistent=True) exits with status 2.

The mistakes are made in the .expt documents, independently of the program:
the detector moved by 0.5 mm along the beam, every crystal turned by -90
degrees about the lab X axis, A in 2pi units (real-space axes / 2pi), and a
table paired with models it was not made with.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from dials_qconsistency.command_line.q_consistency import main
from dials_qconsistency.core.diagnosis import F_PARTIAL, MIN_EXPLAINED
from dials_qconsistency.io.refl import ReflectionTable
from conftest import BACKENDS, SHARED_DATA, joined_pairs

#: Refined real pairs (folder, name, options): rotation (static, scan-varying), stills (1 and 64 panels).
REFINED = [
    ("ssx_CuNiR_test_data", "indexed", []),
    ("ssx_CuNiR_test_data", "integrated", []),
    ("centroid_test_data", "indexed", []),
    ("dials_current", "centroid_refined", []),
    ("dials_current", "cspad_stills_refined", []),
    ("quartz_processed", "refined", []),
    ("quartz_processed", "integrated", []),  # model_state=auto takes integrate's state for it
]

TURN_X = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])  # -90 degrees about lab X


def run_verdict(tmp_path, monkeypatch, expt, refl, *options, backend="standalone"):
    monkeypatch.chdir(tmp_path)
    status = main([expt, refl, "output.reflections=None", "output.plots=None", "output.json=qc.json",
                   f"backend={backend}", *options])
    return status, json.load(open(tmp_path / "qc.json"))["verdict"], (tmp_path / "dials.q_consistency.log").read_text()


@pytest.mark.parametrize("folder, name, options", REFINED, ids=[f"{f}-{n}" for f, n, _ in REFINED])
def test_refined_real_models_are_consistent(shared, tmp_path, monkeypatch, folder, name, options):
    status, verdict, log = run_verdict(tmp_path, monkeypatch, shared(folder, name + ".expt"),
                                       shared(folder, name + ".refl"), "fail_if.inconsistent=True", *options)
    assert status == 0 and verdict["consistent"] is True, verdict
    assert verdict["reasons"] == [] and verdict["headline"].startswith("CONSISTENT to numerical precision")
    assert log.count(f"Verdict: {verdict['headline']}") == 1


@pytest.mark.parametrize("name, state, chosen, consistent", [
    ("integrated", "auto", "integrate (chosen: rows of the table are flagged integrated)", True),
    ("refined", "auto", "refinement (block width 1 deg, chosen: no row of the table is flagged integrated)", True),
    ("integrated", "refinement", "refinement (block width 1 deg)", False),
    ("refined", "integrate", "integrate", False),
])
def test_model_state_auto_is_the_state_the_table_was_predicted_with(shared, tmp_path, monkeypatch, name, state,
                                                                    chosen, consistent):
    """The scan-varying quartz sweep: dials.integrate's prediction (1653 rows, all
    flagged integrated_sum) and dials.refine's (505 rows, none; but with the spot
    finder's intensity.sum.value) agree with the model only in the state their
    own program used; auto picks it from the flags and says why."""
    status, verdict, log = run_verdict(tmp_path, monkeypatch, shared("quartz_processed", name + ".expt"),
                                       shared("quartz_processed", name + ".refl"), "fail_if.inconsistent=True",
                                       f"scan_varying.model_state={state}")
    assert f"scan-varying model state: {chosen}\n" in log
    assert verdict["consistent"] is consistent and status == (0 if consistent else 2)
    if not consistent:  # the hint names the state to try, the other one
        other = "integrate for a table of dials.integrate" if state == "refinement" else "refinement for a table of dials.refine"
        assert any(f"check scan_varying.model_state ({other})" in reason for reason in verdict["reasons"]), verdict


def mistaken(document, kind):
    """A copy of an ExperimentList document with one real mistake."""
    document = json.loads(json.dumps(document))
    if kind == "detector moved by 0.5 mm":
        for detector in document["detector"]:
            node = detector.get("hierarchy") or detector["panels"][0]
            direction = np.array(document["beam"][0]["direction"], dtype=float)
            node["origin"] = list(np.array(node["origin"]) + 0.5 * direction / np.linalg.norm(direction))
            if "hierarchy" not in detector:
                for panel in detector["panels"][1:]:
                    panel["origin"] = list(np.array(panel["origin"]) + 0.5 * direction / np.linalg.norm(direction))
        return document
    for crystal in document["crystal"]:
        axes = np.array([crystal[k] for k in ("real_space_a", "real_space_b", "real_space_c")])
        states = [np.array(s, dtype=float).reshape(3, 3) for s in crystal.get("A_at_scan_points", [])]
        if kind == "-90 degrees about X":
            axes = axes @ TURN_X.T  # each axis turned
            states = [TURN_X @ a for a in states]
        else:  # 2pi units: A = B.U carries the 2pi that DIALS leaves out
            axes = axes / (2 * math.pi)
            states = [2 * math.pi * a for a in states]
        for key, axis in zip(("real_space_a", "real_space_b", "real_space_c"), axes):
            crystal[key] = list(axis)
        if states:
            crystal["A_at_scan_points"] = [list(a.ravel()) for a in states]
    return document


#: (kind, the mistake key the verdict must name)
MISTAKES = [("detector moved by 0.5 mm", ("detector_distance",)),
            # for rotation data a turned crystal is a wrong U (named in the goniometer's datum frame)
            ("-90 degrees about X", ("lab_axis_rotation", "crystal_orientation")),
            ("2pi units", ("two_pi",))]
PAIRS = [("dials_current", "cspad_stills_refined"), ("quartz_processed", "refined"), ("ssx_CuNiR_test_data", "indexed")]


@pytest.mark.parametrize("kind, named", MISTAKES, ids=[m[0] for m in MISTAKES])
@pytest.mark.parametrize("folder, name", PAIRS, ids=[f"{f}-{n}" for f, n in PAIRS])
def test_a_real_mistake_makes_the_model_inconsistent_and_is_named(shared, tmp_path, monkeypatch, folder, name, kind, named):
    bad = tmp_path / "mistaken.expt"
    bad.write_text(json.dumps(mistaken(json.load(open(shared(folder, name + ".expt"))), kind)))
    status, verdict, log = run_verdict(tmp_path, monkeypatch, str(bad), shared(folder, name + ".refl"),
                                       "fail_if.inconsistent=True")
    assert status == 2 and verdict["consistent"] is False
    assert verdict["headline"].startswith("INCONSISTENT: pooled: ")
    assert any(entry["mistake"] in named and entry["large"] for entry in verdict["checks"]["named"]), verdict
    assert log.count(f"Verdict: {verdict['headline']}") == 1
    if kind.startswith("detector"):
        assert "off by +0.500 mm" in verdict["headline"] or "off by -0.500 mm" in verdict["headline"]


@pytest.mark.parametrize("folder, name", [("dials_current", "centroid_refined"), ("dials_current", "cspad_stills_refined"),
                                          ("tof_sxd_nacl", "sxd_refined")])
def test_a_shift_across_the_beam_is_named_as_such_and_first(shared, tmp_path, monkeypatch, folder, name):
    """Every detector moved 1 mm along lab x. The beams are not all along z
    (the PILATUS sweep's is 0.003 off it), so the fitted shift has a few
    microns along the beam: the headline names the 1 mm across it, and no
    distance error. SXD's table has DIALS' own predictions up to 0.6 pixel off
    their panels: not a table of another detector."""
    document = json.load(open(shared(folder, name + ".expt")))
    for detector in document["detector"]:
        nodes = [detector["hierarchy"]] if "hierarchy" in detector else detector["panels"]
        for node in nodes:
            node["origin"][0] += 1.0
    bad = tmp_path / "moved.expt"
    bad.write_text(json.dumps(document))
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, str(bad), shared(folder, name + ".refl"))
    shift = re.match(r"INCONSISTENT: pooled: the detector is shifted across the beam by \(([-0-9.]+), ([-0-9.]+), "
                     r"([-0-9.]+)\) mm", verdict["headline"])
    assert shift and np.allclose([float(v) for v in shift.groups()], [1.0, 0.0, 0.0], atol=0.005), verdict["headline"]
    assert not any("detector distance" in r or "off their panels" in r for r in verdict["reasons"]), verdict["reasons"]


def test_a_moved_detector_leaves_q_bragg_the_tables_prediction(shared, tmp_path, monkeypatch):
    """The refined sweep's detector moved 0.5 mm across the beam: q_bragg is
    still the table's prediction (to rounding), and the log's self-tests show
    it; the rotation check says what it measures, q_bragg against q at the
    calculated positions (0.5 mm at ~190 mm from a 1/0.9795 Å⁻¹ sphere:
    ~0.0027 Å⁻¹), and blames no prediction."""
    document = json.load(open(shared("dials_current", "centroid_refined.expt")))
    document["detector"][0]["hierarchy"]["origin"][0] += 0.5
    moved = tmp_path / "moved.expt"
    moved.write_text(json.dumps(document))
    status, verdict, log = run_verdict(tmp_path, monkeypatch, str(moved), shared("dials_current", "centroid_refined.refl"))
    experiment = json.load(open(tmp_path / "qc.json"))["per_experiment"][0]
    assert experiment["max_q_bragg_vs_q_pred"] < 1e-14
    # shown, though s1 matches neither position: it clears the crystal and goniometer
    assert re.search(r"expt 0: .*\|q_bragg - q_pred\| [0-9.]+e-1[0-9]", log), log
    assert 0.0015 < verdict["checks"]["rms_delta_q_rotation"] < 0.004
    assert not any("prediction" in reason for reason in verdict["reasons"]), verdict["reasons"]
    assert any(reason.startswith("for rotation data q_bragg differs from q at the table's calculated positions and "
                                 "angles by ") for reason in verdict["reasons"]), verdict["reasons"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_table_of_another_detector_leads_the_verdict_on_both_backends(shared, tmp_path, monkeypatch, backend):
    """The 64-panel CSPAD's models with the PILATUS sweep's table (one panel
    of 424 x 435 mm; the CSPAD's panels are 21 x 19 mm): the positions lie off
    their panels, which the verdict says first, not a detector fitted 205 mm off.
    A table of the same detector (the sweep before and after dials.refine) has
    none off its panels."""
    status, verdict, _ = run_verdict(
        tmp_path, monkeypatch, shared("dials_current", "cspad_stills_refined.expt"),
        shared("centroid_test_data", "integrated.refl"), backend=backend,
    )
    headline = re.match(r"INCONSISTENT: (\d+)% of the table's positions lie off their panels \(by more than 5 "
                        r"pixels\) in experiment\(s\) 0: the table was made with another detector", verdict["headline"])
    assert status == 0 and headline and int(headline.group(1)) > 90, verdict["headline"]
    status, verdict, _ = run_verdict(
        tmp_path, monkeypatch, shared("centroid_test_data", "indexed.expt"),
        shared("dials_current", "centroid_refined.refl"), backend=backend,
    )
    assert "off their panels" not in " ".join(verdict["reasons"]) and verdict["reasons"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_table_of_other_models_is_inconsistent_on_both_backends(shared, tmp_path, monkeypatch, capsys, backend):
    """The centroid sweep's table after dials.refine paired with the models from
    before it (dials.index): the table's s1 and positions are not theirs."""
    status, verdict, _ = run_verdict(
        tmp_path, monkeypatch, shared("centroid_test_data", "indexed.expt"),
        shared("dials_current", "centroid_refined.refl"), "fail_if.inconsistent=True", backend=backend,
    )
    assert status == 2 and verdict["consistent"] is False
    assert any("the table was made with other models than these" in reason for reason in verdict["reasons"])
    assert "fail_if: the verdict is inconsistent" in capsys.readouterr().err


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_wrong_pairing_leads_with_other_models_not_with_a_poor_fit(shared, tmp_path, monkeypatch, backend):
    """The SSX stills' models with the PILATUS sweep's table: its positions stay
    on the (large) panel, so nothing lies off it, and the best fit (panel 0
    tilted 66.7°) still leaves 0.06 1/Angstrom RMS, some 300 x σ_q: after the
    rotation angles of a table of stills, the verdict says the table was made
    with other models, and the fit follows, marked as leaving that much
    unexplained. A deliberate 1 mm shift in the refined sweep's model is
    explained to the centroid noise (observed positions): it leads."""
    status, verdict, _ = run_verdict(
        tmp_path, monkeypatch, shared("ssx_CuNiR_test_data", "integrated.expt"),
        shared("centroid_test_data", "integrated.refl"), backend=backend,
    )
    assert verdict["reasons"][0].startswith("experiment(s) 0 are stills (no goniometer and no scan"), verdict
    assert verdict["reasons"][1].startswith("the table's s1 matches neither spot position in experiment(s) 0"), verdict
    fitted = [r for r in verdict["reasons"] if r.startswith("pooled: ")]
    left = re.search(r"and leaves ([0-9.e-]+) 1/Angstrom RMS, (\d+) x, unexplained\)$", fitted[0])
    assert left and float(left.group(1)) > 0.01 and int(left.group(2)) > 100, fitted
    assert [entry["unexplained"] for entry in verdict["checks"]["named"] if entry["large"]][:1] == [True]

    document = json.load(open(shared("dials_current", "centroid_refined.expt")))
    document["detector"][0]["hierarchy"]["origin"][0] += 1.0
    (tmp_path / "moved.expt").write_text(json.dumps(document))
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, str(tmp_path / "moved.expt"),
                                     shared("dials_current", "centroid_refined.refl"), "q_pixel.source=observed",
                                     backend=backend)
    assert verdict["headline"].startswith("INCONSISTENT: pooled: the detector is shifted across the beam"), verdict
    assert "unexplained" not in " ".join(verdict["reasons"])
    assert verdict["reasons"][-1].startswith("the table's s1 matches neither spot position")


def test_mean_gates_stay_beside_the_verdict(shared, tmp_path, monkeypatch):
    """A consistent model can still fail a mean |delta_q| bound the user sets."""
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, shared("dials_current", "cspad_stills_refined.expt"),
                                     shared("dials_current", "cspad_stills_refined.refl"), "fail_if.mean_delta_q=1e-4")
    assert status == 2 and verdict["consistent"] is True


def test_without_rotation_data_the_summary_names_no_rotation_angle_or_model_state(shared, tmp_path, monkeypatch, capsys):
    run_verdict(tmp_path, monkeypatch, shared("ssx_CuNiR_test_data", "indexed.expt"),
                shared("ssx_CuNiR_test_data", "indexed.refl"))
    out = capsys.readouterr().out
    assert "q_pixel from calculated positions\n" in out
    assert "rotation angle" not in out and "scan-varying model state" not in out


def test_statistics_are_about_the_rows_refinement_used_and_outliers_are_beside(shared, tmp_path, monkeypatch, capsys):
    """The centroid sweep after dials.refine: 568 rows are usable, 408 of them
    flagged used_in_refinement (counted from the flags here); rows=indexed puts
    all 568 in the statistics."""
    from dials_qconsistency.io.refl import ReflectionTable

    expt, refl = shared("dials_current", "centroid_refined.expt"), shared("dials_current", "centroid_refined.refl")
    flags = ReflectionTable.from_file(refl).get("flags")
    status, verdict, log = run_verdict(tmp_path, monkeypatch, expt, refl)
    report = json.load(open(tmp_path / "qc.json"))
    assert report["overall"]["rows"] == "used_in_refinement"
    assert report["overall"]["delta_q"]["n"] == int(np.count_nonzero(flags & 8)) == 408
    assert report["overall"]["outliers"]["n"] == 568 - 408
    assert report["rows"]["indexed, not used in refinement"] == 160
    assert "not used           160" in log and "flag used_in_refinement" in log
    run_verdict(tmp_path, monkeypatch, expt, refl, "rows=indexed")
    report = json.load(open(tmp_path / "qc.json"))
    assert report["overall"]["delta_q"]["n"] == 568 and report["overall"]["outliers"] is None


def test_copies_of_one_mistake_in_every_still_are_named_once_for_all(shared, tmp_path, monkeypatch):
    """The 5 CuNiR stills after integration each carry their own detector; every
    copy moved 2 mm away: the pooled scope names the distance (not "the
    experiments are diagnosed differently"), and so does each still."""
    document = json.load(open(shared("ssx_CuNiR_test_data", "integrated.expt")))
    assert len(document["detector"]) == 5
    for detector in document["detector"]:
        detector["hierarchy"]["origin"][2] -= 2.0  # the beam runs along +z here: 2 mm further away is -z
    bad = tmp_path / "moved.expt"
    bad.write_text(json.dumps(document))
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, str(bad), shared("ssx_CuNiR_test_data", "integrated.refl"))
    diagnosis = json.load(open(tmp_path / "qc.json"))["diagnosis"]
    headline = re.search(r"detector distance is off by ([-+0-9.]+) mm", verdict["headline"])
    assert verdict["consistent"] is False and headline and abs(float(headline.group(1)) - 2.0) < 0.1, verdict["headline"]
    for scope in diagnosis:  # the pooled fit has every spot; a still has 34 to 194 of them
        distance = [f for f in scope["findings"] if f["mistake"] == "detector_distance"]
        tolerance = 0.1 if scope["scope"] == "pooled" else 0.25
        assert distance and abs(distance[0]["size"]["distance_mm"] - 2.0) < tolerance, scope["scope"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_still_whose_distance_and_scale_fit_alike_names_both(shared, tmp_path, monkeypatch, backend):
    """CuNiR still 3 (34 spots used) with its own detector moved 1 mm away: on
    a still's few spots near the beam a distance error moves them radially in
    proportion to their radius, as a scale does, and both fit to the centroids'
    noise. Still 3 used to read only "a wrong wavelength or cell"; it now names
    the distance too, at its true size, and the untouched stills name nothing."""
    document = json.load(open(shared("ssx_CuNiR_test_data", "integrated.expt")))
    document["detector"][3]["hierarchy"]["origin"][2] -= 1.0  # the beam runs along +z: 1 mm further away
    moved = tmp_path / "moved.expt"
    moved.write_text(json.dumps(document))
    run_verdict(tmp_path, monkeypatch, str(moved), shared("ssx_CuNiR_test_data", "integrated.refl"), backend=backend)
    scopes = {d["scope"]: d for d in json.load(open(tmp_path / "qc.json"))["diagnosis"]}
    assert all(scopes[f"experiment {i}"]["findings"] == [] for i in (0, 1, 2, 4))
    (finding,) = scopes["experiment 3"]["findings"]
    named = {finding["mistake"]: finding["size"], finding["size"]["equally_well"]["mistake"]: finding["size"]["equally_well"]}
    # the four other stills' beams are the same, and fit: a scale is its cell, not the wavelength
    assert set(named) == {"cell_scale", "detector_distance"}, finding
    assert abs(named["detector_distance"]["distance_mm"] - 1.0) < 0.05, finding
    # 1 mm on the 248.6 mm distance scales tan(2θ) by 248.6/249.6: q (∝ sin θ) by
    # 1 - 1/249.6 near the beam, by less further out
    assert 0.8 < (1 - named["cell_scale"]["scale"]) * 249.6 < 1.0, finding
    assert "; or, as well (these spots do not tell the two apart), the detector distance is off by +0." in \
        finding["message"] or "; or, as well (these spots do not tell the two apart), an isotropic scale" in \
        finding["message"], finding


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pooled_scale_that_a_quiet_still_refutes_is_not_named(shared, tmp_path, monkeypatch, backend):
    """CuNiR stills 1-4, each with its own detector moved 1 mm away, still 0
    untouched: the pooled fit over all five gave "pooled: an isotropic scale
    q_pixel = 0.99685 × q_bragg" and led the verdict, though still 0's own spots
    fit a scale near 1. Now the pooled scope says the experiments differ, and
    every moved still names its distance at 1 mm (as the finding, or as well)."""
    document = json.load(open(shared("ssx_CuNiR_test_data", "integrated.expt")))
    for index in (1, 2, 3, 4):
        document["detector"][index]["hierarchy"]["origin"][2] -= 1.0
    moved = tmp_path / "moved.expt"
    moved.write_text(json.dumps(document))
    _, verdict, _ = run_verdict(tmp_path, monkeypatch, str(moved), shared("ssx_CuNiR_test_data", "integrated.refl"),
                                backend=backend)
    scopes = {d["scope"]: d for d in json.load(open(tmp_path / "qc.json"))["diagnosis"]}
    assert [f["mistake"] for f in scopes["pooled"]["findings"]] == ["no_common_cause"], scopes["pooled"]
    assert abs(scopes["experiment 0"]["fits"]["scale"]["scale"] - 1) < 2e-4  # what refutes the pooled 0.99685
    assert scopes["experiment 0"]["findings"] == [] and not verdict["headline"].startswith("INCONSISTENT: pooled")
    for index in (1, 2, 3, 4):
        (finding,) = scopes[f"experiment {index}"]["findings"]
        distance = finding["size"] if finding["mistake"] == "detector_distance" else finding["size"]["equally_well"]
        assert abs(distance["distance_mm"] - 1.0) < 0.1, (index, finding)


@pytest.mark.parametrize("backend", BACKENDS)
def test_observed_positions_name_the_significant_fit_beyond_the_scatter(shared, tmp_path, monkeypatch, backend):
    """The quartz sweep's detector moved 1 mm along the beam, judged on the
    observed centroids: their scatter (normalised RMS 3.8 for the refined model)
    is most of the residual, so no fit explains half of it, and the verdict said
    only "made with other models". The most significant fit (F = 282 against
    what it leaves; the refined models' best fits reach F = 3) is now named,
    with the move at its true size, and leads."""
    document = json.load(open(shared("quartz_processed", "refined.expt")))
    document["detector"][0]["hierarchy"]["origin"][2] += 1.0
    moved = tmp_path / "moved.expt"
    moved.write_text(json.dumps(document))
    refl = shared("quartz_processed", "refined.refl")
    _, verdict, log = run_verdict(tmp_path, monkeypatch, str(moved), refl, "q_pixel.source=observed", backend=backend)
    scale = re.match(r"INCONSISTENT: pooled: an isotropic scale q_pixel = ([0-9.]+) × q_bragg", verdict["headline"])
    # the model's detector 1 mm nearer than the data's 280 mm: at an electron wavelength's small angles every
    # spot's angle, so q, is d/(d - 1) of the model's
    assert scale and abs(float(scale.group(1)) - 280.0 / 279.0) < 2e-5, verdict["headline"]
    assert verdict["reasons"][1].startswith("the table's s1 matches neither spot position in experiment(s) 0")
    (finding,) = {d["scope"]: d for d in json.load(open(tmp_path / "qc.json"))["diagnosis"]}["pooled"]["findings"]
    distance = finding["size"]["equally_well"]
    assert distance["mistake"] == "detector_distance" and abs(abs(distance["distance_mm"]) - 1.0) < 0.01
    # named for its significance alone: F_PARTIAL and MIN_EXPLAINED met, less than the 75 % a named fit explains
    assert finding["size"]["f"] >= F_PARTIAL and MIN_EXPLAINED <= finding["size"]["explained"] < 0.75, finding
    run_verdict(tmp_path, monkeypatch, shared("quartz_processed", "refined.expt"), refl, "q_pixel.source=observed",
                backend=backend)
    diagnosis = json.load(open(tmp_path / "qc.json"))["diagnosis"]
    assert all(d["partial"] == [] and d["findings"] == [] for d in diagnosis)
    pooled = diagnosis[0]

    def f_statistic(fit):  # what the fit removes per parameter over what it leaves per degree of freedom
        m, p = 2 * fit.get("rows", pooled["fitted"]), fit["parameters"]
        return (fit["rms_before"] ** 2 - fit["rms_after"] ** 2) * (m - p) / (p * fit["rms_after"] ** 2)

    assert max(f_statistic(fit) for fit in pooled["fits"].values()) < F_PARTIAL / 2  # (3.0)


def _turn(axis, degrees):
    """Rodrigues' rotation matrix (right-handed) about a unit lab axis."""
    axis, angle = np.asarray(axis, dtype=float), np.radians(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotations_are_named_in_the_direction_they_have(shared, tmp_path, monkeypatch, backend):
    """The centroid sweep's S set to +1° about +y: the message gave the model's
    S as 1° about -y (the fitted turn from model to data, its inverse); it now
    gives S itself. The crystal turned +0.2° about +y (U' = R·U, the model
    ahead of the data) is said to be off by the turn that takes the model's to
    the data's, about -y, and says so."""
    document = json.load(open(shared("dials_current", "centroid_refined.expt")))
    document["goniometer"][0]["setting_rotation"] = _turn((0, 1, 0), 1.0).ravel().tolist()
    turned = tmp_path / "setting.expt"
    turned.write_text(json.dumps(document))
    refl = shared("dials_current", "centroid_refined.refl")
    _, verdict, _ = run_verdict(tmp_path, monkeypatch, str(turned), refl, backend=backend)
    assert ("an extra goniometer setting rotation: the model's S (1.000° about (0.000, 1.000, 0.000)) should be the "
            "identity") in verdict["headline"], verdict["headline"]
    document = json.load(open(shared("dials_current", "centroid_refined.expt")))
    crystal = document["crystal"][0]
    for key in ("real_space_a", "real_space_b", "real_space_c"):  # real-space axes turn with U
        crystal[key] = (_turn((0, 1, 0), 0.2) @ np.array(crystal[key])).tolist()
    turned.write_text(json.dumps(document))
    _, verdict, _ = run_verdict(tmp_path, monkeypatch, str(turned), refl, backend=backend)
    assert re.search(r"the crystal orientation \(U\) is off by 0\.200°: the data's is the model's turned about "
                     r"\(-?0\.000, -1\.000, -?0\.000\) \(goniometer datum frame\)", verdict["headline"]), verdict["headline"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_still_in_2pi_units_is_named_for_itself(shared, tmp_path, monkeypatch, backend):
    """CuNiR still 2's crystal with A in 2π units (real-space axes / 2π), the
    four others as refined, their spots the table's to rounding: the pooled fit
    over all five gave "pooled: an isotropic scale q_pixel = 0.17116 × q_bragg"
    and led the verdict. The exact stills refute a pooled finding: still 2's
    factor 2π leads."""
    document = json.load(open(shared("ssx_CuNiR_test_data", "indexed.expt")))
    crystal = document["crystal"][document["experiment"][2]["crystal"]]
    for key in ("real_space_a", "real_space_b", "real_space_c"):
        crystal[key] = [x / (2 * math.pi) for x in crystal[key]]
    bad = tmp_path / "two_pi.expt"
    bad.write_text(json.dumps(document))
    _, verdict, _ = run_verdict(tmp_path, monkeypatch, str(bad), shared("ssx_CuNiR_test_data", "indexed.refl"),
                                backend=backend)
    assert verdict["headline"].startswith("INCONSISTENT: experiment 2: q_pixel = q_bragg / 6.2832: a factor 2π"), \
        verdict["headline"]
    scopes = {d["scope"]: d for d in json.load(open(tmp_path / "qc.json"))["diagnosis"]}
    assert [f["mistake"] for f in scopes["pooled"]["findings"]] == ["no_common_cause"]
    assert all(scopes[f"experiment {i}"]["rms_in_plane_before"] < 1e-12 for i in (0, 1, 3, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("folder, name, index, scope", [
    ("ssx_CuNiR_test_data", "integrated", 2, "experiment 2"),  # stills, each with its own beam
    ("quartz_processed", "refined", 0, "pooled"),  # electrons: 0.2° is 0.14 1/Angstrom at the sample
], ids=["CuNiR-still-2", "quartz"])
def test_a_beam_turned_is_named_a_beam_direction(shared, tmp_path, monkeypatch, backend, folder, name, index, scope):
    """A beam's direction turned 0.2° about lab y. It was named nowhere: the
    CuNiR still (no delpsical.rad in integrated.refl) read CONSISTENT to
    numerical precision, its spots being the table's, with a panel tilt fitted
    and dropped; the quartz sweep led with the self-test. Now the beam leads,
    at 0.200°, the fitted direction the one the table was made with."""
    document = json.load(open(shared(folder, name + ".expt")))
    beam = document["beam"][document["experiment"][index]["beam"]]
    original = np.array(beam["direction"]) / np.linalg.norm(beam["direction"])
    beam["direction"] = (_turn((0, 1, 0), 0.2) @ original).tolist()
    tilted = tmp_path / "tilted.expt"
    tilted.write_text(json.dumps(document))
    _, verdict, _ = run_verdict(tmp_path, monkeypatch, str(tilted), shared(folder, name + ".refl"), backend=backend)
    assert verdict["headline"].startswith(f"INCONSISTENT: {scope}: the beam direction is off by 0.200°"), \
        verdict["headline"]
    (finding,) = {d["scope"]: d for d in json.load(open(tmp_path / "qc.json"))["diagnosis"]}[scope]["findings"]
    # a still's spots keep their Ewald offsets (2e-4 1/Angstrom RMS here), which the fit weighs too: 0.19986°
    assert finding["mistake"] == "beam_direction" and abs(finding["size"]["angle_deg"] - 0.2) < 1e-3
    assert np.linalg.norm(np.array(finding["size"]["direction"]) - original) < np.radians(1e-3), finding


def _centroid_changed(tmp_path, change):
    """The refined centroid sweep's .expt with one goniometer or crystal mistake."""
    document = json.load(open(SHARED_DATA + "/dials_current/centroid_refined.expt"))
    goniometer, crystal = document["goniometer"][0], document["crystal"][0]
    if change == "S +1° about +y":
        goniometer["setting_rotation"] = _turn((0, 1, 0), 1.0).ravel().tolist()
    elif change == "U +0.2° about +y":
        for key in ("real_space_a", "real_space_b", "real_space_c"):
            crystal[key] = (_turn((0, 1, 0), 0.2) @ np.array(crystal[key])).tolist()
    else:  # the axis reversed
        goniometer["rotation_axis"] = [-x for x in goniometer["rotation_axis"]]
    changed = tmp_path / "changed.expt"
    changed.write_text(json.dumps(document))
    return str(changed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change, consistent, named", [
    ("S +1° about +y", False, r"an extra goniometer setting rotation: the model's S \(1\.000° about \(0\.000, 1\.000, "
                              r"0\.000\)\) should be the identity"),
    ("U +0.2° about +y", True, r"the crystal orientation \(U\) is off by (0\.\d+)°: the data's is the model's "
                               r"turned about \(0\.0\d\d, -1\.000, "),
    ("axis reversed", False, r"the rotation axis has the wrong sign"),
])
def test_observed_angles_name_the_goniometer_and_crystal_mistakes(shared, tmp_path, monkeypatch, backend, change,
                                                                   consistent, named):
    """With the observed centroids and rotation angles (q_pixel.source=observed
    phi=observed), the mode for the whole residual, these mistakes read
    CONSISTENT with nothing named: they move the angles (Δφ RMS 0.30° for the
    turned crystal, against 0.12°), which the fits on the spots alone do not
    see, and the angles' scatter was taken as what the models cannot remove.
    The fits are now judged in q too. S and the axis explain most of the
    residual and fail the verdict; the crystal's 0.2° on this 1.8° sweep
    explains 48 %, named for its significance (F = 439) in the headline of a
    verdict that stays consistent: a part of a refined sweep has such fits
    (test below). The default, calculated positions, judges it exactly."""
    _, verdict, _ = run_verdict(tmp_path, monkeypatch, _centroid_changed(tmp_path, change),
                                shared("dials_current", "centroid_refined.refl"), "q_pixel.source=observed",
                                "phi=observed", backend=backend)
    found = re.search(named, verdict["headline"])
    assert verdict["consistent"] is consistent and found, verdict["headline"]
    if found.groups():  # the turn, within a tenth: the fit takes up some of the angles' scatter on this 1.8° sweep
        assert abs(float(found.group(1)) - 0.2) < 0.02, verdict["headline"]
    if consistent:
        assert verdict["headline"].startswith("CONSISTENT within what the centroids can resolve, though one change "
                                              "fits significantly: pooled: ")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_part_of_a_refined_sweep_stays_consistent_on_its_centroids(shared, tmp_path, monkeypatch, backend):
    """DIALS' refined quartz model against the rows of images 10-59 alone, on
    their observed centroids: a detector change fits them significantly (F =
    133, 49 % of the squared residual: a 0.025 mm distance and a 0.02 mm beam
    centre move q by 0.0035 1/Angstrom at an electron wavelength), as much as
    a real mistake would, and the verdict was INCONSISTENT. Refinement balanced
    the whole sweep, not a part of it: the verdict is consistent, the fit given
    in its headline, and the gate passes."""
    source = ReflectionTable.from_file(shared("quartz_processed", "refined.refl"))
    frame = np.asarray(source.get("xyzobs.px.value"))[:, 2]
    keep = (frame >= 10) & (frame < 60)
    part = ReflectionTable(int(keep.sum()), version=source.version)
    for name in source.keys():
        if name != "shoebox":
            part.set_column(name, source.column_type(name), np.asarray(source.get(name))[keep])
    part.identifiers = source.identifiers
    part.write(str(tmp_path / "part.refl"))
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, shared("quartz_processed", "refined.expt"),
                                     str(tmp_path / "part.refl"), "q_pixel.source=observed", "fail_if.inconsistent=True",
                                     backend=backend)
    assert status == 0 and verdict["consistent"] is True, verdict["headline"]
    assert verdict["headline"].startswith("CONSISTENT within what the centroids can resolve, though one change fits "
                                          "significantly: pooled: the detector distance is off by -0.0")
    (suspect,) = [entry for entry in verdict["checks"]["named"]
                  if entry.get("significant") and entry["scope"] == "pooled" and entry["mistake"] == "detector_distance"]
    assert suspect["f"] >= F_PARTIAL and MIN_EXPLAINED <= suspect["explained"] < 0.75, suspect
    assert verdict["checks"]["leading_mistake"] == "detector_distance"
    from dials_qconsistency.core.verdict import Verdict
    from dials_qconsistency.report.html import next_step

    assert "q_pixel.source=calculated" in next_step(Verdict(True, verdict["headline"], [], verdict["checks"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scale_of_one_still_on_a_shared_beam_is_its_cell(shared, tmp_path, monkeypatch, backend):
    """The 5 CuNiR stills share one beam. Still 4's cell made 0.5 % longer read
    "a wrong wavelength or cell (the spots fit λ = 1.38299 Å)": the four others
    fit that beam's wavelength, so it is the cell. The beam's wavelength made
    1 % longer instead is named pooled, now with the wavelength the spots fit
    (the one the table was made with), as one experiment's scale gives it."""
    source = json.load(open(shared("ssx_CuNiR_test_data", "indexed.expt")))
    refl = shared("ssx_CuNiR_test_data", "indexed.refl")
    document = json.loads(json.dumps(source))
    crystal = document["crystal"][document["experiment"][4]["crystal"]]
    for key in ("real_space_a", "real_space_b", "real_space_c"):
        crystal[key] = [1.005 * x for x in crystal[key]]
    changed = tmp_path / "changed.expt"
    changed.write_text(json.dumps(document))
    _, verdict, _ = run_verdict(tmp_path, monkeypatch, str(changed), refl, backend=backend)
    assert verdict["headline"].startswith("INCONSISTENT: experiment 4: an isotropic scale q_pixel = 1.00500 × q_bragg: "
                                          "a wrong cell (experiment(s) 0-3 share the beam, and their spots fit its "
                                          "wavelength)"), verdict["headline"]
    document = json.loads(json.dumps(source))
    assert len(document["beam"]) == 1
    document["beam"][0]["wavelength"] *= 1.01
    changed.write_text(json.dumps(document))
    _, verdict, _ = run_verdict(tmp_path, monkeypatch, str(changed), refl, backend=backend)
    (finding,) = json.load(open(tmp_path / "qc.json"))["diagnosis"][0]["findings"]
    assert finding["mistake"] == "wavelength_or_cell_scale" and verdict["headline"].startswith("INCONSISTENT: pooled: ")
    assert finding["size"]["wavelength_fit"] == pytest.approx(source["beam"][0]["wavelength"], abs=2e-4), finding


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_beam_centre_shift_leads_its_look_alike_beam_turn(shared, tmp_path, monkeypatch, backend):
    """The CuNiR detector moved 0.3 mm along y, judged on the observed
    centroids: a turn of the beam (0.064°) fits the stills' spots near the beam
    as well, and, the simpler by its count of parameters, led the verdict with
    the shift second. The shift, the likelier mistake, leads."""
    document = json.load(open(shared("ssx_CuNiR_test_data", "indexed.expt")))
    document["detector"][0]["hierarchy"]["origin"][1] += 0.3
    moved = tmp_path / "moved.expt"
    moved.write_text(json.dumps(document))
    _, verdict, _ = run_verdict(tmp_path, monkeypatch, str(moved), shared("ssx_CuNiR_test_data", "indexed.refl"),
                                "q_pixel.source=observed", backend=backend)
    found = re.match(r"INCONSISTENT: pooled: the detector is shifted across the beam by \(-?0\.0\d\d, (0\.3\d\d), "
                     r"-?0\.000\) mm .*; or, as well \(these spots do not tell the two apart\), the beam direction is off",
                     verdict["headline"])
    assert found and abs(float(found.group(1)) - 0.3) < 0.015, verdict["headline"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_stills_crystals_turned_without_delpsical_are_named_as_suspects(shared, tmp_path, monkeypatch, backend):
    """CuNiR stills 2 and 4 turned 0.2° about lab x, judged against
    integrated.refl, which has no delpsical.rad: the model's spots stay the
    table's calculated ones, so no check fails and the verdict was CONSISTENT
    with nothing said. The fit that explains a third of still 2's residual
    (its Ewald offsets) at F = 61 is now named in the headline, at its size."""
    document = json.load(open(shared("ssx_CuNiR_test_data", "integrated.expt")))
    for index in (2, 4):
        crystal = document["crystal"][document["experiment"][index]["crystal"]]
        for key in ("real_space_a", "real_space_b", "real_space_c"):
            crystal[key] = (_turn((1, 0, 0), 0.2) @ np.array(crystal[key])).tolist()
    turned = tmp_path / "turned.expt"
    turned.write_text(json.dumps(document))
    _, verdict, _ = run_verdict(tmp_path, monkeypatch, str(turned), shared("ssx_CuNiR_test_data", "integrated.refl"),
                                backend=backend)
    found = re.match(r"CONSISTENT to numerical precision, though one change fits significantly: experiment 2: the "
                     r"crystal orientation is off by ([0-9.]+)°: the data's is the model's turned about lab \(-0\.99",
                     verdict["headline"])
    assert verdict["consistent"] is True and found and abs(float(found.group(1)) - 0.2) < 0.005, verdict["headline"]
    from dials_qconsistency.core.verdict import Verdict
    from dials_qconsistency.report.html import next_step, with_strategy_paths

    assert next_step(Verdict(True, verdict["headline"], [], verdict["checks"])).endswith(
        with_strategy_paths("Refine the crystal orientation: dials.refine with phil/refine_2_all_free.phil."))


def test_a_look_alike_is_common_only_where_every_experiment_names_it():
    """Two stills name one scale; one of them also fits a distance as well: the
    common finding names the scale alone. Both with the distance: both named."""
    from dials_qconsistency.core.diagnosis import AS_WELL, Diagnosis, _common_finding
    from dials_qconsistency.core.findings import Finding

    def scope(index, also):
        size = {"scale": 0.9965, "explained": 0.95, "rms_after_fit": 1e-4}
        message = "an isotropic scale"
        if also:
            size["equally_well"] = {"mistake": "detector_distance", "message": "the distance", "distance_mm": 1.0}
            message += AS_WELL + "the distance"
        return Diagnosis(f"experiment {index}", 10, 1e-3, False, 10, 1e-3,
                         findings=[Finding("wavelength_or_cell_scale", message, size)])

    one = _common_finding([scope(0, True), scope(1, False)])
    assert one.message == "every experiment: an isotropic scale" and "equally_well" not in one.size
    both = _common_finding([scope(0, True), scope(1, True)])
    assert both.message == f"every experiment: an isotropic scale{AS_WELL}the distance"
    assert both.size["equally_well"]["distance_mm"] == 1.0


def _cspad_changed(tmp_path, changes):
    """The CSPAD stills' .expt with its crystals changed: ``changes`` maps an
    experiment to ("turn", lab axis, degrees) or ("scale", factor of the cell)."""
    document = json.load(open(SHARED_DATA + "/dials_current/cspad_stills_refined.expt"))
    for index, (kind, *how) in changes.items():
        crystal = document["crystal"][document["experiment"][index]["crystal"]]
        axes = np.array([crystal[key] for key in ("real_space_a", "real_space_b", "real_space_c")])
        if kind == "turn":
            axis, angle = np.array(how[0], dtype=float), np.radians(how[1])
            cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
            axes = axes @ (np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross).T
        else:
            axes = axes * how[0]
        for key, axis in zip(("real_space_a", "real_space_b", "real_space_c"), axes):
            crystal[key] = list(axis)
    changed = tmp_path / "changed.expt"
    changed.write_text(json.dumps(document))
    return str(changed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_mistake_of_some_crystals_is_named_for_those_alone(shared, tmp_path, monkeypatch, backend):
    """The crystals of CSPAD stills 1-9 turned 0.5 deg about lab x, still 0's
    left as refined: the headline names the turn for "experiments 1-9 (none
    found in 0)" at its true size. A pooled fit over all ten took in still 0 and
    gave 0.457 deg."""
    turned = _cspad_changed(tmp_path, {i: ("turn", (1, 0, 0), 0.5) for i in range(1, 10)})
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, turned, shared("dials_current", "cspad_stills_refined.refl"),
                                     backend=backend)
    found = re.search(r"^INCONSISTENT: pooled: experiments 1-9 \(none found in 0\): the crystal orientation is off by "
                      r"([0-9.]+)", verdict["headline"])
    assert found and abs(float(found.group(1)) - 0.5) <= 0.0005, verdict["headline"]
    pooled = json.load(open(tmp_path / "qc.json"))["diagnosis"][0]
    assert pooled["scope"] == "pooled" and pooled["findings"][0]["size"]["experiments"] == 9


#: Changes of the CSPAD crystals that must not be named as one: turns the other
#: way or about another axis, and cell scales on both sides of 1.
UNALIKE = {"opposite turns": {**{i: ("turn", (1, 0, 0), 0.5) for i in range(1, 5)},
                              **{i: ("turn", (1, 0, 0), -0.5) for i in range(5, 10)}},
           "turns about x and y": {**{i: ("turn", (1, 0, 0), 0.5) for i in range(1, 5)},
                                   **{i: ("turn", (0, 1, 0), 0.5) for i in range(5, 10)}},
           "cells 1.001 and 0.995": {**{i: ("scale", 1.001) for i in range(1, 5)},
                                     **{i: ("scale", 0.995) for i in range(5, 10)}}}


@pytest.mark.parametrize("changes", UNALIKE.values(), ids=UNALIKE.keys())
def test_unalike_mistakes_of_some_crystals_are_named_each_for_its_own(shared, tmp_path, monkeypatch, changes):
    """Each still names its own change at its size; the pooled scope says they
    differ (it used to give the first still's axis or scale for all)."""
    changed = _cspad_changed(tmp_path, changes)
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, changed, shared("dials_current", "cspad_stills_refined.refl"))
    diagnosis = json.load(open(tmp_path / "qc.json"))["diagnosis"]
    assert diagnosis[0]["findings"][0]["mistake"] == "no_common_cause", diagnosis[0]["findings"]
    for index, (kind, *how) in changes.items():
        (finding,) = diagnosis[index + 1]["findings"]
        if kind == "turn":  # model - data: the fitted axis is minus the turn's
            signed = finding["size"]["angle_deg"] * np.array(finding["size"]["axis"])
            assert np.abs(signed + how[1] * np.array(how[0])).max() < 0.002, (index, finding["message"])
        else:
            assert abs(finding["size"]["scale"] - how[0]) < 3e-5, (index, finding["message"])
    assert not verdict["headline"].startswith("INCONSISTENT: pooled"), verdict["headline"]


def test_a_cell_scale_of_some_crystals_is_not_spread_over_all(shared, tmp_path, monkeypatch):
    """Cells 1-9 scaled by 1.001: named for those (1.00098 to 1.00100), not as
    a pooled scale over all ten stills (1.00092), though the beam is shared."""
    scaled = _cspad_changed(tmp_path, {i: ("scale", 1.001) for i in range(1, 10)})
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, scaled, shared("dials_current", "cspad_stills_refined.refl"))
    found = re.search(r"^INCONSISTENT: pooled: experiments 1-9 \(none found in 0\): an isotropic scale q_pixel = "
                      r"([0-9.]+)", verdict["headline"])
    assert found and abs(float(found.group(1)) - 1.001) < 3e-5, verdict["headline"]


def test_a_mistake_of_two_stills_weighs_as_much_as_of_one(shared, tmp_path, monkeypatch):
    """Without delpsical.rad, still 3 turned 0.15 deg about y moves its spots
    by 0.4 sigma_q: INCONSISTENT. Stills 3 and 6 turned alike must be too: the
    common finding's size is over their rows, not diluted by the eight others
    (it was 0.2 sigma_q, and the verdict CONSISTENT)."""
    table = ReflectionTable.from_file(shared("dials_current", "cspad_stills_refined.refl"))
    table.remove_column("delpsical.rad")
    refl = str(tmp_path / "no_delpsical.refl")
    table.write(refl)
    moved = {}
    for stills in ((3,), (3, 6)):
        folder = tmp_path / "-".join(map(str, stills))
        folder.mkdir()
        turned = _cspad_changed(folder, {i: ("turn", (0, 1, 0), 0.15) for i in stills})
        status, verdict, _ = run_verdict(folder, monkeypatch, turned, refl)
        assert verdict["consistent"] is False, verdict["headline"]
        (entry,) = verdict["checks"]["named"]
        moved[stills] = entry["moves_spots_by"] / verdict["checks"]["centroid_sigma_q"]
    assert abs(moved[(3, 6)] / moved[(3,)] - 1) < 0.25, moved  # the same turn weighs the same


@pytest.mark.parametrize("backend", BACKENDS)
def test_stills_beside_a_sweep_are_weighed_against_their_own_centroids(shared, tmp_path, monkeypatch, backend):
    """The quartz sweep (median sigma_q 1.5e-3 1/Angstrom) with the 5 CuNiR
    stills (2.0e-4) in one list, the crystal of CuNiR still 1 (experiment 2 of
    the list) turned 0.7 deg: against all rows' sigma_q the turn was small and
    the verdict CONSISTENT; against that still's own it is 1.9 x, and named."""
    def turn(document, offsets):
        crystal = document["crystal"][document["experiment"][offsets[1] + 1]["crystal"]]
        t = np.radians(0.7)
        about_x = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
        for key in ("real_space_a", "real_space_b", "real_space_c"):
            crystal[key] = list(about_x @ np.array(crystal[key]))

    expt, refl = joined_pairs(tmp_path, [(shared("quartz_processed", "refined.expt"),
                                          shared("quartz_processed", "refined.refl")),
                                         (shared("ssx_CuNiR_test_data", "indexed.expt"),
                                          shared("ssx_CuNiR_test_data", "indexed.refl"))], turn)
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, expt, refl, backend=backend)
    found = re.search(r"^INCONSISTENT: experiment 2: the crystal orientation is off by ([0-9.]+)°: .* ([0-9.]+) x their "
                      r"centroids' uncertainty \(([0-9.e-]+) 1/Angstrom\)", verdict["headline"])
    assert found and abs(float(found.group(1)) - 0.7) < 0.001, verdict["headline"]
    (entry,) = verdict["checks"]["named"]
    assert verdict["checks"]["centroid_sigma_q"] > 5 * entry["centroid_sigma_q"]  # the sweep's rows dominate the median
    assert 1.5 < entry["moves_spots_by"] / entry["centroid_sigma_q"] < 2.5


def test_experiment_runs_are_written_as_ranges():
    from dials_qconsistency.core.diagnosis import _ranges

    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and _ranges([3]) == "3"


#: Goniometer axes gone wrong: (pair, the datum axis made of the refined one e,
#: the angle the verdict must give). About -e the lattice points trace the same
#: circles: the static centroid sweep's spots stay put, only the angles change.
WRONG_AXES = [(("quartz_processed", "refined"), lambda e: _turn((0, 0, 1), 1.0) @ e, 1.0),
              (("quartz_processed", "refined"), lambda e: _turn((0, 1, 0), 1.0) @ e, 1.0),
              (("dials_current", "centroid_refined"), lambda e: -e, 180.0)]


def _turn(axis, degrees):
    axis, t = np.asarray(axis, dtype=float), math.radians(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(t) * cross + (1 - math.cos(t)) * cross @ cross


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair, wrong, angle", WRONG_AXES, ids=["quartz-z1", "quartz-y1", "centroid-reversed"])
def test_a_wrong_rotation_axis_is_named_with_its_angle(shared, tmp_path, monkeypatch, backend, pair, wrong, angle):
    """The refined goniometer's rotation axis turned 1 deg (about lab z, then
    y) or reversed: the verdict names the rotation axis, the angle, and the
    refined axis as the one the reflections turn about. Before, the z turn
    and the reversal named nothing (and hinted at the other scan-varying model
    state, which auto had ruled out), the y turn named the crystal (0.994 deg)."""
    folder, name = pair
    document = json.load(open(shared(folder, name + ".expt")))
    refined = np.array(document["goniometer"][0]["rotation_axis"], dtype=float)
    document["goniometer"][0]["rotation_axis"] = list(wrong(refined))
    broken = tmp_path / "axis.expt"
    broken.write_text(json.dumps(document))
    status, verdict, log = run_verdict(tmp_path, monkeypatch, str(broken), shared(folder, name + ".refl"),
                                       backend=backend)
    found = re.search(r"^INCONSISTENT: pooled: the rotation axis (?:is off by ([0-9.]+)°|has the wrong sign): the "
                      r"reflections turn about \(([-0-9., ]+)\)", verdict["headline"])
    assert found, verdict["headline"]
    assert (float(found.group(1)) if found.group(1) else 180.0) == pytest.approx(angle, abs=0.002)
    assert np.abs(np.array([float(v) for v in found.group(2).split(",")]) - refined).max() < 0.001
    assert verdict["checks"]["leading_mistake"] == "rotation_axis"
    assert not any("check scan_varying.model_state" in reason for reason in verdict["reasons"])


def _fast_reversed(document):
    """The detector's fast axis reversed: on the hierarchy's root, else on every panel."""
    detector = document["detector"][0]
    for node in [detector["hierarchy"]] if detector.get("hierarchy") else detector["panels"]:
        node["fast_axis"] = [-v for v in node["fast_axis"]]


def _fast_slow_swapped(document):
    for panel in document["detector"][0]["panels"]:
        panel["fast_axis"], panel["slow_axis"] = panel["slow_axis"], panel["fast_axis"]


#: Convention mistakes of the detector that the fits take as absurd sizes: the
#: verdict must say what they are.
REVERSED = [(("dials_current", "centroid_refined"), _fast_slow_swapped,
             r"panel 0 \(Panel\) is tilted by 1[78]\d\.\d{3}° .*: the model's panel faces the other way \(is its fast or "
             r"slow axis reversed, or are the two swapped\?\)"),
            (("dials_current", "centroid_refined"), _fast_reversed, r"panel 0 \(Panel\) is tilted by 1[78]\d\.\d{3}° .*faces "
             r"the other way"),
            (("quartz_processed", "refined"), _fast_reversed,
             r"the detector distance is off by -559\.9\d\d mm \(model - data\), more than the distance itself "
             r"\(280\.0 mm\): is the beam direction, or a detector axis, reversed in the model\?")]


@pytest.mark.parametrize("pair, reverse, named", REVERSED, ids=["centroid-swapped", "centroid-fast", "quartz-fast"])
def test_a_reversed_detector_axis_is_said_to_be_one(shared, tmp_path, monkeypatch, pair, reverse, named):
    """Swapped or reversed panel axes fit as a panel turned 179.9-180 deg, or (the
    quartz root's origin is off the beam) as the detector 560 mm nearer: the
    size is the fit's, the reason says which convention to check."""
    folder, name = pair
    document = json.load(open(shared(folder, name + ".expt")))
    reverse(document)
    broken = tmp_path / "reversed.expt"
    broken.write_text(json.dumps(document))
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, str(broken), shared(folder, name + ".refl"))
    assert re.search(r"^INCONSISTENT: pooled: " + named, verdict["headline"]), verdict["headline"]


def test_a_reversed_axis_in_every_sweep_is_named_for_all(shared, tmp_path, monkeypatch):
    """The centroid sweep twice in one list, both axes reversed: the spots do
    not move, q at the table's angles does; the common finding's size is that
    q (it was the spots' zero, and the verdict left the axis out)."""
    def reverse(document, offsets):
        for goniometer in document["goniometer"]:
            goniometer["rotation_axis"] = [-v for v in goniometer["rotation_axis"]]

    pair = (shared("dials_current", "centroid_refined.expt"), shared("dials_current", "centroid_refined.refl"))
    expt, refl = joined_pairs(tmp_path, [pair, pair], reverse, unique_identifiers=True)
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, expt, refl)
    assert verdict["headline"].startswith("INCONSISTENT: pooled: every experiment: the rotation axis has the wrong "
                                          "sign"), verdict["headline"]


def test_a_distance_far_off_on_the_same_side_is_no_reversed_axis(shared, tmp_path, monkeypatch):
    """The quartz detector at 100 mm in the model, 280 mm in the data: a
    distance 180 mm short, named as such, with no hint of a reversed axis."""
    document = json.load(open(shared("quartz_processed", "refined.expt")))
    document["detector"][0]["panels"][0]["origin"][2] = -100.0  # below a root at the origin: lab z
    near = tmp_path / "near.expt"
    near.write_text(json.dumps(document))
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, str(near), shared("quartz_processed", "refined.refl"))
    assert re.search(r"the detector distance is off by -180\.0\d\d mm \(model - data\) \(", verdict["headline"]), \
        verdict["headline"]


def test_one_mistake_is_common_only_when_every_size_agrees():
    """Findings alike in every compared size stand for all; an extra size, or
    another whole number (panel 151 is not panel 150), does not."""
    from dials_qconsistency.core.diagnosis import Diagnosis, _common_finding
    from dials_qconsistency.core.findings import Finding

    def scope(index, **size):
        return Diagnosis(f"experiment {index}", 10, 1e-3, False, 10, 1e-3,
                         findings=[Finding("tilted_panel", "panel tilted", {"explained": 0.99, "rms_after_fit": 1e-4,
                                                                           **size})])

    alike = _common_finding([scope(0, panel=150, tilt_deg=1.0), scope(1, panel=150, tilt_deg=1.005)])
    assert alike is not None and alike.size["experiment_indices"] == [0, 1]
    assert _common_finding([scope(0, panel=150, tilt_deg=1.0), scope(1, panel=151, tilt_deg=1.0)]) is None
    assert _common_finding([scope(0, panel=150, tilt_deg=1.0), scope(1, panel=150, tilt_deg=1.0, extra=2.0)]) is None


#: Rotation pairs whose models lose their goniometer (and scan) in the test below.
TURNING = [("dials_current", "centroid_refined", ("goniometer", "scan")),
           ("quartz_processed", "refined", ("goniometer",))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("folder, name, dropped", TURNING, ids=[f"{f}-{'+'.join(d)}" for f, _, d in TURNING])
def test_a_rotation_table_taken_as_stills_leads_the_verdict(shared, tmp_path, monkeypatch, backend, folder, name,
                                                            dropped):
    """A refined sweep's models without their goniometer (and scan) are stills,
    q_bragg = A.h. The quartz sweep's 100 deg then fit into the stills' Ewald
    offsets as Δψ, and it was judged CONSISTENT: the verdict now leads with
    the rows' rotation angles (their range read from the table here). Real
    stills (angles all 0) have no such reason."""
    document = json.load(open(shared(folder, name + ".expt")))
    for experiment in document["experiment"]:
        for model in dropped:
            del experiment[model]
    for model in dropped:
        document[model] = []
    (tmp_path / "still.expt").write_text(json.dumps(document))
    refl = shared(folder, name + ".refl")
    status, verdict, log = run_verdict(tmp_path, monkeypatch, str(tmp_path / "still.expt"), refl,
                                       "fail_if.inconsistent=True", backend=backend)
    from dials_qconsistency.io.refl import ReflectionTable

    table = ReflectionTable.from_file(refl)  # every indexed, predicted row
    computed = (table.get("id") >= 0) & np.any(table.get("xyzcal.mm")[:, :2] != 0, axis=1)
    angles = np.degrees(table.get("xyzcal.mm")[computed, 2])
    lacks = "no goniometer and no scan" if "scan" in dropped else "no goniometer"
    assert status == 2 and verdict["headline"] == (
        f"INCONSISTENT: experiment(s) 0 are stills ({lacks}: q_bragg = A.h), yet the rotation angles of their "
        f"indexed rows run from {angles.min():.3g} to {angles.max():.3g} deg: a rotation table (is the goniometer or "
        "the scan missing from the .expt, or are these files not a pair?)" + (f" (and {len(verdict['reasons']) - 1} more)"
                                                             if len(verdict["reasons"]) > 1 else ""))
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, shared("ssx_CuNiR_test_data", "indexed.expt"),
                                     shared("ssx_CuNiR_test_data", "indexed.refl"), backend=backend)
    assert verdict["consistent"] is True and "turning_stills" not in verdict["checks"]


def _judged(kinds, findings, sigma_q=1e-4, before=1e-2, source="observed", in_plane=0.0):
    """judge() on a made-up summary: an experiment per s1 kind in ``kinds``
    (True: s1 matches neither position), stills with ``source`` positions whose
    model spots are ``in_plane`` mm (RMS) from the table's; the diagnoses
    (scope, mistake, RMS left after its fit in Å⁻¹, or a time-of-flight finding
    when that is None; optionally the RMS it was fitted from, else ``before``)."""
    from types import SimpleNamespace

    from dials_qconsistency.core.diagnosis import Diagnosis
    from dials_qconsistency.core.findings import Finding
    from dials_qconsistency.core.statistics import S1_NEITHER, S1_PREDICTED, ExperimentSummary, Summary
    from dials_qconsistency.core.verdict import judge

    stats = {"n": 10, "rms": 1e-3}
    experiments = [ExperimentSummary(i, "still", stats, S1_NEITHER if neither else S1_PREDICTED, 0.0, None, None, 0)
                   for i, neither in enumerate(kinds)]
    summary = Summary(10, {}, stats, "", experiments, residuals={"rms_in_plane_mm": in_plane})
    diagnoses = []
    for scope, mistake, left, *fitted_from in findings:
        size = ({"rms_after_fit": left} if left is not None
                else {"rms_time_before_us": 50.0, "rms_time_after_us": 1.0})
        diagnoses.append(Diagnosis(scope, 10, 1e-3, False, 10, (fitted_from or [before])[0],
                                   findings=[Finding(mistake, mistake, size)]))
    options = SimpleNamespace(q_pixel_source=source, phi="observed", model_state="refinement")
    return judge(summary, options, diagnoses, sigma_q=sigma_q, sigma_t=2.0)


OTHER_MODELS = "the table's s1 matches neither spot position"


@pytest.mark.parametrize("left, leads", [(9e-4, "pooled: "), (11e-4, OTHER_MODELS)])
def test_other_models_lead_only_beyond_ten_sigma_left_by_the_fit(left, leads):
    """σ_q = 1e-4: a fit leaving 9 σ_q still leads, one leaving 11 σ_q follows
    "made with other models", and says what it leaves."""
    verdict = _judged([True], [("pooled", "detector_distance", left)])
    assert verdict.reasons[0].startswith(leads), verdict.reasons
    fitted = next(r for r in verdict.reasons if r.startswith("pooled: "))
    assert ("and leaves 0.0011 1/Angstrom RMS, 11.0 x, unexplained" in fitted) == (left > 1e-3), fitted
    (entry,) = verdict.checks["named"]
    assert entry["left_after_fit"] == left and entry["unexplained"] == (left > 1e-3)


@pytest.mark.parametrize("sigma_q", [None, 0.0])
def test_without_a_centroid_uncertainty_a_fit_keeps_the_lead(sigma_q):
    verdict = _judged([True], [("pooled", "detector_distance", 5e-3)], sigma_q=sigma_q)
    assert verdict.reasons[0].startswith("pooled: ") and verdict.reasons[1].startswith(OTHER_MODELS)
    assert verdict.checks["named"][0]["unexplained"] is False


def test_a_time_of_flight_finding_is_not_judged_by_what_its_spots_leave():
    verdict = _judged([True], [("pooled", "flight_path", None)])
    assert verdict.reasons[0].startswith("pooled: ") and verdict.checks["named"][0]["left_after_fit"] is None


def test_only_a_poor_fit_of_an_experiment_whose_s1_matches_neither_gives_up_the_lead():
    """Experiment 0's s1 is its own, experiment 1's matches neither: a poor fit
    in experiment 0 keeps the lead (its s1 does not say "other models"); a poor
    fit in experiment 1 gives it up; a good fit in experiment 1 keeps it."""
    poor_0 = _judged([False, True], [("experiment 0", "crystal_orientation", 5e-3),
                                     ("experiment 1", "detector_distance", 1e-5)])
    assert poor_0.reasons[0].startswith("experiment 0: ") and poor_0.reasons[-1].startswith(OTHER_MODELS)
    poor_1 = _judged([False, True], [("experiment 1", "detector_distance", 5e-3)])
    assert poor_1.reasons[0].startswith(OTHER_MODELS + " in experiment(s) 1:")
    good_1 = _judged([False, True], [("experiment 1", "detector_distance", 1e-5)])
    assert good_1.reasons[0].startswith("experiment 1: ")


def test_a_small_exact_mistake_follows_a_poor_fit_that_gave_up_the_lead():
    """Calculated positions, spots 0.01 mm off the table's: experiment 1's s1
    matches neither and its fit leaves 50 σ_q ("other models" leads, the fit
    second); experiment 0's distance, 0.2 σ_q and explained to 5 %, comes after
    that fit and before the failed check it explains."""
    verdict = _judged([False, True], [("experiment 0", "detector_distance", 1e-6, 2e-5),
                                      ("experiment 1", "crystal_orientation", 5e-3)],
                      source="calculated", in_plane=0.01)
    starts = [reason.split(":")[0] for reason in verdict.reasons]
    assert starts == [OTHER_MODELS + " in experiment(s) 1", "experiment 1", "experiment 0",
                      "the model's spots are 0.01 mm (RMS) from the calculated positions in the table, not at them (numerical "
                      "precision"], verdict.reasons
    assert "below what the centroids resolve" in verdict.reasons[2] and "0.2 x" in verdict.reasons[2]
    assert verdict.checks["leading_mistake"] is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_small_mistake_that_explains_the_failed_checks_is_named(shared, tmp_path, monkeypatch, backend):
    """SXD's detector moved 0.3 mm along the beam: 0.2 x σ_q of its 3 mm
    pixels, too small to count, but with calculated positions its fit leaves
    nothing of the model's spots being off the table's: named first, with its
    size, before "other models" and the checks it explains (it was left out
    of the verdict)."""
    document = json.load(open(shared("tof_sxd_nacl", "sxd_refined.expt")))
    document["detector"][0]["hierarchy"]["origin"][2] -= 0.3
    (tmp_path / "moved.expt").write_text(json.dumps(document))
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, str(tmp_path / "moved.expt"),
                                     shared("tof_sxd_nacl", "sxd_refined.refl"), backend=backend)
    assert verdict["reasons"][1].startswith("the table's s1 matches neither spot position")
    named = re.match(r"pooled: the detector distance is off by -0\.300 mm \(model - data\) \(it moves the spots by "
                     r"[0-9.e-]+ 1/Angstrom RMS, (0\.\d) x the centroids' uncertainty: below what the centroids "
                     r"resolve, but all that separates these models from the table's predictions\)$",
                     verdict["reasons"][0])
    assert named and float(named.group(1)) < 0.25, verdict["reasons"]
    assert verdict["reasons"][2].startswith("the model's spots are 0.257 mm (RMS) from the calculated positions")
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, str(tmp_path / "moved.expt"),
                                     shared("tof_sxd_nacl", "sxd_refined.refl"), "q_pixel.source=observed",
                                     backend=backend)
    assert not any("below what the centroids resolve" in reason for reason in verdict["reasons"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_stills_crystals_of_another_step_are_told_by_their_ewald_offsets(shared, tmp_path, monkeypatch, backend):
    """The CuNiR stills' table after dials.index with the crystals after
    integration (same beam and detector; U 0.009-0.039 deg and the cell moved):
    every calculated position is still the model's spot, so only the Ewald
    offsets show it: the model's Δψ against the table's delpsical.rad (RMS
    recomputed here from the output table's delta_q.delpsi.rad) leads the
    verdict, not the panel tilt the fits made of it. The table's own crystals
    give Δψ = delpsical.rad to 1e-15."""
    refl = shared("ssx_CuNiR_test_data", "indexed.refl")
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, shared("ssx_CuNiR_test_data", "integrated.expt"), refl,
                                     "output.reflections=out.refl", backend=backend)
    from dials_qconsistency.io.refl import ReflectionTable

    out = ReflectionTable.from_file(str(tmp_path / "out.refl"))
    difference = (out.get("delta_q.delpsi.rad") - out.get("delpsical.rad"))[np.isfinite(out.get("delta_q.delpsi.rad"))]
    per_still = [np.sqrt(np.mean(difference[out.get("id")[np.isfinite(out.get("delta_q.delpsi.rad"))] == i] ** 2))
                 for i in range(5)]
    assert verdict["checks"]["rms_delta_psi_vs_delpsical_rad"] == pytest.approx(max(per_still), rel=1e-9)
    assert 1e-4 < max(per_still) < 1e-3
    assert verdict["headline"].startswith(
        f"INCONSISTENT: for stills the model's Ewald offsets differ from the table's delpsical.rad by "
        f"{max(per_still):.3g} rad (RMS), beyond numerical precision (1e-09): the crystals (or beams) are not the ones "
        "the table was predicted with"), verdict["headline"]
    assert not any("detector" in reason for reason in verdict["reasons"]), verdict["reasons"]  # spots exact
    status, verdict, _ = run_verdict(tmp_path, monkeypatch, shared("ssx_CuNiR_test_data", "indexed.expt"), refl,
                                     backend=backend)
    assert verdict["consistent"] is True and verdict["checks"]["rms_delta_psi_vs_delpsical_rad"] < 1e-15


def test_the_ewald_offset_test_takes_the_finite_rows_and_ignores_a_column_of_zeros():
    """One NaN in delpsical.rad made the RMS NaN, which no comparison fails:
    the check was off for every experiment. A column of zeros is not the
    predictor's. Two stills and a rotation experiment, rows by hand."""
    from types import SimpleNamespace

    from dials_qconsistency.core.statistics import stills_psi_tests

    experiments = [SimpleNamespace(kind="still"), SimpleNamespace(kind="still"), SimpleNamespace(kind="rotation")]
    rows = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5])]
    result = SimpleNamespace(used_rows_by_experiment=lambda count: rows)
    parts = SimpleNamespace(angle=np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
    delpsical = np.array([0.1, np.nan, 0.0, 0.0, 0.0, 0.6])
    assert stills_psi_tests(result, experiments, parts, delpsical) == [pytest.approx(np.sqrt(0.3 ** 2 / 2)), None, None]
    assert stills_psi_tests(result, experiments, parts, None) == [None] * 3


def test_the_next_step_follows_the_headline(shared, tmp_path, monkeypatch):
    """The report's next step was the first large fit's, whatever led: a
    detector refinement for crystals of another step (the fits' panel tilt)
    or for a wrong pairing (the 66.7 deg tilt). It follows the headline now."""
    from dials_qconsistency.core.verdict import Verdict
    from dials_qconsistency.report.html import NEXT_STEPS, next_step, with_strategy_paths

    apart = "The table and the models do not belong together: give the .expt and .refl written by the same step."
    document = json.load(open(shared("dials_current", "centroid_refined.expt")))
    document["detector"][0]["hierarchy"]["origin"][0] += 1.0
    (tmp_path / "moved.expt").write_text(json.dumps(document))
    for expt, refl, step in [
        (str(tmp_path / "moved.expt"), shared("dials_current", "centroid_refined.refl"),
         with_strategy_paths(NEXT_STEPS["detector"])),
        (shared("ssx_CuNiR_test_data", "integrated.expt"), shared("ssx_CuNiR_test_data", "indexed.refl"), apart),
        (shared("ssx_CuNiR_test_data", "integrated.expt"), shared("centroid_test_data", "integrated.refl"), apart),
    ]:
        _, verdict, _ = run_verdict(tmp_path, monkeypatch, expt, refl)
        assert any(entry["large"] for entry in verdict["checks"]["named"]), verdict  # a fit was named each time
        assert next_step(Verdict(**verdict)) == step, verdict["headline"]
