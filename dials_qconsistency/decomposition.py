"""Split Δq = q_bragg - q_pixel into parts that point at a cause.

Per used row (lab frame; Å⁻¹ unless the name says mm or rad):

* ``angle``: the rotation that takes q_bragg onto the Ewald sphere: Δφ about
  the lab rotation axis S·e for rotation data (calculated minus used φ: with
  ``phi=observed`` it is ≈ φcal - φobs), Δψ for stills (DIALS' ``delpsical.rad``
  convention). ``q_sphere`` is q_bragg so rotated; q_bragg - q_sphere is the
  angular part of Δq.
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

from . import geometry
from .compute import panel_groups, s1_is_prediction


@dataclass
class Decomposition:
    q_sphere: np.ndarray  # (N, 3) q_bragg rotated onto the Ewald sphere
    angle: np.ndarray  # (N,) Δφ or Δψ, rad
    along_q: np.ndarray  # (N,)
    delta_xy: np.ndarray  # (N, 2) fast, slow mm: the model's spot minus the spot behind q_pixel
    radial_mm: np.ndarray
    transverse_mm: np.ndarray
    radial: np.ndarray  # Å⁻¹
    transverse: np.ndarray  # Å⁻¹
    rotation: np.ndarray  # (N,) bool: rotation data (angle is Δφ)

    @property
    def in_plane_mm(self) -> np.ndarray:
        return np.hypot(self.delta_xy[:, 0], self.delta_xy[:, 1])


def panel_frames(experiments, result):
    """Per-row d matrices [fast | slow | origin] (N, 3, 3) of each row's panel; NaN if unused."""
    d = np.full((len(result.reason), 3, 3), np.nan)
    for index, experiment in enumerate(experiments):
        rows = np.flatnonzero((result.experiment == index) & result.used)
        if rows.size:
            stack = np.array([p.d_matrix for p in experiment.detector.panels])
            d[rows] = stack[result.panel[rows]]
    return d


def _panel_groups(experiments, result, used_rows):
    """(panel model, positions in ``used_rows``) for every experiment and panel."""
    experiment_of = result.experiment[used_rows]
    for index, experiment in enumerate(experiments):
        mine = np.flatnonzero(experiment_of == index)
        if mine.size == 0:
            continue
        for panel, rows in panel_groups(result.panel[used_rows[mine]]):
            yield experiment.detector.panels[panel], (mine if isinstance(rows, slice) else mine[rows])


def onto_sphere(q_bragg, s0, rotation_axis):
    """(angle, q_sphere): rows with a finite axis rotate by Δφ about it, others by Δψ."""
    rotation = np.all(np.isfinite(rotation_axis), axis=1)
    angle = np.full(len(q_bragg), np.nan)
    axis = np.full(q_bragg.shape, np.nan)
    if rotation.any():
        angle[rotation] = geometry.nearest_ewald_rotation(q_bragg[rotation], rotation_axis[rotation], s0[rotation])
        axis[rotation] = rotation_axis[rotation]
    still = ~rotation
    if still.any():
        angle[still], axis[still] = geometry.stills_rotation(q_bragg[still], s0[still])
    return angle, geometry.rotate_about(q_bragg, axis, angle), rotation


#: Rows decomposed at a time: the temporaries stay near a dozen arrays of this
#: many vectors however large the table.
CHUNK_ROWS = 1 << 20


def decompose(experiments, result) -> Decomposition:
    """Decompose Δq of every used row (NaN elsewhere), a chunk of rows at a time."""
    n = len(result.reason)
    used = result.used
    rotation = np.all(np.isfinite(result.rotation_axis), axis=1)
    used_rows = np.flatnonzero(used)
    m = used_rows.size
    fields = {"q_sphere": 3, "angle": 0, "along_q": 0, "delta_xy": 2,
              "radial_mm": 0, "transverse_mm": 0, "radial": 0, "transverse": 0}
    parts = {name: np.empty((m, k) if k else m) for name, k in fields.items()}
    predicted = [index for index in range(len(experiments))
                 if s1_is_prediction(result, used_rows[result.experiment[used_rows] == index])]
    for start in range(0, m, CHUNK_ROWS):
        chunk = slice(start, min(start + CHUNK_ROWS, m))
        rows = chunk if m == n else used_rows[chunk]  # every row used: views, no gathering
        values = _decompose_rows(experiments, result, rows, used_rows[chunk], predicted)
        for name, array in values.items():
            parts[name][chunk] = array

    def full(values):
        """Used rows' values as a column of every row (NaN where not used)."""
        if m == n:
            return values
        out = np.full((n,) + values.shape[1:], np.nan)
        out[used] = values
        return out

    return Decomposition(**{name: full(values) for name, values in parts.items()}, rotation=rotation)


def _decompose_rows(experiments, result, rows, row_numbers, predicted) -> dict:
    """The parts of Δq for some used rows (``rows`` indexes the result; ``row_numbers``
    are the same rows as numbers); ``predicted``: experiments whose s1 is a prediction."""
    q_bragg, q_pixel, s0 = result.q_bragg[rows], result.q_pixel[rows], result.s0[rows]
    angle, q_sphere, _ = onto_sphere(q_bragg, s0, result.rotation_axis[rows])
    model_spot = q_sphere.copy()
    if predicted:
        from_prediction = np.isin(result.experiment[row_numbers], predicted)
        model_spot[from_prediction] = result.q_pred[row_numbers[from_prediction]]
    xy_pixel = result.position_mm[rows]
    xy_bragg, delta_lab, beam_centre, spot = (np.empty((row_numbers.size, k)) for k in (2, 3, 3, 3))
    for panel, group in _panel_groups(experiments, result, row_numbers):  # one panel's d matrix at a time
        xy_bragg[group] = geometry.panel_intersection(panel.d_matrix, s0[group] + model_spot[group])
        delta = xy_bragg[group] - xy_pixel[group]
        delta_lab[group] = delta[:, :1] * panel.fast + delta[:, 1:] * panel.slow
        beam_centre[group] = geometry.lab_coordinates(
            panel.origin, panel.fast, panel.slow, geometry.panel_intersection(panel.d_matrix, s0[group])
        )
        spot[group] = geometry.lab_coordinates(panel.origin, panel.fast, panel.slow, xy_pixel[group])
    with np.errstate(invalid="ignore", divide="ignore"):
        radial_dir = geometry.unit(spot - beam_centre)
        transverse_dir = geometry.unit(geometry.cross(radial_dir, beam_centre))
        s1_dir = geometry.unit(s0 + q_pixel)
        transverse_q = geometry.unit(geometry.cross(s1_dir, geometry.unit(s0)))
        radial_q = geometry.cross(s1_dir, transverse_q)
    in_plane_q = model_spot - q_pixel
    return {
        "q_sphere": q_sphere,
        "angle": angle,
        "along_q": geometry.norms(q_bragg) - geometry.norms(q_pixel),
        "delta_xy": xy_bragg - xy_pixel,
        "radial_mm": geometry.rowdot(delta_lab, radial_dir),
        "transverse_mm": geometry.rowdot(delta_lab, transverse_dir),
        "radial": geometry.rowdot(in_plane_q, radial_q),
        "transverse": geometry.rowdot(in_plane_q, transverse_q),
    }
