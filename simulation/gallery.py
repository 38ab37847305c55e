"""A gallery of broken models: each classic mistake injected into simulated data.

Every entry pairs a table predicted from the true model with an experiment
list carrying one mistake of known size, so that the diagnosis can be checked
against it (and a user can see what each mistake looks like):

    python -m simulation.gallery OUTPUT_FOLDER
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np

from dials_qconsistency.core.geometry import rotation_matrix
from dials_qconsistency.io.staged import write_atomically
from simulation.simulate import multi_axis_goniometer_dict, simulate_rotation, simulate_stills, simulate_time_of_flight

TWO_PI = 2 * math.pi
ANGLES = (10.0, 0.0, -25.0)  # the true multi-axis goniometer: F and S both non-trivial


@dataclass
class Case:
    name: str
    kind: str  # "rotation", "stills" or "tof"
    mistake: str  # the diagnosis key expected
    size: dict  # the injected size, in the units the diagnosis reports
    document: dict  # the broken .expt
    table: object  # the true .refl (ReflectionTable)


def _rot(axis, degrees):
    return rotation_matrix(np.asarray(axis, dtype=float), math.radians(degrees))


def _map_crystals(document, function):
    for crystal in document["crystal"]:
        for key in ("real_space_a", "real_space_b", "real_space_c"):
            crystal[key] = list(map(float, function(np.asarray(crystal[key]))))


def _single_axis(goniometer_matrix_s, document):
    """Replace a multi-axis goniometer by the single-axis form with a given S (same axis, F)."""
    from dials_qconsistency.io.expt import experiments_from_dict

    gonio = experiments_from_dict(document)[0].goniometer
    document["goniometer"] = [
        {
            "rotation_axis": list(map(float, gonio.axis)),
            "fixed_rotation": list(map(float, gonio.fixed_rotation.ravel())),
            "setting_rotation": list(map(float, np.asarray(goniometer_matrix_s).ravel())),
        }
    ]


def _setting(document):
    from dials_qconsistency.io.expt import experiments_from_dict

    return experiments_from_dict(document)[0].goniometer.setting_rotation


def _angles(document, angles):
    document["goniometer"] = [multi_axis_goniometer_dict(angles)]


def _frame_cases(kind, truth, table):
    """Mistakes that are a constant lab-frame map M applied to q_bragg."""
    cases = []
    for name, mistake, matrix, size in (
        ("minus90_about_x", "lab_axis_rotation", _rot((1, 0, 0), -90.0), {"lab_axis": "X", "signed_angle_deg": 90.0}),
        ("sign_flip_y", "sign_flip", np.diag([1.0, -1.0, 1.0]), {"axis": "Y"}),
    ):
        broken = copy.deepcopy(truth)
        if kind == "rotation":
            _single_axis(matrix @ _setting(truth), broken)
        else:
            _map_crystals(broken, lambda v, m=matrix: m @ v)
        cases.append(Case(name, kind, mistake, size, broken, table))
    for name, factor, scale in (("two_pi_in_q_bragg", TWO_PI, 1 / TWO_PI), ("two_pi_missing", 1 / TWO_PI, TWO_PI)):
        broken = copy.deepcopy(truth)
        _map_crystals(broken, lambda v, f=factor: v / f)  # reciprocal vectors scaled by the factor
        cases.append(Case(name, kind, "two_pi", {"scale": scale}, broken, table))
    if "wavelength" in truth["beam"][0]:  # a polychromatic beam has none: its scale is tof_cases'
        broken = copy.deepcopy(truth)
        broken["beam"][0]["wavelength"] *= 1.02
        cases.append(Case("wavelength_2pc_long", kind, "wavelength_or_cell_scale", {"scale": 1 / 1.02}, broken, table))
    return cases


def _detector_cases(kind, truth, table):
    cases = []
    broken = copy.deepcopy(truth)
    broken["detector"][0]["hierarchy"]["origin"][2] -= 0.8  # the model's detector 0.8 mm further away
    cases.append(Case("distance_plus_0.8mm", kind, "detector_distance", {"distance_mm": 0.8}, broken, table))
    broken = copy.deepcopy(truth)
    origin = broken["detector"][0]["hierarchy"]["origin"]
    origin[0] += 0.25
    origin[1] -= 0.15
    cases.append(Case("shift_0.25_-0.15mm", kind, "beam_centre_shift", {"offset_lab_mm": [0.25, -0.15, 0.0]}, broken, table))
    broken = copy.deepcopy(truth)
    panel = broken["detector"][0]["panels"][2]
    panel["slow_axis"] = list(map(float, _rot(panel["fast_axis"], 1.5) @ np.asarray(panel["slow_axis"])))
    cases.append(Case("panel2_tilt_1.5deg", kind, "tilted_panel", {"panel": 2, "tilt_deg": 1.5}, broken, table))
    return cases


def _beam_case(kind, truth, table):
    """The model's beam turned 0.3° about lab x (its wavelength kept)."""
    broken = copy.deepcopy(truth)
    beam = broken["beam"][0]
    beam["direction"] = list(map(float, _rot([1.0, 0, 0], 0.3) @ np.asarray(beam["direction"], dtype=float)))
    return Case("beam_tilted_0.3deg", kind, "beam_direction", {"angle_deg": 0.3}, broken, table)


def _reindexed(table, operator):
    """The same table with Miller indices h_table = operator · h_true."""
    new = copy.deepcopy(table)
    hkl = new.get("miller_index")
    new.set_column("miller_index", "cctbx::miller::index<>", hkl @ np.asarray(operator).T)
    return new


def rotation_cases() -> list[Case]:
    truth, table = simulate_rotation(noise_mm=0.0, noise_phi=0.0)
    cases = [Case("correct", "rotation", "consistent", {}, truth, table)]
    cases += _frame_cases("rotation", truth, table)
    cases += _detector_cases("rotation", truth, table)
    cases.append(_beam_case("rotation", truth, table))

    def with_angles(true_angles, model_angles, name, mistake, angle):
        true_doc, true_table = simulate_rotation(noise_mm=0.0, noise_phi=0.0, goniometer=multi_axis_goniometer_dict(true_angles))
        broken = copy.deepcopy(true_doc)
        _angles(broken, model_angles)
        return Case(name, "rotation", mistake, {"angle_deg": angle}, broken, true_table)

    cases += [
        with_angles(ANGLES, (10.0, 0.0, 0.0), "missing_setting_rotation", "missing_setting_rotation", 25.0),
        with_angles((10.0, 0.0, 0.0), ANGLES, "extra_setting_rotation", "extra_setting_rotation", 25.0),
        with_angles(ANGLES, (0.0, 0.0, -25.0), "missing_fixed_rotation", "missing_fixed_rotation", 10.0),
        with_angles((0.0, 0.0, -25.0), ANGLES, "extra_fixed_rotation", "extra_fixed_rotation", 10.0),
    ]
    # the scan axis (OMEGA, at 0°: its turn changes neither F nor S) tilted, or reversed
    for name, axis, angle in (("axis_tilted_0.5deg", _rot([1.0, 0, 0], 0.5) @ [0, 1.0, 0], 0.5),
                              ("axis_reversed", [0, -1.0, 0], 180.0)):
        broken = copy.deepcopy(truth)
        broken["goniometer"][0]["axes"][1] = list(map(float, axis))
        cases.append(Case(name, "rotation", "rotation_axis", {"angle_deg": angle}, broken, table))
    # P 2 2 2: h_table = (-h, -k, l), so the table must be reindexed with -h,-k,l
    cases.append(
        Case("reindexed_2fold", "rotation", "reindexing", {"operator": "-h,-k,l", "angle_deg": 180.0}, truth, _reindexed(table, np.diag([-1, -1, 1])))
    )
    return cases


def stills_cases() -> list[Case]:
    truth, table = simulate_stills(noise_mm=0.0)
    cases = [Case("correct", "stills", "consistent", {}, truth, table)]
    cases += _frame_cases("stills", truth, table)
    cases += _detector_cases("stills", truth, table)
    cases.append(_beam_case("stills", truth, table))
    broken = copy.deepcopy(truth)
    rotation = _rot((0.3, -0.5, 0.8), 2.0)
    _map_crystals(broken, lambda v: rotation @ v)
    cases.append(Case("orientation_2deg", "stills", "crystal_orientation", {"angle_deg": 2.0}, broken, table))
    # P 4: h_table = (-k, h, l) (a 4-fold), so the table must be reindexed with k,-h,l
    four_fold = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])
    cases.append(Case("reindexed_4fold", "stills", "reindexing", {"operator": "k,-h,l", "angle_deg": 90.0}, truth, _reindexed(table, four_fold)))
    return cases


def tof_cases() -> list[Case]:
    """A neutron time-of-flight still: the frame and detector mistakes, and the
    two that move no spot: a flight path (the beam's sample_to_source_distance)
    5 mm too long in the model, and the table's times 0.05 % long (a time
    calibration: the model's wavelengths 1/1.0005 of the data's)."""
    truth, table = simulate_time_of_flight()
    cases = [Case("correct", "tof", "consistent", {}, truth, table)]
    cases += _frame_cases("tof", truth, table)
    cases += _detector_cases("tof", truth, table)[:2]
    broken = copy.deepcopy(truth)
    broken["beam"][0]["sample_to_source_distance"] += 5.0
    cases.append(Case("flight_path_plus_5mm", "tof", "flight_path", {"flight_path_mm": 5.0}, broken, table))
    _, slow_clock = simulate_time_of_flight(time_scale=1.0005)
    cases.append(Case("times_x1.0005", "tof", "wavelength_scale", {"wavelength_scale": 1 / 1.0005}, truth, slow_clock))
    return cases


def all_cases() -> list[Case]:
    return rotation_cases() + stills_cases() + tof_cases()


def write_gallery(folder: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    written = []
    for case in all_cases():
        stem = os.path.join(folder, f"{case.kind}_{case.name}")
        write_atomically(stem + ".expt", (json.dumps(case.document, indent=1) + "\n").encode())
        case.table.write(stem + ".refl")
        written += [stem + ".expt", stem + ".refl"]
    return written


if __name__ == "__main__":
    for path in write_gallery(sys.argv[1] if len(sys.argv) > 1 else "gallery"):
        print(path)
