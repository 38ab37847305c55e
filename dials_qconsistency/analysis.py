"""Statistics and self-tests on the computed q vectors (Å⁻¹).

|Δq| = |q_bragg - q_pixel|. The self-tests compare q_pixel at the calculated
and at the observed spot positions with q_pred = s1 - s0, which tells whether
the table's s1 is a prediction (refined models), follows the observed
centroids (as after dials.index) or matches neither (the table and the
experiments come from different models).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import geometry
from .compute import REASONS, S1_MATCH_TOLERANCE, USED, QResult, row_blocks

#: Interpretation bands for mean |Δq| in Å⁻¹ (upper bound, verdict).
BANDS = ((0.02, "excellent"), (0.05, "good"), (np.inf, "review the model"))

S1_PREDICTED = "prediction (s1 ends at xyzcal.mm)"
S1_OBSERVED = "observed centroid (s1 points at xyzobs.mm.value, as after dials.index)"
S1_NEITHER = "neither (s1 matches no position: table and experiments differ?)"


def band(mean_delta_q: float) -> str:
    for upper, verdict in BANDS:
        if mean_delta_q < upper:
            return verdict
    return BANDS[-1][1]


def norm_statistics(values: np.ndarray) -> dict:
    """n, mean, median, RMS, 95th percentile and max of non-negative values.

    The median and the 95th percentile come from one ``np.partition`` and are
    the same floats as ``np.median`` and ``np.percentile(values, 95)`` (numpy's
    'linear' method, its own interpolation).
    """
    values = np.asarray(values, dtype=float)
    n = values.size
    if n == 0:
        return {"n": 0, "mean": None, "median": None, "rms": None, "p95": None, "max": None}
    position = (n - 1) * np.true_divide(95, 100)
    below = int(np.floor(position))
    above = min(below + 1, n - 1)
    middle_low, middle_high = (n - 1) // 2, n // 2
    ordered = np.partition(values, sorted({middle_low, middle_high, below, above}))
    return {
        "n": int(n),
        "mean": float(values.mean()),
        "median": float((ordered[middle_low] + ordered[middle_high]) / 2),
        "rms": float(np.sqrt(np.mean(values**2))),
        "p95": float(_lerp(ordered[below], ordered[above], position - below)),
        "max": float(values.max()),
    }


def _lerp(a, b, t):
    """numpy's own linear interpolation for percentiles (exact same rounding)."""
    difference = b - a
    return np.where(t >= 0.5, b - difference * (1 - t), a + difference * t)


def grouped_statistics(groups, values) -> tuple[np.ndarray, dict]:
    """:func:`norm_statistics` for every group at once (no loop over groups).

    ``groups`` are integer keys per value. Returns (sorted unique keys, dict of
    arrays n, mean, median, rms, p95, max). n, median, p95 and max equal
    ``norm_statistics`` of each group exactly (numpy's 'linear' percentile and
    its median of the two middle values); mean and RMS are sums in value order,
    equal to numpy's pairwise sums to rounding (~1e-16 relative).
    """
    groups = np.asarray(groups, dtype=np.int64)
    values = np.asarray(values, dtype=float)
    order = np.lexsort((values, groups))
    keys, starts, counts = np.unique(groups[order], return_index=True, return_counts=True)
    ordered = values[order]
    last = starts + counts - 1

    def percentile(fraction):
        position = (counts - 1) * fraction
        below = np.floor(position).astype(np.int64)
        above = np.minimum(below + 1, counts - 1)
        return _lerp(ordered[starts + below], ordered[starts + above], position - below)

    middle_low = starts + (counts - 1) // 2
    middle_high = starts + counts // 2
    sums = np.add.reduceat(ordered, starts) if ordered.size else np.zeros(0)
    squares = np.add.reduceat(ordered * ordered, starts) if ordered.size else np.zeros(0)
    return keys, {
        "n": counts,
        "mean": sums / counts,
        "median": (ordered[middle_low] + ordered[middle_high]) / 2,
        "rms": np.sqrt(squares / counts),
        "p95": percentile(np.true_divide(95, 100)),
        "max": ordered[last],
    }


def contiguous(rows, count: int):
    """``rows`` (sorted unique indices, or a slice) as a slice when they are a
    run of consecutive rows: the arrays are then read as views, not gathered."""
    if isinstance(rows, slice):
        return slice(*rows.indices(count)[:2])
    if rows.size == 0 or rows[-1] - rows[0] == rows.size - 1:
        return slice(int(rows[0]), int(rows[-1]) + 1) if rows.size else slice(0, 0)
    return rows


def row_distances(a, b=None, rows=slice(None)) -> np.ndarray:
    """|a − b| (|a| without ``b``) of the selected rows, in row order, a block
    of rows at a time (no temporary the size of the table)."""
    rows = contiguous(rows, len(a))
    first = rows.start if isinstance(rows, slice) else 0
    count = rows.stop - rows.start if isinstance(rows, slice) else rows.size
    out = np.empty(count)
    for block in row_blocks(count):
        chosen = slice(first + block.start, first + block.stop) if isinstance(rows, slice) else rows[block]
        out[block] = geometry.norms(a[chosen] if b is None else a[chosen] - b[chosen])
    return out


def distances(a, b, rows=slice(None)) -> np.ndarray:
    """The finite values of :func:`row_distances`."""
    d = row_distances(a, b, rows)
    return d[np.isfinite(d)]


def _largest(d) -> float | None:
    return float(d.max()) if d.size else None


def classify_s1_distances(calculated, observed) -> str:
    """Is s1 a prediction, an observed centroid, or neither?

    ``calculated`` and ``observed`` are |q_pixel − q_pred| at the calculated and
    observed positions. A prediction ends exactly at xyzcal.mm. After
    dials.index s1 was computed from the observed centroids with the geometry
    of that moment, so it points at xyzobs.mm.value exactly or, once the
    detector was refined, much closer to it than to xyzcal.mm (median distance
    less than half).
    """
    if calculated.size and calculated.max() <= S1_MATCH_TOLERANCE:
        return S1_PREDICTED
    if observed is not None:
        if observed.size and (
            observed.max() <= S1_MATCH_TOLERANCE
            or (calculated.size and np.median(observed) < 0.5 * np.median(calculated))
        ):
            return S1_OBSERVED
    return S1_NEITHER


@dataclass
class ExperimentSummary:
    index: int
    kind: str  # "rotation" or "still"
    delta_q: dict
    s1_kind: str
    max_pixel_calculated_vs_pred: float | None
    max_pixel_observed_vs_pred: float | None
    max_bragg_vs_pred: float | None
    outside_scan: int
    residuals: dict = field(default_factory=dict)


@dataclass
class Summary:
    n_rows: int
    counts: dict
    delta_q: dict
    verdict: str
    experiments: list[ExperimentSummary] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    residuals: dict = field(default_factory=dict)  # UsedRows.statistics of all used rows
    per_panel: list[dict] = field(default_factory=list)
    per_panel_group: list[dict] = field(default_factory=list)
    per_resolution_shell: list[dict] = field(default_factory=list)


def _rms(values) -> float | None:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(np.sqrt(np.mean(values**2))) if values.size else None


class UsedRows:
    """The per-row values the statistics need, for used rows only, computed once.

    Groupings (experiment, panel, panel group, resolution shell) then select
    positions among the used rows instead of masking every row of the table.
    """

    def __init__(self, result: QResult, parts, used):
        self.rows = np.flatnonzero(used)
        every = self.rows.size == len(used)
        pick = (lambda values: values) if every else (lambda values: values[self.rows])
        self.norm = row_distances(result.q_bragg, result.q_pixel, self.rows)
        self._cache = {}
        self.parts = parts is not None
        if not self.parts:
            return
        self.delta_xy = pick(parts.delta_xy)
        self.in_plane = np.hypot(self.delta_xy[:, 0], self.delta_xy[:, 1])
        self.radial_mm, self.transverse_mm = pick(parts.radial_mm), pick(parts.transverse_mm)
        self.radial, self.transverse = pick(parts.radial), pick(parts.transverse)
        self.along = pick(parts.along_q)
        self.angle = np.degrees(pick(parts.angle))
        self.rotation = pick(parts.rotation)

    def statistics(self, positions) -> dict:
        """Statistics of the used rows at ``positions`` (an index array or slice).

        Keys: n, mean/median/rms/p95/max of |Δq| (Å⁻¹); rms of the in-plane
        residual and its fast (x), slow (y), radial and transverse parts (mm);
        rms radial and transverse (Å⁻¹); mean and rms of |q_bragg| - |q_pixel|
        (Å⁻¹); rms Δφ (rotation rows) and Δψ (still rows) in degrees.
        """
        positions = contiguous(positions, self.rows.size)
        key = (positions.start, positions.stop) if isinstance(positions, slice) else None
        if key in self._cache:  # the same rows again (one experiment: all of them)
            return dict(self._cache[key])
        stats = self.delta_q_statistics(positions)
        if not self.parts:
            return stats
        along, angle, rotation = self.along[positions], self.angle[positions], self.rotation[positions]
        stats.update(
            {
                "rms_in_plane_mm": _rms(self.in_plane[positions]),
                "rms_x_mm": _rms(self.delta_xy[positions, 0]),
                "rms_y_mm": _rms(self.delta_xy[positions, 1]),
                "rms_radial_mm": _rms(self.radial_mm[positions]),
                "rms_transverse_mm": _rms(self.transverse_mm[positions]),
                "rms_radial": _rms(self.radial[positions]),
                "rms_transverse": _rms(self.transverse[positions]),
                "mean_along_q": float(np.mean(along)) if along.size else None,
                "rms_along_q": _rms(along),
                "rms_delta_phi_deg": _rms(angle[rotation]),
                "rms_delta_psi_deg": _rms(angle[~rotation]),
            }
        )
        if key is not None:
            self._cache[key] = dict(stats)
        return stats

    def delta_q_statistics(self, positions) -> dict:
        """:func:`norm_statistics` of |Δq| at ``positions``, computed once per set of rows."""
        positions = contiguous(positions, self.rows.size)
        if not isinstance(positions, slice):
            return norm_statistics(self.norm[positions])
        key = ("delta_q", positions.start, positions.stop)
        if key not in self._cache:
            self._cache[key] = norm_statistics(self.norm[positions])
        return dict(self._cache[key])


def resolution_shells(d_spacing, n_shells: int):
    """(shell index per value, edges in Å from low to high resolution): equal volumes in 1/d³."""
    inverse_cubed = 1.0 / np.asarray(d_spacing, dtype=float) ** 3
    low, high = inverse_cubed.min(), inverse_cubed.max()
    width = (high - low) / n_shells or 1.0
    shell = np.clip(np.floor((inverse_cubed - low) / width).astype(int), 0, n_shells - 1)
    edges = np.linspace(low, high, n_shells + 1) ** (-1.0 / 3.0)
    return shell, edges


def _grouped(table: UsedRows, labelled) -> list[dict]:
    """Statistics of each labelled selection (a mask over the used rows) that is not empty."""
    out = []
    for label, mask in labelled:
        positions = np.flatnonzero(mask)
        if positions.size:
            out.append({**label, **table.statistics(positions)})
    return out


def summarise(result: QResult, experiments, parts=None, n_shells: int = 10, hierarchy_level: int = 1) -> Summary:
    used = result.used
    counts = {REASONS[code]: int(np.count_nonzero(result.reason == code)) for code in range(len(REASONS))}
    table = UsedRows(result, parts, used)
    overall = table.delta_q_statistics(slice(None))
    verdict = band(overall["mean"]) if overall["n"] else "nothing to compare"
    summary = Summary(len(result.reason), counts, overall, verdict, notes=list(result.notes))
    experiment_of = result.experiment[table.rows]
    for index, experiment in enumerate(experiments):
        positions = np.flatnonzero(experiment_of == index)
        if not positions.size:
            continue
        rows = table.rows[positions]
        calculated = distances(result.q_pixel_calculated, result.q_pred, rows)
        observed = None if result.q_pixel_observed is None else distances(result.q_pixel_observed, result.q_pred, rows)
        cal, obs = _largest(calculated), None if observed is None else _largest(observed)
        s1_kind = classify_s1_distances(calculated, observed)
        del calculated, observed
        rotation = experiment.is_rotation
        summary.experiments.append(
            ExperimentSummary(
                index=index,
                kind="rotation" if rotation else "still",
                delta_q=table.delta_q_statistics(positions),
                s1_kind=s1_kind,
                max_pixel_calculated_vs_pred=cal,
                max_pixel_observed_vs_pred=obs,
                max_bragg_vs_pred=_largest(distances(result.q_bragg, result.q_pred, rows)) if rotation else None,
                outside_scan=int(np.count_nonzero(result.outside_scan[rows])),
                residuals=table.statistics(positions) if parts is not None else {},
            )
        )
    if parts is None or not used.any():
        return summary
    summary.residuals = table.statistics(slice(None))
    detector = experiments[int(experiment_of[0])].detector
    panel_of = result.panel[table.rows]
    panels = np.unique(panel_of)
    summary.per_panel = _grouped(
        table, [({"panel": int(p), "name": _panel_name(detector, p)}, panel_of == p) for p in panels]
    )
    summary.per_panel_group = _grouped(
        table,
        [
            ({"group": group.name, "depth": group.depth, "panels": list(group.panels)}, np.isin(panel_of, group.panels))
            for group in detector.groups_at_depth(hierarchy_level)
        ],
    )
    d_spacing = 1.0 / row_distances(result.q_bragg, rows=table.rows)
    if n_shells > 0 and np.all(np.isfinite(d_spacing)):
        shell, edges = resolution_shells(d_spacing, n_shells)
        summary.per_resolution_shell = _grouped(
            table, [({"d_max": float(edges[i]), "d_min": float(edges[i + 1])}, shell == i) for i in range(n_shells)]
        )
    return summary


def _panel_name(detector, index) -> str:
    return detector.panels[int(index)].name if int(index) < len(detector.panels) else ""


__all__ = ["BANDS", "Summary", "band", "norm_statistics", "summarise", "USED"]
