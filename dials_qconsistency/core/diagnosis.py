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
from dials_qconsistency.core.blocks import for_each_block
from dials_qconsistency.core.row_statistics import row_distances, sample_rows
from dials_qconsistency.core.decomposition import onto_sphere
from dials_qconsistency.core.panels import panel_lab_points
from dials_qconsistency.core.findings import (
    MIN_ANGLE_DEG,
    MIN_SCALE,
    MIN_SHIFT_MM,
    MIN_TILT_DEG,
    ROUNDING,
    Finding,
    MIN_FLIGHT_PATH_MM,
    beam_panel,
    name_beam,
    name_detector,
    name_shift,
    name_time_of_flight,
    name_rotation,
    name_rotation_axis,
    name_scale,
    with_wavelength,
    as_cell_scale,
)
from dials_qconsistency.core.time_of_flight import (
    US_PER_ANGSTROM_MM,
    bragg_wavelength_ratio,
    polychromatic_rows,
    row_wavelengths,
)
from dials_qconsistency.core.fits import (
    MIN_PANEL_ROWS,
    fit_rotation_axis,
    time_of_flight_fit,
    axis_angle,
    fit_panel,
    kabsch,
    refine_map,
    vector_rms,
    scale_fit,
)

#: A fit must leave at most this fraction of the RMS residual to name a cause.
EXPLAINED_RATIO = 0.5
#: A fit that leaves more is kept as the scope's partial fit when its F statistic
#: (what it removes per parameter over what it leaves per degree of freedom) is
#: at least this: the refined real pairs' best fits, observed positions, reach 24.
F_PARTIAL = 50.0
#: ... and when it explains at least this share of the squared residual: on a
#: large table a trifle is significant (F grows with the rows).
MIN_EXPLAINED = 0.05
#: The fits of one scope use at most this many rows (an even sample): plenty
#: for a rotation, a scale or a panel's tilt, and 10M rows stay within memory.
MAX_REFLECTIONS = 250_000
#: Simplest first: which explanation is named when several fit equally well.
PREFERENCE = ("scale", "rotation_lab", "mirror_lab", "rotation_scan_undone", "mirror_scan_undone", "rotation_axis",
              "detector_shift", "beam_direction", "detector")  # a beam-centre error is the likelier of its look-alikes


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
    # where nothing is named: the best fit all the same when it is significant
    # against what it leaves (F_PARTIAL), its sizes with "explained" and "f"
    partial: list[Finding] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# --- the candidates -----------------------------------------------------------------


#: Free parameters of a panel's plane fit (D up to scale), of a shift of the
#: whole detector and of a map.
PANEL_PARAMETERS, SHIFT_PARAMETERS, ROTATION_PARAMETERS, SCALE_PARAMETERS, AXIS_PARAMETERS = 8, 3, 3, 1, 2
BEAM_PARAMETERS = 2


def _rotation_candidates(q_bragg, q_pixel, frame, spot_error, spot_residuals):
    """Proper and improper best maps in a frame: Kabsch, then refined on the spots."""
    out = {}
    for proper in (True, False):
        m = refine_map(kabsch(q_bragg, q_pixel, proper), lambda matrix: spot_residuals(matrix, frame))
        key = f"{'rotation' if proper else 'mirror'}_{frame}"
        entry = {
            "matrix": m.tolist(),
            "rms_delta_q_after": vector_rms(q_bragg @ m.T - q_pixel),
            "rms_after": spot_error(m, frame),
            "parameters": ROTATION_PARAMETERS,
        }
        axis, angle = axis_angle(m if proper else -m)
        entry.update({"axis": axis.tolist(), "angle_deg": angle})
        out[key] = entry
    return out


def _beam_candidate(q_bragg, q_pixel, s0, axis, iterations=6, search_rows=20000) -> dict:
    """The beam direction that puts the model's spots on the data's: s0 (Å⁻¹,
    lab, one vector or one per row) turned by the two small angles
    perpendicular to it, its length kept. Each spot's s1 (its pixel's
    direction) stays, so q_pixel moves by s0 - s0', and the model's spot meets
    the sphere of s0'. Gauss-Newton on an even sample of ``search_rows`` (two
    parameters), then judged on every row as the other candidates are."""
    s0 = np.broadcast_to(np.asarray(s0, dtype=float), q_bragg.shape)
    beam = geometry.unit(s0.mean(axis=0))
    u1 = geometry.unit(np.cross(beam, [1.0, 0, 0] if abs(beam[0]) < 0.9 else [0, 1.0, 0]))
    basis = (u1, np.cross(beam, u1))

    def residuals(turn, rows):
        turned = geometry.apply_matrix(turn, s0[rows])
        spot = onto_sphere(q_bragg[rows], turned, axis if axis.ndim == 1 else axis[rows])[1]
        moved = q_pixel[rows] + s0[rows] - turned
        return np.where(np.isfinite(spot), spot, q_bragg[rows]) - moved, moved

    sample = np.unique(np.linspace(0, len(q_bragg) - 1, min(len(q_bragg), search_rows)).astype(np.int64))
    turn = np.eye(3)
    r = residuals(turn, sample)[0].ravel()
    cost = float(r @ r)
    step = 1e-7  # rad: a numerical derivative well above rounding, far below any tilt named
    for _ in range(iterations):
        jacobian = np.column_stack([(residuals(geometry.rotation_matrix(u, step) @ turn, sample)[0].ravel() - r) / step
                                    for u in basis])
        if not np.all(np.isfinite(jacobian)):
            break
        omega = np.linalg.lstsq(jacobian, -r, rcond=None)[0]
        angle = float(np.hypot(*omega))
        if angle < 1e-13:
            break
        trial = geometry.rotation_matrix((omega[0] * basis[0] + omega[1] * basis[1]) / angle, angle) @ turn
        r1 = residuals(trial, sample)[0].ravel()
        if not float(r1 @ r1) < cost:
            break
        turn, r, cost = trial, r1, float(r1 @ r1)
    every = np.arange(len(q_bragg))
    left, moved = residuals(turn, every)
    fitted = geometry.unit(geometry.apply_matrix(turn, beam))
    return {
        # DIALS' beam direction: from the sample towards the source, -s0/|s0|
        "model_direction": (-beam).tolist(), "fitted_direction": (-fitted).tolist(),
        "angle_deg": math.degrees(math.acos(float(np.clip(beam @ fitted, -1.0, 1.0)))),
        "rms_after": float(np.sqrt(np.mean(left**2) * 3)),
        "rms_delta_q_after": vector_rms(q_bragg - moved),
        "parameters": BEAM_PARAMETERS,
    }


def _shift_candidate(lab, rays, q_spot, q_pixel, s0, q_bragg):
    """One translation t of the whole detector (every panel alike): the one
    that puts each spot's lab point x (model panels, mm) on its model ray r,
    least squares in angle: t = -(Σ P/|x|²)⁻¹ Σ P·x/|x|², P = I - r̂r̂ᵀ, exact
    when the spots fit a shifted detector. Needs no spots per panel, so it
    tells a distance or beam-centre error on many panels of few spots each."""
    rows = geometry.finite_rows(rays) & geometry.finite_rows(lab)
    if rows.sum() < MIN_PANEL_ROWS:
        return None
    x, r = lab[rows], geometry.unit(rays[rows])
    weight = 1.0 / geometry.rowdot(x, x)
    weighted_r = r * weight[:, None]
    normal = weight.sum() * np.eye(3) - weighted_r.T @ r  # Σ w·P, without the (n, 3, 3) P
    if np.linalg.cond(normal) > 1e12:
        return None
    shift = -np.linalg.solve(normal, weight @ x - geometry.rowdot(r, x) @ weighted_r)  # Σ w·P·x
    q_after = geometry.q_from_lab_position(x + shift, s0[rows])
    return {
        "origin_offset_mm": (-shift).tolist(),  # model - data, lab, as a panel's origin_offset_mm
        "fitted_rows": int(rows.sum()),
        "rows": int(rows.sum()),  # the rows its RMS is over
        "rms_before": vector_rms(q_spot[rows] - q_pixel[rows]),
        "rms_after": vector_rms(q_spot[rows] - q_after),
        "rms_delta_q_after": vector_rms(q_bragg[rows] - q_after),
        "parameters": SHIFT_PARAMETERS,
    }


def _detector_candidate(detector, xy, panel, rays, q_spot, q_pixel, s0, q_bragg):
    """Per-panel plane fits; RMS of the in-plane q residual (q_spot - q_pixel)
    before and after, over every row with a position: a panel with too few
    spots to fit keeps its model (its rows their residual), so that a fit of a
    few panels is judged on the whole scope, as the other candidates are."""
    finite = geometry.finite_rows(rays) & geometry.finite_rows(xy)
    q_after = np.where(finite[:, None], q_pixel, np.nan)
    panels = {}
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
    if not panels:
        return None
    rows = geometry.finite_rows(q_after)
    return {
        "panels": panels,
        "fitted_rows": sum(p["n"] for p in panels.values()),
        "rows": int(rows.sum()),  # the rows its RMS is over: every row with a position
        "rms_before": vector_rms(q_spot[rows] - q_pixel[rows]),
        "rms_after": vector_rms(q_spot[rows] - q_after[rows]),
        "rms_delta_q_after": vector_rms(q_bragg[rows] - q_after[rows]),
        "parameters": PANEL_PARAMETERS * len(panels),
    }


# --- naming -------------------------------------------------------------------------------


# --- the driver -------------------------------------------------------------------------


def _significant(key, fit) -> bool:
    if key.startswith("rotation"):
        return fit["angle_deg"] > MIN_ANGLE_DEG
    if key.startswith("mirror"):
        return True
    if key == "beam_direction":
        return fit["angle_deg"] > MIN_ANGLE_DEG
    if key == "scale":
        return abs(fit["scale"] - 1) > MIN_SCALE
    if key == "detector_shift":
        return np.linalg.norm(fit["origin_offset_mm"]) > MIN_SHIFT_MM
    if key == "detector":
        return any(
            p["tilt_deg"] > MIN_TILT_DEG or np.linalg.norm(p["origin_offset_mm"]) > MIN_SHIFT_MM for p in fit["panels"].values()
        )
    return False


#: Fits "as good as the best": those that leave of the residual within 5% of
#: what the best leaves, or, where the best explains all but rounding (a ratio
#: under 1e-3: calculated positions), anything up to 10 times that. Where no fit
#: explains half (the centroids' scatter): those that explain at least 95% of
#: what the most significant one explains.
TIE_RELATIVE, TIE_EXACT = 0.05, 1e-3


def _tie_limit(best: float) -> float:
    """The largest ratio that ties with the best one (see TIE_RELATIVE)."""
    return max((1 + TIE_RELATIVE) * best, min(10 * best, best + TIE_EXACT)) + 1e-6


def diagnose_rows(scope, experiment, result, parts, rows, same_detector=None, max_reflections=None,
                  source_mm=None, laue_rows=None, threads: int = 1, observed: Observed | None = None) -> Diagnosis:
    """:func:`_diagnose_spots`, then, where the spots name nothing, what
    polychromatic rows show otherwise: a scale of q (:func:`_laue_scale`) and
    the time-of-flight fit (``source_mm``: the scope's flight path L0, if known)."""
    diagnosis = _diagnose_spots(scope, experiment, result, parts, rows, same_detector, max_reflections, laue_rows,
                                threads, observed or Observed())
    # Only where the spots name nothing: a mistake that moves the spots moves their wavelengths too.
    if laue_rows is None or diagnosis.findings:
        return diagnosis
    rows = sample_rows(sample_rows(rows, None), max_reflections)
    rows = rows[laue_rows[rows]]
    if rows.size >= MIN_PANEL_ROWS and not _laue_scale(diagnosis, result, rows):
        if parts is not None and parts.tof_us is not None and source_mm:
            _time_finding(diagnosis, result, parts, rows, source_mm)
    return diagnosis


def _laue_scale(diagnosis, result, rows) -> bool:
    """An isotropic scale of q (a cell error, 2π) moves no spot of polychromatic
    data, only the wavelength each reflection diffracts at; it still moves q off
    the table's s1 − s0. Named when it explains Δq; True then."""
    q_bragg, q_pixel = result.q_bragg[rows], result.q_pixel[rows]
    before = vector_rms(q_bragg - q_pixel)
    scale = scale_fit(q_bragg, q_pixel)
    after = vector_rms(scale * q_bragg - q_pixel)
    if not before > ROUNDING or after > EXPLAINED_RATIO * before:
        return False
    finding = name_scale({"scale": scale}, None, laue=True)
    finding.size["explained"] = 1.0 - (after / before) ** 2
    finding.size["rms_delta_q_before"], finding.size["rms_delta_q_after"] = before, after
    diagnosis.consistent = False
    diagnosis.findings.append(finding)
    return True


#: A time-of-flight fit must leave at most this fraction of the RMS time
#: residual, and the residual exceed this (µs), to name a cause.
ROUNDING_US = 1e-6


def _time_finding(diagnosis, result, parts, rows, source_mm) -> None:
    """Fit the time-of-flight residual against the wavelength and name a
    flight-path or wavelength-scale error when it explains the residual."""
    rows = rows[np.isfinite(parts.tof_us[rows])]
    if rows.size < MIN_PANEL_ROWS:
        return
    wavelength = bragg_wavelength_ratio(result.q_bragg[rows], result.s0[rows]) * row_wavelengths(result.s0[rows])
    position_wavelength = wavelength / (1.0 + parts.wavelength_rel[rows])
    path = result.tof[rows] / (position_wavelength * US_PER_ANGSTROM_MM)  # L0 + the spot's distance, mm
    fit = time_of_flight_fit(wavelength, path, parts.tof_us[rows])
    diagnosis.fits["time_of_flight"] = fit
    finding, chosen = name_time_of_flight(fit)
    if fit["rms_before"] < ROUNDING_US or chosen["rms_after"] > EXPLAINED_RATIO * fit["rms_before"]:
        return
    if not (MIN_FLIGHT_PATH_MM <= abs(fit["flight_path"]["flight_path_mm"]) < 0.5 * source_mm):
        return  # too small to name, or no flight path at all
    finding.size["explained"] = 1.0 - (chosen["rms_after"] / fit["rms_before"]) ** 2
    finding.size["rms_time_before_us"], finding.size["rms_time_after_us"] = fit["rms_before"], chosen["rms_after"]
    diagnosis.consistent = False
    diagnosis.findings.append(finding)


@dataclass(frozen=True)
class Observed:
    """What of the table is a measurement, not a prediction: the spot positions
    (``q_pixel.source=observed``) and the rotation angles (``phi=observed``).
    Their scatter is a floor no fit removes: there a fit is named when it is
    significant (F_PARTIAL), and with observed angles the fits are judged in q,
    which holds the angles' residual (Δφ), not on the spots alone."""
    positions: bool = False
    phi: bool = False

    @property
    def any(self) -> bool:
        return self.positions or self.phi


def _diagnose_spots(scope, experiment, result, parts, rows, same_detector=None, max_reflections=None,
                    laue_rows=None, threads: int = 1, observed: Observed = Observed()) -> Diagnosis:
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
    # One beam or axis for every row (the usual case) enters the fits as one vector.
    s0, axis = (geometry.one_vector_if_same(v[rows]) for v in (result.s0, result.rotation_axis))
    phi = result.phi[rows]
    laue = None if laue_rows is None else laue_rows[rows]  # polychromatic rows meet the sphere at their own λ
    scan = {}  # the scan rotations and q_bragg, q_pixel with it undone: made once, if a fit asks

    def undone(name):
        if not scan:
            undo = geometry.AxisRotations.of(axis, -phi)
            scan.update(redo=geometry.AxisRotations.of(axis, phi), q_bragg=undo.apply(q_bragg), q_pixel=undo.apply(q_pixel))
        return scan[name]

    def sphere_residuals(spot_of, about):
        """The model's spot minus q_pixel, rows of (x, y, z) flattened: the
        points ``spot_of(block)`` (Å⁻¹, lab) turned onto the Ewald sphere about
        the axes ``about`` (N×3), a block of rows at a time on up to
        ``threads`` threads (the same bits whatever the count)."""
        out = np.empty(q_pixel.shape)

        def work(block):
            spot = spot_of(block)
            on_sphere = onto_sphere(spot, s0[block], about[block], None if laue is None else laue[block])[1]
            # a point that never reaches the sphere keeps its whole distance
            out[block] = np.where(np.isfinite(on_sphere), on_sphere, spot) - q_pixel[block]

        for_each_block(len(q_pixel), work, threads)
        return out.ravel()

    def spot_residuals(matrix, frame="lab"):
        """:func:`sphere_residuals` of q_bragg mapped by ``matrix`` in ``frame``."""
        mapped = q_bragg @ matrix.T if frame == "lab" else undone("q_bragg") @ matrix.T
        redo = None if frame == "lab" else undone("redo")
        return sphere_residuals(lambda block: mapped[block] if redo is None else redo.rows(block).apply(mapped[block]),
                                axis)

    def spot_error(matrix, frame="lab"):
        return float(np.sqrt(np.mean(spot_residuals(matrix, frame) ** 2) * 3))

    before = spot_error(np.eye(3))
    diagnosis.rms_in_plane_before = before
    if before < ROUNDING:
        rms_q = vector_rms(q_bragg - q_pixel)
        if experiment is not None and experiment.is_rotation and rms_q > ROUNDING:
            _angles_only(diagnosis, rms_q, undone("q_bragg"), q_pixel, axis, phi, sphere_residuals, experiment)
        return diagnosis
    # With observed rotation angles the residual in φ is data: the fits are
    # judged in q (three numbers a row), which holds it, on rotation rows.
    in_q = observed.phi and bool(np.isfinite(np.asarray(axis, dtype=float)).all())
    before_q = vector_rms(q_bragg - q_pixel) if in_q else None
    fits = _rotation_candidates(q_bragg, q_pixel, "lab", spot_error, spot_residuals)
    if experiment is not None and experiment.is_rotation:
        fits.update(_rotation_candidates(undone("q_bragg"), undone("q_pixel"), "scan_undone", spot_error, spot_residuals))
        fits["rotation_axis"] = _axis_candidate(undone("q_bragg"), q_pixel, axis, phi, sphere_residuals,
                                                vector_rms(q_bragg - q_pixel), before, in_q)
    scale = scale_fit(q_bragg, q_pixel)
    fits["scale"] = {"scale": scale, "rms_delta_q_after": vector_rms(scale * q_bragg - q_pixel), "rms_after": spot_error(scale * np.eye(3)),
                     "parameters": SCALE_PARAMETERS}
    if laue is None:  # a beam's direction: monochromatic rows (a polychromatic one meets each at its own λ)
        fits["beam_direction"] = _beam_candidate(q_bragg, q_pixel, s0, axis)
    for fit in fits.values():
        fit["rms_before"] = before
    detector = experiment.detector if experiment is not None else same_detector
    if detector is not None and parts is not None:
        spot = onto_sphere(q_bragg, s0, axis, laue)[1]  # the model's spot on the sphere, as the decomposition has it
        xy, panel = result.position_mm[rows], result.panel[rows]
        lab = panel_lab_points(detector, panel, xy)
        for key, fit in (("detector_shift", _shift_candidate(lab, s0 + spot, spot, q_pixel, s0, q_bragg)),
                         ("detector", _detector_candidate(detector, xy, panel, s0 + spot, spot, q_pixel, s0, q_bragg))):
            if fit is not None and fit["rms_before"] > ROUNDING:
                fits[key] = fit
    diagnosis.fits = fits

    def ratio_on(fit, after, before, per_row):
        """What a fit leaves of the residual, its RMS per degree of freedom left
        (``per_row`` numbers a row: two in-plane coordinates a spot, three in
        q): a fit of p parameters to m numbers leaves (m - p)/m of pure noise,
        so p/m is not credited to it (a panel's plane fitted to 8 spots halves
        their noise)."""
        equations = per_row * fit.get("rows", rows.size)
        if before <= 0 or fit["parameters"] >= equations:
            return 1.0
        return after / before * math.sqrt(equations / (equations - fit["parameters"]))

    def measure(fit):
        """(RMS after, RMS before, numbers a row) of the measure a fit is judged
        on: the spots; with observed angles, q instead where the fit explains
        more of it (the angles' mistakes: a turn, the axis)."""
        spots = (fit["rms_after"], fit["rms_before"], 2)
        in_q_too = (fit["rms_delta_q_after"], before_q, 3)
        return min((spots, in_q_too) if in_q else (spots,), key=lambda m: ratio_on(fit, *m))

    def ratio(fit):
        return ratio_on(fit, *measure(fit))

    def f_statistic(fit):
        """What a fit removes per parameter over what it leaves per degree of
        freedom, on its measure: its significance against the scatter."""
        after, before, per_row = measure(fit)
        equations = per_row * fit.get("rows", rows.size)
        if equations <= fit["parameters"]:
            return 0.0
        return (before**2 - after**2) / fit["parameters"] / max(after**2 / (equations - fit["parameters"]), 1e-300)

    limit = EXPLAINED_RATIO
    significant = [key for key, fit in fits.items() if _significant(key, fit)]
    ranked = sorted((ratio(fits[key]), PREFERENCE.index(key), key) for key in significant)
    if ranked:
        # Among explanations that fit the spots as well as the best one, the one
        # closest in q itself wins (stills' spots cannot tell q_z from -q_z), then
        # the simplest (a mirrored crystal also fits as flipped panels).
        best = ranked[0][0]
        ties = [(r, order, key) for r, order, key in ranked if r <= _tie_limit(best)]
        closest = min(fits[key]["rms_delta_q_after"] for _, _, key in ties)
        ties = [t for t in ties if fits[t[2]]["rms_delta_q_after"] <= 1.5 * closest + ROUNDING]
        ranked = sorted(ties, key=lambda t: t[1])
    if ranked and ranked[0][0] > limit:
        # No fit explains half of it: the residual is mostly what no change of
        # the models removes (the centroids' scatter, stills' Ewald offsets). The
        # most significant fit then leads, with those that explain as much as it
        # (TIE_RELATIVE), the simplest first; it must be significant (F_PARTIAL).
        scores = {key: f_statistic(fits[key]) for key in significant}
        leader = max(scores, key=scores.get)
        explained = {key: 1.0 - ratio(fits[key]) ** 2 for key in significant}
        if scores[leader] < F_PARTIAL or explained[leader] < MIN_EXPLAINED:
            return diagnosis
        ranked = sorted(((ratio(fits[key]), PREFERENCE.index(key), key) for key in significant
                         if explained[key] >= (1 - TIE_RELATIVE) * explained[leader]), key=lambda t: t[1])
    if not ranked:
        return diagnosis
    best_ratio, _, key = ranked[0]
    fit = fits[key]

    def name(key):
        fit = fits[key]
        if key == "scale":
            return [name_scale(fit, experiment, laue is not None and bool(laue.all()))]
        if key == "rotation_axis":
            return [name_rotation_axis(fit, experiment)]
        if key == "beam_direction":
            return [name_beam(fit)]
        if key == "detector":
            return name_detector(fit, detector, s0.mean(axis=0))
        if key == "detector_shift":
            beam = s0.mean(axis=0)
            return name_shift(np.asarray(fit["origin_offset_mm"]), detector, beam_panel(detector, beam), beam)
        return [name_rotation(key, fit, experiment)]

    after, before, per_row = measure(fit)
    findings = name(key)
    _name_look_alike(findings, [name(rival) for _, _, rival in ranked[1:]])
    for finding in findings:
        finding.size["explained"] = 1.0 - best_ratio**2
        finding.size["rms_after_fit"] = after
        if per_row == 3:
            finding.size.update(rms_before_fit=before, measure="q at the observed rotation angles")
    if best_ratio > limit:
        for finding in findings:
            finding.size["f"] = f_statistic(fit)
        if not observed.any:  # significant, but not what the residual is: the table's predictions leave no scatter
            diagnosis.partial = findings
            return diagnosis
    # a shift whose parts along and across the beam are each below what is named names nothing
    diagnosis.consistent = not findings
    diagnosis.findings = findings
    return diagnosis


#: Mistakes that move the spots alike where the spots span little of the sphere
#: (a still's, or at an electron wavelength): a distance error moves them
#: radially in proportion to their radius, as a scale does, and a shift across
#: the beam moves them all alike, as a turn of the beam does; or where the scan
#: turns little: a turn of the lab frame (S) and of the crystal. Both are named
#: when they fit equally well.
LOOK_ALIKE = {"wavelength_or_cell_scale": {"detector_distance"}, "detector_distance": {"wavelength_or_cell_scale"},
              "cell_scale": {"detector_distance"},
              "beam_direction": {"beam_centre_shift"}, "beam_centre_shift": {"beam_direction"},
              **{setting: {"crystal_orientation"} for setting in
                 ("missing_setting_rotation", "extra_setting_rotation", "setting_rotation")}}
AS_WELL = "; or, as well (these spots do not tell the two apart), "


def _name_look_alike(findings, rivals) -> None:
    """Where the one finding named has a look-alike (LOOK_ALIKE) among the
    findings of the fits that tie with it (``rivals``: a list of findings per
    fit, best first), name that one too: in the message, and as
    ``size["equally_well"]`` (its mistake, message and sizes)."""
    if len(findings) != 1 or findings[0].mistake not in LOOK_ALIKE:
        return
    finding = findings[0]
    for rival in rivals:
        if len(rival) == 1 and rival[0].mistake in LOOK_ALIKE[finding.mistake]:
            finding.size["equally_well"] = {"mistake": rival[0].mistake, "message": rival[0].message, **rival[0].size}
            finding.message += f"{AS_WELL}{rival[0].message}"
            return


def _axis_candidate(q_start, q_pixel, axis, phi, sphere_residuals, rms_q, before=None, in_q=False) -> dict:
    """The rotation axis that carries the lattice points at φ = 0
    (``q_start``, Å⁻¹, lab) onto q_pixel (:func:`fit_rotation_axis`), judged on
    the spots as every candidate: each point turned about the fitted axis, then
    onto the Ewald sphere about it (``sphere_residuals``). Fitted in q, it can
    take up the rotation angles' own noise (observed φ): one that moves the
    spots further than ``before`` (their RMS residual) is left as the model
    has it, leaving ``rms_q`` (RMS |Δq|); judged in q too (``in_q``), only one
    that leaves more than ``rms_q`` as well."""
    fit = fit_rotation_axis(q_start, q_pixel, axis, phi)
    fitted = np.asarray(axis, dtype=float) @ np.array(fit["turn"]).T
    rotations = geometry.AxisRotations.of(fitted, phi)
    residuals = sphere_residuals(lambda block: rotations.rows(block).apply(q_start[block]), fitted)
    candidate = {**fit, "rms_after": float(np.sqrt(np.mean(residuals**2) * 3)), "parameters": AXIS_PARAMETERS}
    if before is not None and not candidate["rms_after"] <= before and not (in_q and candidate["rms_delta_q_after"] <= rms_q):
        candidate.update(turn=np.eye(3).tolist(), fitted_axis=fit["model_axis"], angle_deg=0.0, rms_after=before,
                         rms_delta_q_after=rms_q)
    return candidate


def _angles_only(diagnosis, rms_q, q_start, q_pixel, axis, phi, sphere_residuals, experiment) -> None:
    """The model's spots are q_pixel's, yet q_bragg is not (rotation data):
    only the rotation angles differ, as when the axis is reversed (about -e the
    lattice points trace the same circles, and meet the sphere at the same
    spots, at -φ). Named when the axis fitted in q explains |Δq|; its sizes are
    in q (``measure``), where the spots show nothing; ``rms_q``: RMS |Δq|."""
    fit = _axis_candidate(q_start, q_pixel, axis, phi, sphere_residuals, rms_q)
    diagnosis.fits["rotation_axis"] = {**fit, "rms_before": diagnosis.rms_in_plane_before, "rms_delta_q_before": rms_q}
    if fit["angle_deg"] <= MIN_ANGLE_DEG or fit["rms_delta_q_after"] > EXPLAINED_RATIO * rms_q:
        return
    finding = name_rotation_axis(fit, experiment)
    finding.size.update(explained=1.0 - (fit["rms_delta_q_after"] / rms_q) ** 2, rms_before_fit=rms_q,
                        rms_after_fit=fit["rms_delta_q_after"],
                        measure="q_bragg at the table's rotation angles (the spots not at all)")
    diagnosis.consistent, diagnosis.findings = False, [finding]


def _refutes(diagnosis, findings) -> bool:
    """Does an experiment that names nothing refute the pooled finding? Its
    model's spots are the table's to rounding (CuNiR still 2 in 2π units pooled
    with the four others gave a scale of 0.17116), or its own spots fit a scale
    nearer 1 than half the pooled one's departure from 1: the scale is not
    every experiment's (CuNiR stills 1-4 each with its own detector moved 1 mm
    pooled as 0.99685 with still 0, whose own fit is nearer 1)."""
    if diagnosis.rms_in_plane_before is not None and diagnosis.rms_in_plane_before < ROUNDING:
        return True
    own = diagnosis.fits.get("scale")
    pooled_scale = next((f.size["scale"] for f in findings if f.mistake in ("wavelength_or_cell_scale", "two_pi")), None)
    if own is None or pooled_scale is None:
        return False
    return abs(own["scale"] - 1.0) < 0.5 * abs(pooled_scale - 1.0)


def _same_beam(a, b) -> bool:
    """One monochromatic beam (the same bits: one beam of the .expt, or copies)."""
    return a is b or (a is not None and b is not None and a.s0 is not None and b.s0 is not None
                      and a.wavelength == b.wavelength and np.array_equal(a.s0, b.s0))


def _scale_sources(experiments, indices, each, pooled) -> None:
    """What a scale of q is where several experiments share a beam: one whose
    beam others share, and fit as it is (:func:`_refutes`), has a wrong cell;
    the pooled scale of experiments that all share one beam gives its
    wavelength, as one experiment's does."""
    by_index = dict(zip((int(i) for i in indices), each))
    for index, diagnosis in by_index.items():
        if len(diagnosis.findings) != 1 or diagnosis.findings[0].mistake != "wavelength_or_cell_scale":
            continue
        beam = experiments[index].beam
        witnesses = [other for other, d in by_index.items() if other != index
                     and _same_beam(experiments[other].beam, beam) and _refutes(d, diagnosis.findings)]
        if witnesses:
            finding = diagnosis.findings[0]
            cell = as_cell_scale(finding, _ranges(witnesses))
            if AS_WELL in finding.message:  # its look-alike stays
                cell.message += AS_WELL + finding.message.partition(AS_WELL)[2]
            diagnosis.findings = [cell]
    beams = [experiments[int(i)].beam for i in indices]
    if beams[0] is not None and all(_same_beam(beam, beams[0]) for beam in beams[1:]):
        for finding in pooled.findings:
            if finding.mistake == "wavelength_or_cell_scale" and "wavelength_fit" not in finding.size:
                with_wavelength(finding, beams[0].wavelength)


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


def diagnose(experiments, result, parts, max_reflections=MAX_REFLECTIONS, threads: int = 1,
             observed: Observed | None = None) -> list[Diagnosis]:
    """Pooled diagnosis (lab-frame candidates) then one per experiment with used
    rows; each fitted on at most ``max_reflections`` rows, on up to ``threads``
    threads (the results do not depend on it); ``observed``: what of the table
    is measured (:class:`Observed`)."""
    used = result.used
    groups = result.used_rows_by_experiment(len(experiments))
    indices = np.array([i for i, rows in enumerate(groups) if rows.size], dtype=np.int64)
    source = [e.beam.sample_to_source_distance if e.is_laue else None for e in experiments]
    laue_rows = polychromatic_rows(experiments, result.experiment)
    laue_rows = laue_rows if laue_rows.any() else None
    each = [
        diagnose_rows(f"experiment {int(i)}", experiments[int(i)], result, parts, groups[i],
                      max_reflections=max_reflections, source_mm=source[int(i)], laue_rows=laue_rows, threads=threads,
                      observed=observed)
        for i in indices
    ]
    if indices.size == 0:
        return []
    if indices.size == 1:
        return [Diagnosis(**{**each[0].__dict__, "scope": "pooled"})] + each
    shared_source = {source[int(i)] for i in indices}
    pooled = diagnose_rows("pooled", None, result, parts, used, _shared_detector(experiments, indices), max_reflections,
                           source_mm=shared_source.pop() if len(shared_source) == 1 else None, laue_rows=laue_rows,
                           threads=threads, observed=observed)
    _scale_sources(experiments, indices, each, pooled)
    named = {f.mistake for d in each for f in d.findings}
    if (named or not all(f.mistake in SHARED_MISTAKES for f in pooled.partial)
            or any(_refutes(d, pooled.partial) for d in each)):
        pooled.partial = []  # it would mix the experiments' own mistakes, or the crystals'
    shared = bool(pooled.findings) and all(f.mistake in SHARED_MISTAKES for f in pooled.findings)
    shared = shared and not any(_refutes(d, pooled.findings) for d in each if not d.findings)
    quiet = any(not d.findings for d in each)
    if named and ({f.mistake for f in pooled.findings} != named or quiet or not shared):
        # A pooled fit of what the experiments share (the detector, the wavelength) is
        # better determined by all their spots than by the few of one still, where a
        # distance error and a scale look alike: it stays unless one mistake named
        # alike by the experiments (copies of one mistaken model, in all of them or in
        # those that name one) explains more. A pooled fit of anything else (the
        # crystals') speaks only as that common finding: it would mix different causes,
        # or sizes, or take in the experiments that name nothing.
        common = _common_finding(each)
        pooled_explained = max((f.size.get("explained", 0.0) for f in pooled.findings), default=0.0)
        if common is not None and (not shared or common.size["explained"] > pooled_explained):
            pooled.consistent, pooled.findings = False, [common]
        elif not shared:
            pooled.consistent = False
            pooled.findings = [
                Finding("no_common_cause", "the experiments are diagnosed differently: see each experiment",
                        {"named": sorted(named)})
            ]
    return [pooled] + each


#: Mistakes of models the experiments share: a pooled fit of these speaks for all.
SHARED_MISTAKES = {"beam_direction", "detector_distance", "beam_centre_shift", "tilted_panel", "detector_tilt", "panel_shift",
                   "wavelength_or_cell_scale", "two_pi"}

#: Sizes that must agree (relative, or absolute near zero) for one finding to speak for all experiments.
SAME_SIZE = 0.01

#: Sizes of a finding left out of the comparison (how well it fits, or what follows from the scale).
_NOT_COMPARED = {"explained", "rms_after_fit", "rms_before_fit", "rms_time_before_us", "rms_time_after_us",
                 "rms_delta_q_before", "rms_delta_q_after", "time_offset_us", "wavelength_fit", "wavelength_model",
                 "experiments", "experiment_indices", "equally_well"}

#: ... and of one mistake: a reindexing is one operator on hkl, whose lab axis
#: turns with each crystal.
_NOT_COMPARED_OF = {"reindexing": {"axis"}}

#: Sizes that are factors, compared by how far they are from 1, within this share
#: of it: fits of one cell scale 1.001 on stills give 1.00098 to 1.00100.
_FACTORS, SAME_FACTOR = {"scale", "wavelength_scale"}, 0.05


def _same_size(key, a, b) -> bool:
    """Do two values of one size key of a finding agree? Words and whole numbers
    must be equal, other numbers and vectors (axes, offsets) within SAME_SIZE,
    factors alike in their departure from 1 (SAME_FACTOR)."""
    if isinstance(a, (str, int)) or isinstance(b, (str, int)) or a is None or b is None:
        return a == b  # words, and whole numbers (a panel) alike
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        return False
    if key in _FACTORS:
        return float(np.max(np.abs(a - b))) <= SAME_FACTOR * max(float(np.max(np.abs(a - 1.0))), 1e-6)
    return float(np.linalg.norm(a - b)) <= SAME_SIZE * max(float(np.linalg.norm(a)), 1e-3)


def _common_finding(each) -> Finding | None:
    """The finding every experiment that names one names alike (one mistake,
    the same sizes, axes and words: SAME_SIZE; at least two experiments, the
    others naming nothing), as a pooled one: what copies of one mistaken model
    in every experiment give, or in some of them ("experiments 1-9 (none found
    in 0)"). Its RMS before and after the fit are over those experiments'
    fitted rows."""
    naming = [d for d in each if d.findings]
    if len(naming) < 2 or not all(len(d.findings) == 1 for d in naming):
        return None
    first = naming[0].findings[0]
    ignored = _NOT_COMPARED | _NOT_COMPARED_OF.get(first.mistake, set())
    keys = set(first.size) - ignored
    for diagnosis in naming[1:]:
        other = diagnosis.findings[0]
        if other.mistake != first.mistake or set(other.size) - ignored != keys:
            return None
        if not all(_same_size(key, first.size[key], other.size[key]) for key in keys):
            return None
    weights = np.array([d.fitted for d in naming], dtype=float)
    which, others = ([int(d.scope.split()[-1]) for d in group] for group in (naming, [d for d in each if not d.findings]))
    size = {**first.size, "explained": min(d.findings[0].size["explained"] for d in naming), "experiments": len(naming),
            "experiment_indices": which}
    for key, values in (("rms_before_fit", [d.findings[0].size.get("rms_before_fit", d.rms_in_plane_before)
                                            for d in naming]),
                        ("rms_after_fit", [d.findings[0].size.get("rms_after_fit") for d in naming])):
        if all(v is not None for v in values) and weights.sum() > 0:
            size[key] = float(np.sqrt(np.average(np.square(values), weights=weights)))
    message = first.message
    if len({(d.findings[0].size.get("equally_well") or {}).get("mistake") for d in naming}) > 1:
        # the look-alike is named only where every experiment finds it
        message = message.partition(AS_WELL)[0]
        size.pop("equally_well", None)
    if len(naming) == len(each):
        return Finding(first.mistake, f"every experiment: {message}", size)
    return Finding(first.mistake, f"experiments {_ranges(which)} (none found in {_ranges(others)}): {message}", size)


def _ranges(indices) -> str:
    """Sorted experiment indices as runs: [1, 2, 3, 7] -> "1-3, 7"."""
    runs = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
