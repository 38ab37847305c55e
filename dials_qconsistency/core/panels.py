"""Positions on the detector's panels: panel px -> panel mm (parallax included),
and q at panel positions, one row's panel looked up per row without sorting.
Lab frame, mm and Å⁻¹ (no 2π).
"""

from __future__ import annotations

import numpy as np

from dials_qconsistency.core import geometry


def _panel_arrays(detector, panel_rows):
    """Per-row origin, fast, slow, pixel size, mu, thickness and parallax flag."""
    panels = detector.panels
    stack = lambda attr: np.array([getattr(p, attr) for p in panels], dtype=float)
    take = lambda array: array[panel_rows]
    return {
        "origin": take(stack("origin")),
        "fast": take(stack("fast")),
        "slow": take(stack("slow")),
        "pixel_size": take(stack("pixel_size")),
        "mu": take(stack("mu")),
        "thickness": take(stack("thickness")),
        "parallax": take(np.array([p.parallax for p in panels], dtype=bool)),
    }


def panel_groups(panel_rows):
    """(panel, row positions) for each panel in ``panel_rows``; one group with
    ``slice(None)`` when every row is on the same panel (no gathering then)."""
    panel_rows = np.asarray(panel_rows)
    if panel_rows.size and np.all(panel_rows == panel_rows[0]):
        return [(int(panel_rows[0]), slice(None))]
    order = np.argsort(panel_rows, kind="stable")
    panels, starts = np.unique(panel_rows[order], return_index=True)
    return [(int(p), rows) for p, rows in zip(panels, np.split(order, starts[1:]))]


def panel_pixel_to_millimetre(detector, panel_rows, xy_px):
    """Panel px (sub-pixel) -> panel mm (N, 2) with each row's panel mapping (parallax included).

    Panels read by the native backend map with dxtbx's own PxMmStrategy, one
    call per panel over all its rows.
    """
    if detector.panels[0].pixel_to_millimetre is not None:
        xy_px = np.asarray(xy_px, dtype=float)
        xy_mm = np.empty(xy_px.shape)
        for index, rows in panel_groups(panel_rows):
            xy_mm[rows] = detector.panels[index].pixel_to_millimetre(xy_px[rows])
        return xy_mm
    p = _panel_arrays(detector, panel_rows)
    return geometry.pixel_to_millimetre(
        xy_px, p["pixel_size"], p["origin"], p["fast"], p["slow"], p["mu"], p["thickness"], p["parallax"]
    )


def per_row_components(table, index) -> tuple:
    """The columns of ``table`` (one row per panel) for each row's ``index``:
    per-row arrays taken component by component (``np.take``: no sorting, no
    scattering), or the scalars of one table row when every row has the same."""
    index = np.asarray(index)
    if index.size and np.all(index == index[0]):
        return tuple(table[int(index[0])])
    return tuple(np.take(table[:, k], index) for k in range(table.shape[1]))


def panel_lab_points(detector, panel_rows, xy_mm) -> np.ndarray:
    """Lab positions (N, 3) mm of panel positions (mm) on each row's panel."""
    xy_mm = np.asarray(xy_mm, dtype=float)
    vectors = per_row_components(detector.panel_vectors, panel_rows)
    lab = geometry.panel_points_to_lab(vectors[0:3], vectors[3:6], vectors[6:9], xy_mm[:, 0], xy_mm[:, 1])
    return np.stack(np.broadcast_arrays(*lab), axis=-1)


def panel_q(detector, panel_rows, xy_mm, s0, out=None):
    """q (N, 3) Å⁻¹ at panel positions (mm) on each row's panel, the same
    function dials.q_map evaluates at every pixel; written into ``out`` when given.

    Each row's panel vectors are looked up component by component (np.take on
    the few panels), so rows are neither sorted nor scattered; one panel's
    rows give the same bits as the map's scalar panel vectors.
    """
    xy_mm = np.asarray(xy_mm, dtype=float)
    vectors = per_row_components(detector.panel_vectors, panel_rows)
    lab = geometry.panel_points_to_lab(vectors[0:3], vectors[3:6], vectors[6:9], xy_mm[:, 0], xy_mm[:, 1])
    q = geometry.q_from_lab_components(*lab, s0)
    if out is None:
        return np.stack(q, axis=-1)
    out[:, 0], out[:, 1], out[:, 2] = q
    return out

