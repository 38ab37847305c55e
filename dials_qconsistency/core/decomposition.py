"""Split Δq = q_bragg - q_pixel into parts that point at a cause.

Per used row (lab frame; Å⁻¹ unless the name says mm or rad):

* ``angle``: the rotation that takes q_bragg onto the Ewald sphere: Δφ about
  the lab rotation axis S·e for rotation data (calculated minus used φ: with
  ``phi=observed`` it is ≈ φcal - φobs), Δψ for stills (DIALS' ``delpsical.rad``
  convention). q_sphere (:func:`onto_sphere`) is q_bragg so rotated; q_bragg -
  q_sphere is the angular part of Δq.
* ``along_q`` = |q_bragg| - |q_pixel|: an error in |q| (wavelength, distance,
  cell).
* In the detector plane: the model's spot minus the spot behind q_pixel. The
  model's spot is where q_sphere meets the row's panel, or, when the table's
  s1 is a prediction (it ends at xyzcal.mm), that prediction itself, so that
  predictors other than Δψ (the ellipsoid model of dials.ssx_integrate) are
  honoured. Given as (fast, slow) mm and as radial and transverse mm
  about the beam centre, exactly as DIALS' ``compute_radial_and_transverse_
  residuals`` (radial: from the beam centre to the spot; transverse: radial ×
  beam centre). With a self-consistent model and q_pixel from observed
  centroids this is xyzcal.mm - xyzobs.mm.
* The same in Å⁻¹: q_sphere - q_pixel projected on the Ewald-sphere tangents
  at the q_pixel ray, along increasing 2θ (radial) and along unit(ŝ1 × ŝ0)
  (transverse, the direction DIALS' transverse residual has).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dials_qconsistency.core import geometry
from dials_qconsistency.core.geometry import cross_components, dot_components, unit_components
from dials_qconsistency.core.blocks import for_each_block, release_block
from dials_qconsistency.core.panels import per_row_components
from dials_qconsistency.core.q_vectors import s1_is_prediction
from dials_qconsistency.core.time_of_flight import (
    bragg_wavelength_ratio,
    polychromatic_rows,
    row_wavelengths,
    wavelength_from_tof,
)


@dataclass
class Decomposition:
    angle: np.ndarray  # (N,) Δφ or Δψ, rad
    along_q: np.ndarray  # (N,)
    delta_xy: np.ndarray  # (N, 2) fast, slow mm: the model's spot minus the spot behind q_pixel
    radial_mm: np.ndarray
    transverse_mm: np.ndarray
    radial: np.ndarray  # Å⁻¹
    transverse: np.ndarray  # Å⁻¹
    rotation: np.ndarray  # (N,) bool: rotation data (angle is Δφ)
    #: Polychromatic (Laue) rows, None without any: the model's q_bragg meets the
    #: Ewald sphere at its own wavelength λ_b rather than by a rotation.
    wavelength_rel: np.ndarray | None = None  # (N,) (λ_b − λ)/λ, λ the wavelength of the position's time
    tof_us: np.ndarray | None = None  # (N,) µs: t(λ_b) − the position's time of flight


def panel_frames(experiments, result):
    """Per-row d matrices [fast | slow | origin] (N, 3, 3) of each row's panel; NaN if unused."""
    d = np.full((len(result.reason), 3, 3), np.nan)
    for experiment, rows in zip(experiments, result.used_rows_by_experiment(len(experiments))):
        if rows.size:
            d[rows] = experiment.detector.panel_matrices[result.panel[rows]]
    return d


class PanelLookup:
    """Each row's panel vectors, as components: the few (detector, panel) pairs of
    the experiments are tabulated once and looked up per row with ``np.take``
    (no sorting, no scattering); one (detector, panel) for every row gives scalars.

    Per panel: origin, fast and slow (lab, mm) and the nine elements of
    D⁻¹, D = [fast | slow | origin] (ray -> panel coordinates).
    """

    def __init__(self, experiments, result):
        offsets, detectors, count = {}, [], 0
        for experiment in experiments:
            detector = experiment.detector
            if id(detector) not in offsets:
                offsets[id(detector)] = count
                detectors.append(detector)
                count += len(detector.panels)
        self.offset = np.array([offsets[id(e.detector)] for e in experiments] + [0], dtype=np.int64)
        self.table = np.concatenate([np.hstack([d.panel_vectors, d.panel_inverses]) for d in detectors] or
                                    [np.zeros((0, 18))])
        self.result = result

    def rows(self, row_numbers):
        """(origin, fast, slow, d_inverse) for those rows: component tuples of
        per-row arrays, or of scalars when every row has the same panel."""
        values = per_row_components(self.table, self.offset[self.result.experiment[row_numbers]]
                                    + self.result.panel[row_numbers])
        return values[0:3], values[3:6], values[6:9], values[9:18]


def sphere_angles(q_bragg, s0, rotation_axis, laue=None):
    """(angle, axis): rows with a finite axis rotate by Δφ about it onto the
    Ewald sphere, other monochromatic rows by Δψ about their own axis;
    polychromatic rows (``laue``, per row) have neither (NaN): they meet the
    sphere at their own wavelength (:func:`onto_sphere`)."""
    rotation = geometry.finite_rows(rotation_axis)
    if rotation.all():  # rotation data only: no masks
        return geometry.nearest_ewald_rotation(q_bragg, rotation_axis, s0), rotation_axis
    angle = np.full(len(q_bragg), np.nan)
    axis = np.full(q_bragg.shape, np.nan)
    if rotation.any():
        angle[rotation] = geometry.nearest_ewald_rotation(q_bragg[rotation], rotation_axis[rotation], s0[rotation])
        axis[rotation] = rotation_axis[rotation]
    still = ~rotation if laue is None else ~rotation & ~laue
    if still.any():
        angle[still], axis[still] = geometry.stills_rotation(q_bragg[still], s0[still])
    return angle, axis


def onto_sphere(q_bragg, s0, rotation_axis, laue=None):
    """(angle, q_sphere): q_bragg rotated onto the Ewald sphere by the angle of
    :func:`sphere_angles`; polychromatic rows (``laue``) scaled along
    themselves onto the sphere of the row's s0 instead, no angle."""
    angle, axis = sphere_angles(q_bragg, s0, rotation_axis, laue)
    q_sphere = geometry.rotate_about_axes(q_bragg, axis, angle)
    if laue is not None and laue.any():
        q_sphere[laue] = q_bragg[laue] * bragg_wavelength_ratio(q_bragg[laue], s0[laue])[:, None]
    return angle, q_sphere


def laue_rows(experiments, result) -> np.ndarray | None:
    """The polychromatic rows (per table row), or None when no used row is one:
    the decomposition then has no wavelength and time-of-flight parts."""
    laue = polychromatic_rows(experiments, result.experiment)
    return laue if laue[result.used].any() else None


def decompose(experiments, result, threads: int = 1, release_input=None) -> Decomposition:
    """Decompose Δq of every used row (NaN elsewhere), a block of rows at a time
    (on up to ``threads`` threads; the results do not depend on it);
    ``release_input`` as for :func:`q_vectors.compute_q` (the positions and
    panels are read again here)."""
    n = len(result.reason)
    used = result.used
    rotation = geometry.finite_rows(result.rotation_axis)
    used_rows = np.flatnonzero(used)
    m = used_rows.size
    fields = {"angle": 0, "along_q": 0, "delta_xy": 2,
              "radial_mm": 0, "transverse_mm": 0, "radial": 0, "transverse": 0}
    laue = laue_rows(experiments, result)
    if laue is not None:
        fields.update(wavelength_rel=0, tof_us=0)
    source_mm = np.array([e.beam.sample_to_source_distance if e.is_laue else np.nan for e in experiments] + [np.nan])
    parts = {name: np.empty((m, k) if k else m) for name, k in fields.items()}
    predicted = [index for index, rows in enumerate(result.used_rows_by_experiment(len(experiments)))
                 if s1_is_prediction(result, rows)]
    panels = PanelLookup(experiments, result)

    def work(block):
        rows = block if m == n else used_rows[block]  # every row used: views, no gathering
        out = {k: v[block] for k, v in parts.items()}
        _decompose_rows(result, rows, used_rows[block], predicted, panels, out, laue)
        if laue is not None:
            _wavelength_parts(result, used_rows[block], laue, source_mm, panels, out)
        release_block(release_input, rows)

    for_each_block(m, work, threads)

    def full(values):
        """Used rows' values as a column of every row (NaN where not used)."""
        if m == n:
            return values
        out = np.full((n,) + values.shape[1:], np.nan)
        out[used] = values
        return out

    return Decomposition(**{name: full(values) for name, values in parts.items()}, rotation=rotation)


def _wavelength_parts(result, row_numbers, laue, source_mm, panels, out) -> None:
    """For the time-of-flight rows among ``row_numbers``: the wavelength error
    (λ_b − λ)/λ, λ_b the wavelength at which q_bragg diffracts and λ that of
    the position's time of flight (µs) over L0 + |spot| (mm), and the
    time-of-flight error t(λ_b) − t."""
    out["wavelength_rel"][:] = np.nan
    out["tof_us"][:] = np.nan
    if result.tof is None:
        return
    at = np.flatnonzero(laue[row_numbers] & np.isfinite(result.tof[row_numbers]))
    if not at.size:
        return
    numbers = row_numbers[at]
    s0 = result.s0[numbers]
    ratio = bragg_wavelength_ratio(result.q_bragg[numbers], s0)  # λ_b / λ_i, λ_i = 1/|s0| (wavelength_cal)
    origin, fast, slow, _ = panels.rows(numbers)
    xy = result.position_mm[numbers]
    path = source_mm[result.experiment[numbers]] + geometry.norms(
        np.stack(geometry.panel_points_to_lab(origin, fast, slow, xy[:, 0], xy[:, 1]), axis=-1))
    time = result.tof[numbers]
    wavelength = wavelength_from_tof(time, path)
    bragg = ratio * row_wavelengths(s0)
    out["wavelength_rel"][at] = (bragg - wavelength) / wavelength
    out["tof_us"][at] = time * (bragg - wavelength) / wavelength


def _decompose_rows(result, rows, row_numbers, predicted, panels, out, laue=None) -> None:
    """The parts of Δq for some used rows, written into ``out`` (views of the
    parts' arrays). ``rows`` indexes the result; ``row_numbers`` are the same
    rows as numbers; ``predicted``: experiments whose s1 is a prediction;
    ``laue``: per table row, polychromatic (None: no such row)."""
    q_bragg, q_pixel, s0 = result.q_bragg[rows], result.q_pixel[rows], result.s0[rows]
    laue = None if laue is None else laue[row_numbers]
    from_prediction = np.isin(result.experiment[row_numbers], predicted) if predicted else None
    if from_prediction is not None and from_prediction.all():  # the model's spots are the table's s1: no rotation
        out["angle"][:] = sphere_angles(q_bragg, s0, result.rotation_axis[rows], laue)[0]
        model_spot = result.q_pred[rows]
    else:
        out["angle"][:], model_spot = onto_sphere(q_bragg, s0, result.rotation_axis[rows], laue)
        if from_prediction is not None and from_prediction.any():
            model_spot[from_prediction] = result.q_pred[row_numbers[from_prediction]]
    s0 = geometry.components(s0)
    model_spot, q_pixel = geometry.components(model_spot), geometry.components(q_pixel)
    xy_pixel = result.position_mm[rows]
    x_pixel, y_pixel = xy_pixel[:, 0], xy_pixel[:, 1]
    origin, fast, slow, d_inverse = panels.rows(row_numbers)
    x_bragg, y_bragg = geometry.ray_panel_xy(d_inverse, tuple(s0[i] + model_spot[i] for i in range(3)))
    dx, dy = x_bragg - x_pixel, y_bragg - y_pixel
    out["delta_xy"][:, 0], out["delta_xy"][:, 1] = dx, dy
    delta_lab = tuple(dx * fast[i] + dy * slow[i] for i in range(3))
    beam_centre = geometry.panel_points_to_lab(origin, fast, slow, *geometry.ray_panel_xy(d_inverse, s0))
    spot = geometry.panel_points_to_lab(origin, fast, slow, x_pixel, y_pixel)
    with np.errstate(invalid="ignore", divide="ignore"):
        radial_dir = unit_components(tuple(spot[i] - beam_centre[i] for i in range(3)))
        transverse_dir = unit_components(cross_components(radial_dir, beam_centre))
        s1_dir = unit_components(tuple(s0[i] + q_pixel[i] for i in range(3)))
        transverse_q = unit_components(cross_components(s1_dir, unit_components(s0)))
        radial_q = cross_components(s1_dir, transverse_q)
    in_plane_q = tuple(model_spot[i] - q_pixel[i] for i in range(3))
    out["along_q"][:] = geometry.norms(q_bragg) - geometry.norms(q_pixel)
    out["radial_mm"][:] = dot_components(delta_lab, radial_dir)
    out["transverse_mm"][:] = dot_components(delta_lab, transverse_dir)
    out["radial"][:] = dot_components(in_plane_q, radial_q)
    out["transverse"][:] = dot_components(in_plane_q, transverse_q)


def spot_lab_positions(experiments, result):
    """Lab position (mm) of each used row's q_pixel spot (NaN elsewhere)."""
    d = panel_frames(experiments, result)
    return geometry.lab_coordinates(d[:, :, 2], d[:, :, 0], d[:, :, 1], result.position_mm)

