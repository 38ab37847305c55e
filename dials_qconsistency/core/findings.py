"""The diagnosis' findings in words: a fitted scale, rotation, mirror or
detector change named as the mistake a crystallographer makes (2π units, a
wavelength or cell error, a missing goniometer rotation, a sign flip, a
reindexing, a detector distance, beam centre or tilt), with its size.
Lab frame, Å⁻¹, mm, degrees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dials_qconsistency.core import geometry
from dials_qconsistency.core.fits import LAB_AXES, axis_angle, hkl_expression, lab_axis_name, reindexing_operator, same_rotation

#: Below this RMS |Δq| (Å⁻¹) the model is consistent to rounding.
ROUNDING = 1e-9

#: The smallest fitted rotation (degrees) named as a mistake.
MIN_ANGLE_DEG = 0.005

#: The smallest |scale - 1| named as a mistake.
MIN_SCALE = 1e-5

#: The smallest detector or panel shift (mm) named as a mistake.
MIN_SHIFT_MM = 0.002
#: A part of a detector shift (along or across the beam) under this fraction
#: of the other part is not named on its own.
SHIFT_PART_RATIO = 0.1

#: The smallest panel tilt (degrees) named as a mistake.
MIN_TILT_DEG = 0.01

#: A tilt must move the panel's edge by this fraction of its origin's offset (see tilt_matters).
TILT_OFFSET_RATIO = 0.25


@dataclass
class Finding:
    mistake: str  # a stable key, e.g. "sign_flip", "two_pi", "beam_centre_shift"
    message: str
    size: dict


#: The mistakes of the detector model (its position, tilt, panels).
DETECTOR_MISTAKES = {"detector_distance", "beam_centre_shift", "tilted_panel", "detector_tilt", "panel_shift"}

#: A flight-path error smaller than this (mm) is not named.
MIN_FLIGHT_PATH_MM = 0.05


def name_time_of_flight(fit) -> tuple[Finding, dict]:
    """(the finding, the fit it rests on) for a time-of-flight residual that the
    spots do not share: a flight-path error (the beam's
    sample_to_source_distance, model − data) or every wavelength scaled (model /
    data), whichever explains the times clearly better; both named when the
    detector distances are too alike to tell (observed times). Neither moves a
    spot, so the cell (which would) is not in question."""
    path, scale = fit["flight_path"], fit["wavelength_scale"]
    delta, factor = path["flight_path_mm"], scale["scale"]
    size = {"flight_path_mm": delta, "wavelength_scale": factor, "time_offset_us": path["offset_us"]}
    if scale["rms_after"] < 0.5 * path["rms_after"]:
        size["time_offset_us"] = scale["offset_us"]
        return Finding("wavelength_scale", f"every wavelength is {factor:.6f} x the data's (model / data; a time "
                       "calibration or a conversion constant, not the flight path: the error grows with each "
                       "reflection's own path); the spots do not move, so the cell is not in question", size), scale
    either = "" if path["rms_after"] < 0.5 * scale["rms_after"] else f", or every wavelength scaled by {factor:.6f}"
    return Finding("flight_path", f"the time-of-flight residual grows with the wavelength as a flight path off by "
                   f"{delta:+.2f} mm would (model - data: the beam's sample_to_source_distance{either}); the spots "
                   "do not move, so the cell is not in question", size), path


def name_scale(fit, experiment, laue=False) -> Finding:
    s = fit["scale"]
    two_pi = 2 * math.pi
    if abs(s / two_pi - 1) < 0.005:
        return Finding("two_pi", f"q_pixel = {s:.4f} × q_bragg: a factor 2π (q_bragg lacks it, or q_pixel has it)", {"scale": s})
    if abs(s * two_pi - 1) < 0.005:
        return Finding("two_pi", f"q_pixel = q_bragg / {1 / s:.4f}: a factor 2π (q_bragg has it, or q_pixel lacks it)", {"scale": s})
    size = {"scale": s}
    if laue:  # a wavelength scale moves no q of Laue data
        return Finding("cell_scale", f"an isotropic scale q_pixel = {s:.5f} × q_bragg: a wrong cell (with a "
                       "polychromatic beam a wavelength scale moves no q; see the time-of-flight fit)", size)
    finding = Finding("wavelength_or_cell_scale", f"an isotropic scale q_pixel = {s:.5f} × q_bragg: a wrong wavelength or cell",
                      size)
    if experiment is not None and experiment.beam is not None:
        with_wavelength(finding, experiment.beam.wavelength)
    return finding


def with_wavelength(finding, wavelength) -> None:
    """A scale's finding gives the wavelength (Å) its spots fit beside the model's."""
    s = finding.size["scale"]
    finding.size.update(wavelength_fit=s * wavelength, wavelength_model=wavelength)
    finding.message += f" (the spots fit λ = {s * wavelength:.5f} Å, the model has {wavelength:.5f} Å)"


def as_cell_scale(finding, witnesses: str) -> Finding:
    """A scale whose beam other experiments' spots fit as it is (``witnesses``,
    their indices): the cell, not the wavelength."""
    s = finding.size["scale"]
    return Finding("cell_scale", f"an isotropic scale q_pixel = {s:.5f} × q_bragg: a wrong cell (experiment(s) "
                                 f"{witnesses} share the beam, and their spots fit its wavelength)",
                   {key: value for key, value in finding.size.items() if not key.startswith("wavelength_")})


def name_rotation(key, fit, experiment):
    m = np.array(fit["matrix"])
    axis, angle = np.array(fit["axis"]), fit["angle_deg"]
    size = {"angle_deg": angle, "axis": axis.tolist()}
    lab_axis = lab_axis_name(axis)
    frame = "lab" if key.endswith("_lab") else "scan_undone"
    rotation_data = experiment is not None and experiment.is_rotation
    crystal = experiment.crystal if experiment is not None else None

    if key.startswith("mirror"):
        if frame == "scan_undone" or not rotation_data:
            k = _reindex_in_crystal_frame(m, experiment, frame) if crystal is not None else None
            if k is not None:
                return Finding("reindexing", f"Miller indices in an inverted setting: reindex with h,k,l -> {hkl_expression(k)}", {**size, "operator": hkl_expression(k)})
        if lab_axis and abs(angle - 180) < 1.0 and frame == "lab":
            return Finding("sign_flip", f"sign flip of lab {lab_axis}: q_pixel is q_bragg mirrored through the plane normal to {lab_axis}", {"axis": lab_axis, "angle_deg": angle})
        return Finding("mirror", f"a mirror (handedness) error: reflection through the plane normal to {_vec(axis)}", size)

    if crystal is not None and (frame == "scan_undone" or not rotation_data):
        k = _reindex_in_crystal_frame(m, experiment, frame)
        if k is not None:
            return Finding(
                "reindexing",
                f"Miller indices in a symmetry-equivalent setting ({angle:.1f}° about {_vec(axis)}): "
                f"reindex the table with h,k,l -> {hkl_expression(k)}",
                {**size, "operator": hkl_expression(k)},
            )
    if lab_axis and frame == "lab" and min(abs(angle - a) for a in (90, 180)) < 0.5:
        return Finding(
            "lab_axis_rotation",
            f"a constant {angle:.1f}° rotation about lab {lab_axis} (the data's q is the model's turned by "
            f"{angle * float(np.sign(axis @ LAB_AXES[lab_axis])):+.1f}° about lab {lab_axis}): "
            "a frame transform (such as goniometer to lab) applied where it should not be, or missing",
            {**size, "lab_axis": lab_axis, "signed_angle_deg": angle * float(np.sign(axis @ LAB_AXES[lab_axis]))},
        )
    if not rotation_data:
        return Finding("crystal_orientation", f"the crystal orientation is off by {angle:.3f}°: the data's is the model's "
                                              f"turned about lab {_vec(axis)}", size)
    gonio = experiment.goniometer
    S, F = gonio.setting_rotation, gonio.fixed_rotation
    if frame == "lab":
        if not np.allclose(S, np.eye(3)) and same_rotation(m @ S, np.eye(3), max(0.05, 0.01 * angle)):
            own_axis, own_angle = axis_angle(S)  # the model's S itself: the inverse of the fitted turn
            return Finding("extra_setting_rotation", f"an extra goniometer setting rotation: the model's S ({own_angle:.3f}° "
                                                     f"about {_vec(own_axis)}) should be the identity", size)
        if np.allclose(S, np.eye(3)):
            return Finding("missing_setting_rotation", f"a missing goniometer setting rotation: the data fit S = {angle:.3f}° about {_vec(axis)}", size)
        return Finding("setting_rotation", f"a wrong goniometer setting rotation: the data fit S' = M·S, M = {angle:.3f}° about {_vec(axis)}", size)
    datum = S.T @ m @ S  # the same rotation in the goniometer datum frame
    datum_axis, _ = axis_angle(datum)
    size = {"angle_deg": angle, "axis": datum_axis.tolist(), "frame": "goniometer datum"}
    if not np.allclose(F, np.eye(3)) and same_rotation(datum @ F, np.eye(3), max(0.05, 0.01 * angle)):
        own_axis, own_angle = axis_angle(F)
        return Finding("extra_fixed_rotation", f"an extra goniometer fixed rotation: the model's F ({own_angle:.3f}° about "
                                               f"{_vec(own_axis)}) should be the identity", size)
    if np.allclose(F, np.eye(3)) and gonio.kind == "multi-axis":
        return Finding("missing_fixed_rotation", f"a missing goniometer fixed rotation: the data fit F = {angle:.3f}° about {_vec(datum_axis)} (datum frame)", size)
    return Finding("crystal_orientation", f"the crystal orientation (U) is off by {angle:.3f}°: the data's is the model's "
                                          f"turned about {_vec(datum_axis)} (goniometer datum frame), or F is wrong", size)


def name_beam(fit) -> Finding:
    """The fitted beam direction (DIALS': from the sample towards the source, lab)."""
    size = {"angle_deg": fit["angle_deg"], "direction": fit["fitted_direction"], "model_direction": fit["model_direction"]}
    return Finding("beam_direction", f"the beam direction is off by {fit['angle_deg']:.3f}°: the spots fit a beam from "
                                     f"{_vec(fit['fitted_direction'], '.5f')}, the model's is {_vec(fit['model_direction'], '.5f')} "
                                     "(lab, sample to source)", size)


def name_rotation_axis(fit, experiment) -> Finding:
    """The fitted rotation axis, in the goniometer's datum frame (as the .expt
    gives it: the lab axis is S·e)."""
    setting = experiment.goniometer.setting_rotation
    fitted, model = (geometry.unit(setting.T @ np.asarray(fit[k])) for k in ("fitted_axis", "model_axis"))
    angle = fit["angle_deg"]
    size = {"angle_deg": angle, "axis": fitted.tolist(), "model_axis": model.tolist(), "frame": "goniometer datum"}
    if angle > 179.0:
        return Finding("rotation_axis", f"the rotation axis has the wrong sign: the reflections turn about {_vec(fitted)}, the "
                                        f"model's axis is {_vec(model)} (goniometer datum frame; dials.import "
                                        "geometry.goniometer.invert_rotation_axis=True)", size)
    return Finding("rotation_axis", f"the rotation axis is off by {angle:.3f}°: the reflections turn about {_vec(fitted)}, the "
                                    f"model's axis is {_vec(model)} (goniometer datum frame, as in the .expt)", size)


def _reindex_in_crystal_frame(m, experiment, frame):
    crystal = experiment.crystal
    if frame == "scan_undone":
        S, F = experiment.goniometer.setting_rotation, experiment.goniometer.fixed_rotation
        m = F.T @ S.T @ m @ S @ F
    return reindexing_operator(crystal.A, m)


def tilt_matters(p, panel) -> bool:
    """Is a fitted tilt a cause of its own: significant, and moving the panel's edge
    (half its diagonal from the centre) by a quarter of the fitted origin offset or
    more? (A small tilt fitted on a panel moved by millimetres is the fit's noise.)"""
    if p["tilt_deg"] <= MIN_TILT_DEG:
        return False
    half_diagonal = 0.5 * float(np.linalg.norm(panel.size_mm))
    return math.radians(p["tilt_deg"]) * half_diagonal >= TILT_OFFSET_RATIO * float(np.linalg.norm(p["origin_offset_mm"]))


def name_detector(fit, detector, beam_s0) -> list[Finding]:
    panels = fit["panels"]
    findings = []
    tilted = {i: p for i, p in panels.items() if tilt_matters(p, detector.panels[i])}
    flat = {i: p for i, p in panels.items() if i not in tilted}
    if tilted and (flat or len(panels) == 1):
        for i, p in tilted.items():
            findings.append(
                Finding(
                    "tilted_panel",
                    f"panel {i} ({p['name']}) is tilted by {p['tilt_deg']:.3f}° in the model relative to where its "
                    f"spots put it{_facing(p['tilt_deg'], 'its')}",
                    {"panel": i, "tilt_deg": p["tilt_deg"], "axis_fast_slow": p["tilt_axis_fast_slow"]},
                )
            )
    if tilted and not flat and len(panels) > 1:
        tilts = [p["tilt_deg"] for p in tilted.values()]
        every = "every panel" if len(panels) == len(detector.panels) else (
            f"every panel with spots enough to fit ({len(panels)} of {len(detector.panels)})")
        findings.append(Finding("detector_tilt", f"{every} is tilted by {np.mean(tilts):.3f}°"
                                                  f"{_facing(float(np.mean(tilts)), 'their')}",
                                {"tilt_deg": float(np.mean(tilts)), "panels": len(panels)}))
    if not flat:
        return findings
    offsets = np.array([p["origin_offset_mm"] for p in flat.values()])
    mean_offset = offsets.mean(axis=0)
    uniform = np.abs(offsets - mean_offset).max() < max(MIN_SHIFT_MM, 0.02 * np.linalg.norm(mean_offset))
    if not uniform:
        for i, p in flat.items():
            if np.linalg.norm(p["origin_offset_mm"]) > MIN_SHIFT_MM:
                findings.append(Finding("panel_shift", f"panel {i} ({p['name']}) is displaced by {_vec(p['origin_offset_mm'])} mm (model - data, lab)", {"panel": i, "offset_mm": p["origin_offset_mm"]}))
        return findings
    return findings + name_shift(mean_offset, detector, next(iter(flat)), beam_s0)


def _facing(tilt_deg, whose) -> str:
    """What a tilt of more than 90° is: the panel faces the other way."""
    if tilt_deg <= 90.0:
        return ""
    return (f": the model's panel faces the other way (is {whose} fast or slow axis reversed, or are the two "
            "swapped?)")


def beam_panel(detector, beam_s0) -> int:
    """The panel the direct beam meets (or, if none, the one it passes
    nearest, in mm beyond its edge): the beam centre is given along its axes."""
    def miss_mm(panel):
        x, y, w = np.linalg.solve(panel.d_matrix, geometry.unit(beam_s0))
        if w <= 0:  # the beam runs away from the panel's plane
            return np.inf
        beyond = np.maximum(np.maximum(-np.array([x / w, y / w]), np.array([x / w, y / w]) - panel.size_mm), 0.0)
        return float(np.hypot(*beyond))

    misses = [miss_mm(panel) for panel in detector.panels]
    return int(np.argmin(misses)) if np.isfinite(min(misses)) else 0


def name_shift(offset, detector, index, beam_s0) -> list[Finding]:
    """One translation of the whole detector (``offset``: model - data, lab mm):
    along the beam a distance error, across it a beam-centre shift, given along
    panel ``index``'s fast and slow axes. The larger part comes first; a part
    under MIN_SHIFT_MM, or under SHIFT_PART_RATIO of the other, is not named
    (a shift across a beam 0.003 off the z axis has a 0.003 mm part along it)."""
    findings = []
    along_beam = geometry.unit(beam_s0)
    distance = float(offset @ along_beam)
    across = offset - distance * along_beam
    across_mm = float(np.linalg.norm(across))
    if abs(distance) > max(MIN_SHIFT_MM, SHIFT_PART_RATIO * across_mm):
        message = f"the detector distance is off by {distance:+.3f} mm (model - data)"
        panel = detector.panels[index]
        facing = float(along_beam @ panel.normal)
        if abs(facing) > 1e-6:  # the beam meets the panel's plane
            reach = float(panel.origin @ panel.normal) / facing  # sample to the plane along the beam, mm (model)
            if reach * (reach - distance) <= 0:  # the data's plane on the other side of the sample
                message += (f", more than the distance itself ({abs(reach):.1f} mm): is the beam direction, or a "
                            "detector axis, reversed in the model?")
        findings.append(Finding("detector_distance", message, {"distance_mm": distance}))
    if across_mm > max(MIN_SHIFT_MM, SHIFT_PART_RATIO * abs(distance)):
        panel = detector.panels[index]
        beam_centre = [-float(across @ panel.fast), -float(across @ panel.slow)]
        findings.append(
            Finding(
                "beam_centre_shift",
                f"the detector is shifted across the beam by {_vec(across)} mm (lab, model - data): the beam centre "
                f"is off by ({beam_centre[0]:+.3f}, {beam_centre[1]:+.3f}) mm along panel {index}'s (fast, slow)",
                {"offset_lab_mm": across.tolist(), "beam_centre_mm": beam_centre},
            )
        )
    return sorted(findings, key=lambda f: -abs(f.size.get("distance_mm", across_mm)))


def _vec(v, spec=".3f") -> str:
    return "(" + ", ".join(format(float(x), spec) for x in v) + ")"

