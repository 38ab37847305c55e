"""Name the mistake behind a large Δq: frame, units, wavelength, indexing or detector.

Candidate explanations are fitted to the used rows and the best one that
explains most of the residual is named with its size:

* a constant rotation (SVD / Kabsch) taking q_bragg onto q_pixel in the lab
  frame, and for rotation data also in the frame with the scan rotation
  undone (v = R(S·e, -φ)·q), proper and improper (a mirror = a sign flip);
* an isotropic scale q_pixel ≈ s·q_bragg (2π units, wavelength or cell);
* per panel, the detector plane that the spots say is right (a direct linear
  fit of [fast | slow | origin] to the model's rays), which names a distance
  error, a beam-centre shift or a tilted panel.

Rotations and scale are judged on the whole Δq; the detector fit on the
in-detector-plane part (model spot vs q_pixel spot, see
:mod:`decomposition`). All vectors in the lab frame, Å⁻¹; lengths in mm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from dials_qconsistency.core import geometry
from dials_qconsistency.core.statistics import row_distances, sample_rows
from dials_qconsistency.core.blocks import rows_by_group
from dials_qconsistency.core.decomposition import onto_sphere

#: A fit must leave at most this fraction of the RMS residual to name a cause.
EXPLAINED_RATIO = 0.5
#: The fits of one scope use at most this many rows (an even sample): plenty
#: for a rotation, a scale or a panel's tilt, and 10M rows stay within memory.
MAX_REFLECTIONS = 250_000
#: Simplest first: which explanation is named when several fit equally well.
PREFERENCE = ("scale", "rotation_lab", "mirror_lab", "rotation_scan_undone", "mirror_scan_undone", "detector")
#: Below this RMS |Δq| (Å⁻¹) the model is consistent to rounding.
ROUNDING = 1e-9
MIN_ANGLE_DEG = 0.005
MIN_SCALE = 1e-5
MIN_SHIFT_MM = 0.002
MIN_TILT_DEG = 0.01
TILT_OFFSET_RATIO = 0.25
MIN_PANEL_ROWS = 8
LAB_AXES = {"X": np.array([1.0, 0, 0]), "Y": np.array([0, 1.0, 0]), "Z": np.array([0, 0, 1.0])}


@dataclass
class Finding:
    mistake: str  # a stable key, e.g. "sign_flip", "two_pi", "beam_centre_shift"
    message: str
    size: dict


@dataclass
class Diagnosis:
    scope: str  # "pooled" or "experiment N"
    n: int
    rms_delta_q: float | None  # over all n rows
    consistent: bool
    fitted: int = 0  # rows the fits used: n, or an even sample of at most max_reflections
    rms_in_plane_before: float | None = None  # RMS |spot(q_bragg) - q_pixel|, the measure fits are judged on
    fits: dict = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# --- fitting primitives -----------------------------------------------------------


def kabsch(p, q, proper=True) -> np.ndarray:
    """Orthogonal M minimising Σ|M·p - q|²: det +1 (proper) or -1 (improper)."""
    u, _, vt = np.linalg.svd(np.asarray(p).T @ np.asarray(q))
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    return vt.T @ np.diag([1.0, 1.0, d if proper else -d]) @ u.T


def axis_angle(rotation) -> tuple[np.ndarray, float]:
    """Unit axis and angle (degrees, 0..180) of a proper rotation matrix."""
    r = np.asarray(rotation)
    w = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    cos_angle = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    sin_angle = np.linalg.norm(w) / 2.0
    angle = math.degrees(math.atan2(sin_angle, cos_angle))
    if sin_angle > 1e-6:
        return w / np.linalg.norm(w), angle
    if cos_angle > 0:
        return np.array([0.0, 0.0, 1.0]), angle
    outer = (r + np.eye(3)) / 2.0  # = a·aᵀ for a half turn
    column = outer[:, int(np.argmax(np.diag(outer)))]
    return column / np.linalg.norm(column), 180.0


def scale_fit(p, q) -> float:
    """s minimising Σ|s·p - q|²."""
    return float(np.sum(p * q) / np.sum(p * p))


def _rms(vectors) -> float:
    return float(np.sqrt(np.mean(np.sum(np.asarray(vectors) ** 2, axis=-1))))


def lab_axis_name(axis, tolerance_deg=1.0) -> str | None:
    for name, lab in LAB_AXES.items():
        if math.degrees(math.acos(min(1.0, abs(float(axis @ lab))))) < tolerance_deg:
            return name
    return None


def _same_rotation(a, b, tolerance_deg=0.05) -> bool:
    return axis_angle(a @ b.T)[1] < tolerance_deg


def reindexing_operator(A, rotation_in_A_frame) -> np.ndarray | None:
    """Integer K with A·K = M·A (M a rotation or mirror in the frame of A): h_true = K·h_table."""
    k = np.linalg.inv(A) @ rotation_in_A_frame @ A
    rounded = np.round(k)
    if np.abs(k - rounded).max() < 0.02 and abs(abs(np.linalg.det(rounded)) - 1) < 1e-6 and not np.allclose(rounded, np.eye(3)):
        return rounded.astype(int)
    return None


def hkl_expression(k) -> str:
    """'k,h,-l'-style text for h' = K·h (h, k, l of the table)."""
    letters = "hkl"
    terms = []
    for row in np.asarray(k, dtype=int):
        text = ""
        for coefficient, letter in zip(row, letters):
            if coefficient == 0:
                continue
            sign = "-" if coefficient < 0 else ("+" if text else "")
            magnitude = "" if abs(coefficient) == 1 else str(abs(coefficient))
            text += f"{sign}{magnitude}{letter}"
        terms.append(text or "0")
    return ",".join(terms)


def fit_panel(xy_mm, rays) -> np.ndarray | None:
    """The panel frame D = [fast | slow | origin] with D·(x, y, 1) ∥ ray (direct linear fit).

    Points are normalised first (Hartley); |fast| and |slow| average to 1 so
    that D is in mm. Returns None for too few or degenerate points.
    """
    xy = np.asarray(xy_mm, dtype=float)
    if len(xy) < MIN_PANEL_ROWS:
        return None
    centre = xy.mean(axis=0)
    spread = np.sqrt(np.mean(np.sum((xy - centre) ** 2, axis=1))) or 1.0
    t = np.array([[1 / spread, 0, -centre[0] / spread], [0, 1 / spread, -centre[1] / spread], [0, 0, 1.0]])
    u = np.column_stack([xy, np.ones(len(xy))]) @ t.T
    r = geometry.unit(rays)
    zero = np.zeros_like(u)
    rows = np.concatenate(
        [
            np.hstack([zero, r[:, 2:3] * u, -r[:, 1:2] * u]),
            np.hstack([-r[:, 2:3] * u, zero, r[:, 0:1] * u]),
            np.hstack([r[:, 1:2] * u, -r[:, 0:1] * u, zero]),
        ]
    )
    _, singular, vt = np.linalg.svd(rows, full_matrices=False)
    if singular[-2] < 1e-9 * singular[0]:
        return None
    d = vt[-1].reshape(3, 3) @ t
    d /= 0.5 * (np.linalg.norm(d[:, 0]) + np.linalg.norm(d[:, 1]))
    if np.mean(geometry.rowdot(geometry.matvec(d, np.column_stack([xy, np.ones(len(xy))])), r)) < 0:
        d = -d
    return d


# --- the candidates -----------------------------------------------------------------


def refine_map(matrix, spot_residuals, iterations=8):
    """Gauss-Newton on a small rotation ω: M = M0·R(ω) minimising |spot_residuals(M)|².

    Kabsch fits lattice points; spots constrain a rotation differently (a turn
    in the scattering plane moves Δψ, not the spot), so the map is refined on
    the spots themselves.
    """
    m = np.asarray(matrix, dtype=float)
    step = 1e-7
    for _ in range(iterations):
        f0 = spot_residuals(m)
        jacobian = np.column_stack(
            [(spot_residuals(m @ geometry.rotation_matrix(axis, step)) - f0) / step for axis in np.eye(3)]
        )
        omega = np.linalg.lstsq(jacobian, -f0, rcond=None)[0]
        angle = float(np.linalg.norm(omega))
        if angle < 1e-13:
            break
        m = m @ geometry.rotation_matrix(omega / angle, angle)
    return m


def _rotation_candidates(q_bragg, q_pixel, frame, spot_error, spot_residuals):
    """Proper and improper best maps in a frame: Kabsch, then refined on the spots."""
    out = {}
    for proper in (True, False):
        m = refine_map(kabsch(q_bragg, q_pixel, proper), lambda matrix: spot_residuals(matrix, frame))
        key = f"{'rotation' if proper else 'mirror'}_{frame}"
        entry = {
            "matrix": m.tolist(),
            "rms_delta_q_after": _rms(q_bragg @ m.T - q_pixel),
            "rms_after": spot_error(m, frame),
        }
        axis, angle = axis_angle(m if proper else -m)
        entry.update({"axis": axis.tolist(), "angle_deg": angle})
        out[key] = entry
    return out


def _undo_scan_rotation(q, rotation_axis, phi):
    return geometry.rotate_about(q, rotation_axis, -phi)


def _detector_candidate(detector, xy, panel, rays, q_spot, q_pixel, s0, q_bragg):
    """Per-panel plane fits; RMS of the in-plane q residual (q_spot - q_pixel) before and after."""
    q_after = np.full(q_spot.shape, np.nan)
    panels = {}
    finite = np.all(np.isfinite(rays), axis=1) & np.all(np.isfinite(xy), axis=1)
    for index in np.unique(panel[finite]):
        mine = (panel == index) & finite
        d = fit_panel(xy[mine], rays[mine])
        if d is None:
            continue
        model = detector.panels[int(index)]
        lab = geometry.matvec(d, np.column_stack([xy[mine], np.ones(int(mine.sum()))]))
        q_after[mine] = geometry.q_from_lab_position(lab, s0[mine])
        normal_fit = geometry.unit(np.cross(d[:, 0], d[:, 1]))
        normal_model = geometry.unit(model.normal)
        tilt_axis = np.cross(normal_model, normal_fit)
        tilt = math.degrees(math.atan2(np.linalg.norm(tilt_axis), float(normal_model @ normal_fit)))
        offset = model.origin - d[:, 2]
        panels[int(index)] = {
            "name": model.name,
            "n": int(mine.sum()),
            "tilt_deg": tilt,
            "tilt_axis_fast_slow": [float(tilt_axis @ model.fast), float(tilt_axis @ model.slow)],
            "origin_offset_mm": offset.tolist(),  # model origin - fitted origin (lab)
            "distance_mm": float(offset @ normal_model),
            "in_plane_mm": [float(offset @ model.fast), float(offset @ model.slow)],
        }
    fitted = np.all(np.isfinite(q_after), axis=1)
    if not fitted.any():
        return None
    return {
        "panels": panels,
        "fitted_rows": int(fitted.sum()),
        "rms_before": _rms(q_spot[fitted] - q_pixel[fitted]),
        "rms_after": _rms(q_spot[fitted] - q_after[fitted]),
        "rms_delta_q_after": _rms(q_bragg[fitted] - q_after[fitted]),
    }


def _name_scale(fit, experiment) -> Finding:
    s = fit["scale"]
    two_pi = 2 * math.pi
    if abs(s / two_pi - 1) < 0.005:
        return Finding("two_pi", f"q_pixel = {s:.4f} × q_bragg: a factor 2π (q_bragg lacks it, or q_pixel has it)", {"scale": s})
    if abs(s * two_pi - 1) < 0.005:
        return Finding("two_pi", f"q_pixel = q_bragg / {1 / s:.4f}: a factor 2π (q_bragg has it, or q_pixel lacks it)", {"scale": s})
    size = {"scale": s}
    text = f"an isotropic scale q_pixel = {s:.5f} × q_bragg: a wrong wavelength or cell"
    if experiment is not None and experiment.beam is not None:
        size["wavelength_fit"] = s * experiment.beam.wavelength
        size["wavelength_model"] = experiment.beam.wavelength
        text += f" (the spots fit λ = {s * experiment.beam.wavelength:.5f} Å, the model has {experiment.beam.wavelength:.5f} Å)"
    return Finding("wavelength_or_cell_scale", text, size)


# --- naming -------------------------------------------------------------------------------


def _name_rotation(key, fit, experiment):
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
            f"a constant {angle:.1f}° rotation about lab {lab_axis} (sign {'+' if axis @ LAB_AXES[lab_axis] > 0 else '-'}): "
            "a frame transform (such as goniometer to lab) applied where it should not be, or missing",
            {**size, "lab_axis": lab_axis, "signed_angle_deg": angle * float(np.sign(axis @ LAB_AXES[lab_axis]))},
        )
    if not rotation_data:
        return Finding("crystal_orientation", f"the crystal orientation is off by {angle:.3f}° about lab {_vec(axis)}", size)
    gonio = experiment.goniometer
    S, F = gonio.setting_rotation, gonio.fixed_rotation
    if frame == "lab":
        if not np.allclose(S, np.eye(3)) and _same_rotation(m @ S, np.eye(3), max(0.05, 0.01 * angle)):
            return Finding("extra_setting_rotation", f"an extra goniometer setting rotation: the model's S ({angle:.3f}° about {_vec(axis)}) should be the identity", size)
        if np.allclose(S, np.eye(3)):
            return Finding("missing_setting_rotation", f"a missing goniometer setting rotation: the data fit S = {angle:.3f}° about {_vec(axis)}", size)
        return Finding("setting_rotation", f"a wrong goniometer setting rotation: the data fit S' = M·S, M = {angle:.3f}° about {_vec(axis)}", size)
    datum = S.T @ m @ S  # the same rotation in the goniometer datum frame
    datum_axis, _ = axis_angle(datum)
    size = {"angle_deg": angle, "axis": datum_axis.tolist(), "frame": "goniometer datum"}
    if not np.allclose(F, np.eye(3)) and _same_rotation(datum @ F, np.eye(3), max(0.05, 0.01 * angle)):
        return Finding("extra_fixed_rotation", f"an extra goniometer fixed rotation: the model's F ({angle:.3f}°) should be the identity", size)
    if np.allclose(F, np.eye(3)) and gonio.kind == "multi-axis":
        return Finding("missing_fixed_rotation", f"a missing goniometer fixed rotation: the data fit F = {angle:.3f}° about {_vec(datum_axis)} (datum frame)", size)
    return Finding("crystal_orientation", f"the crystal orientation (U) is off by {angle:.3f}° about {_vec(datum_axis)} (goniometer datum frame), or F is wrong", size)


def _reindex_in_crystal_frame(m, experiment, frame):
    crystal = experiment.crystal
    if frame == "scan_undone":
        S, F = experiment.goniometer.setting_rotation, experiment.goniometer.fixed_rotation
        m = F.T @ S.T @ m @ S @ F
    return reindexing_operator(crystal.A, m)


def _tilt_matters(p, panel) -> bool:
    """Is a fitted tilt a cause of its own: significant, and moving the panel's edge
    (half its diagonal from the centre) by a quarter of the fitted origin offset or
    more? (A small tilt fitted on a panel moved by millimetres is the fit's noise.)"""
    if p["tilt_deg"] <= MIN_TILT_DEG:
        return False
    half_diagonal = 0.5 * float(np.linalg.norm(np.asarray(panel.image_size) * np.asarray(panel.pixel_size)))
    return math.radians(p["tilt_deg"]) * half_diagonal >= TILT_OFFSET_RATIO * float(np.linalg.norm(p["origin_offset_mm"]))


def _name_detector(fit, detector, beam_s0) -> list[Finding]:
    panels = fit["panels"]
    findings = []
    tilted = {i: p for i, p in panels.items() if _tilt_matters(p, detector.panels[i])}
    flat = {i: p for i, p in panels.items() if i not in tilted}
    if tilted and (flat or len(panels) == 1):
        for i, p in tilted.items():
            findings.append(
                Finding(
                    "tilted_panel",
                    f"panel {i} ({p['name']}) is tilted by {p['tilt_deg']:.3f}° in the model relative to where its spots put it",
                    {"panel": i, "tilt_deg": p["tilt_deg"], "axis_fast_slow": p["tilt_axis_fast_slow"]},
                )
            )
    if tilted and not flat and len(panels) > 1:
        tilts = [p["tilt_deg"] for p in tilted.values()]
        findings.append(Finding("detector_tilt", f"every panel is tilted by {np.mean(tilts):.3f}°", {"tilt_deg": float(np.mean(tilts))}))
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
    # one translation t of the whole detector: along the beam it is a distance error, across it a beam-centre shift
    along_beam = geometry.unit(beam_s0)
    distance = float(mean_offset @ along_beam)
    across = mean_offset - distance * along_beam
    if abs(distance) > MIN_SHIFT_MM:
        findings.append(Finding("detector_distance", f"the detector distance is off by {distance:+.3f} mm (model - data)", {"distance_mm": distance}))
    if np.linalg.norm(across) > MIN_SHIFT_MM:
        first = detector.panels[next(iter(flat))]
        beam_centre = [-float(across @ first.fast), -float(across @ first.slow)]
        findings.append(
            Finding(
                "beam_centre_shift",
                f"the detector is shifted across the beam by {_vec(across)} mm (lab, model - data): the beam centre "
                f"is off by ({beam_centre[0]:+.3f}, {beam_centre[1]:+.3f}) mm along panel {next(iter(flat))}'s (fast, slow)",
                {"offset_lab_mm": across.tolist(), "beam_centre_mm": beam_centre},
            )
        )
    return findings


def _vec(v, spec=".3f") -> str:
    return "(" + ", ".join(format(float(x), spec) for x in v) + ")"


# --- the driver -------------------------------------------------------------------------


def _significant(key, fit) -> bool:
    if key.startswith("rotation"):
        return fit["angle_deg"] > MIN_ANGLE_DEG
    if key.startswith("mirror"):
        return True
    if key == "scale":
        return abs(fit["scale"] - 1) > MIN_SCALE
    if key == "detector":
        return any(
            p["tilt_deg"] > MIN_TILT_DEG or np.linalg.norm(p["origin_offset_mm"]) > MIN_SHIFT_MM for p in fit["panels"].values()
        )
    return False


def diagnose_rows(scope, experiment, result, parts, rows, same_detector=None, max_reflections=None) -> Diagnosis:
    """Fit every candidate over the selected rows (a boolean mask, or row
    numbers in ascending order) and name the best one.

    ``experiment`` is the one experiment of the scope (None when pooled);
    ``same_detector`` is the detector shared by all experiments pooled, if any.
    The fits use at most ``max_reflections`` rows (:func:`sample_rows`), so
    that their temporaries stay small whatever the table; the RMS |Δq| of the
    scope is over all its rows, a block at a time.
    """
    rows = sample_rows(rows, None)  # row numbers
    n = rows.size
    rms = float(np.sqrt(np.mean(row_distances(result.q_bragg, result.q_pixel, rows) ** 2))) if n else None
    rows = sample_rows(rows, max_reflections)
    q_bragg, q_pixel = result.q_bragg[rows], result.q_pixel[rows]
    diagnosis = Diagnosis(scope, n, rms, consistent=True, fitted=int(rows.size))
    if n < 3 or rms is None or rms < ROUNDING:
        return diagnosis
    # Every candidate is judged on the same measure: the RMS distance between
    # q_pixel and the model's spot (q_bragg, mapped by the candidate, rotated
    # onto the Ewald sphere by Δφ or Δψ), so that the part of Δq that belongs
    # to the angular position (Δψ of stills, Δφ) does not hide a cause.
    s0, axis, phi = result.s0[rows], result.rotation_axis[rows], result.phi[rows]
    undo = lambda q: _undo_scan_rotation(q, axis, phi)  # noqa: E731
    redo = lambda q: geometry.rotate_about(q, axis, phi)  # noqa: E731

    def spot_residuals(matrix, frame="lab"):
        mapped = q_bragg @ matrix.T if frame == "lab" else redo(undo(q_bragg) @ matrix.T)
        on_sphere = onto_sphere(mapped, s0, axis)[1]
        # a point that never reaches the sphere keeps its whole distance
        on_sphere = np.where(np.isfinite(on_sphere), on_sphere, mapped)
        return (on_sphere - q_pixel).ravel()

    def spot_error(matrix, frame="lab"):
        return float(np.sqrt(np.mean(spot_residuals(matrix, frame) ** 2) * 3))

    before = spot_error(np.eye(3))
    diagnosis.rms_in_plane_before = before
    if before < ROUNDING:
        return diagnosis
    fits = _rotation_candidates(q_bragg, q_pixel, "lab", spot_error, spot_residuals)
    if experiment is not None and experiment.is_rotation:
        fits.update(_rotation_candidates(undo(q_bragg), undo(q_pixel), "scan_undone", spot_error, spot_residuals))
    scale = scale_fit(q_bragg, q_pixel)
    fits["scale"] = {"scale": scale, "rms_delta_q_after": _rms(scale * q_bragg - q_pixel), "rms_after": spot_error(scale * np.eye(3))}
    for fit in fits.values():
        fit["rms_before"] = before
    detector = experiment.detector if experiment is not None else same_detector
    if detector is not None and parts is not None:
        spot = parts.q_sphere[rows]
        fit = _detector_candidate(detector, result.position_mm[rows], result.panel[rows], s0 + spot, spot, q_pixel, s0, q_bragg)
        if fit is not None and fit["rms_before"] > ROUNDING:
            fits["detector"] = fit
    diagnosis.fits = fits

    def ratio(fit):
        return fit["rms_after"] / fit["rms_before"] if fit["rms_before"] > 0 else 1.0

    limit = EXPLAINED_RATIO
    ranked = sorted((ratio(fit), PREFERENCE.index(key), key) for key, fit in fits.items() if _significant(key, fit))
    if ranked:
        # Among explanations that fit the spots as well as the best one, the one
        # closest in q itself wins (stills' spots cannot tell q_z from -q_z), then
        # the simplest (a mirrored crystal also fits as flipped panels).
        best = ranked[0][0]
        ties = [(r, order, key) for r, order, key in ranked if r <= 10 * best + 1e-6]
        closest = min(fits[key]["rms_delta_q_after"] for _, _, key in ties)
        ties = [t for t in ties if fits[t[2]]["rms_delta_q_after"] <= 1.5 * closest + ROUNDING]
        ranked = sorted(ties, key=lambda t: t[1])
    if not ranked or ranked[0][0] > limit:
        return diagnosis
    best_ratio, _, key = ranked[0]
    fit = fits[key]
    diagnosis.consistent = False
    if key == "scale":
        findings = [_name_scale(fit, experiment)]
    elif key == "detector":
        findings = _name_detector(fit, detector, s0.mean(axis=0))
    else:
        findings = [_name_rotation(key, fit, experiment)]
    for finding in findings:
        finding.size["explained"] = 1.0 - best_ratio**2
        finding.size["rms_after_fit"] = fit["rms_after"]
    diagnosis.findings = findings
    return diagnosis


def _shared_detector(experiments, indices):
    detectors = [experiments[int(i)].detector for i in indices]
    first = detectors[0]
    for other in detectors[1:]:
        if other is first:
            continue
        if len(other.panels) != len(first.panels) or any(
            not np.allclose(a.d_matrix, b.d_matrix, atol=1e-9) for a, b in zip(first.panels, other.panels)
        ):
            return None
    return first


def diagnose(experiments, result, parts, max_reflections=MAX_REFLECTIONS) -> list[Diagnosis]:
    """Pooled diagnosis (lab-frame candidates) then one per experiment with used
    rows; each fitted on at most ``max_reflections`` rows."""
    used = result.used
    groups = rows_by_group(result.experiment, len(experiments), used)
    indices = np.array([i for i, rows in enumerate(groups) if rows.size], dtype=np.int64)
    each = [
        diagnose_rows(f"experiment {int(i)}", experiments[int(i)], result, parts, groups[i], max_reflections=max_reflections)
        for i in indices
    ]
    if indices.size == 0:
        return []
    if indices.size == 1:
        return [Diagnosis(**{**each[0].__dict__, "scope": "pooled"})] + each
    pooled = diagnose_rows("pooled", None, result, parts, used, _shared_detector(experiments, indices), max_reflections)
    named = {f.mistake for d in each for f in d.findings}
    if named and {f.mistake for f in pooled.findings} != named:
        # a pooled fit of what the experiments share (the detector, the wavelength) is
        # better determined by all their spots than by the few of one still, where a
        # distance error and a scale look alike; a mistake every experiment names alike
        # (copies of one mistaken model) speaks for all when it explains more
        common = _common_finding(each)
        shared = bool(pooled.findings) and all(f.mistake in SHARED_MISTAKES for f in pooled.findings)
        pooled_explained = max((f.size.get("explained", 0.0) for f in pooled.findings), default=0.0)
        if common is not None and (not shared or common.size["explained"] > pooled_explained):
            pooled.consistent, pooled.findings = False, [common]
        elif not shared:
            # a pooled fit may mix different per-crystal causes into one map: trust the experiments
            pooled.consistent = False
            pooled.findings = [
                Finding("no_common_cause", "the experiments are diagnosed differently: see each experiment",
                        {"named": sorted(named)})
            ]
    return [pooled] + each


#: Mistakes of models the experiments share: a pooled fit of these speaks for all.
SHARED_MISTAKES = {"detector_distance", "beam_centre_shift", "tilted_panel", "detector_tilt", "panel_shift",
                   "wavelength_or_cell_scale", "two_pi"}

#: Sizes that must agree (relative, or absolute near zero) for one finding to speak for all experiments.
SAME_SIZE = 0.01


def _common_finding(each) -> Finding | None:
    """The finding every experiment names alike (one mistake, sizes within 1%), as
    a pooled one: what copies of one mistaken model in every experiment give."""
    if not all(len(d.findings) == 1 for d in each):
        return None
    first = each[0].findings[0]
    for diagnosis in each[1:]:
        other = diagnosis.findings[0]
        if other.mistake != first.mistake:
            return None
        for key, value in first.size.items():
            if key in ("explained", "rms_after_fit") or not isinstance(value, (int, float)):
                continue
            if abs(other.size.get(key, np.inf) - value) > SAME_SIZE * max(abs(value), 1e-3):
                return None
    explained = min(d.findings[0].size["explained"] for d in each)
    size = {**first.size, "explained": explained, "experiments": len(each)}
    return Finding(first.mistake, f"every experiment: {first.message}", size)
