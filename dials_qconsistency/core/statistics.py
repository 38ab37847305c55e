"""Statistics and self-tests on the computed q vectors (Å⁻¹).

|Δq| = |q_bragg - q_pixel|. The self-tests compare q_pixel at the calculated
and at the observed spot positions with q_pred = s1 - s0, which tells whether
the table's s1 is a prediction (refined models), follows the observed
centroids (as after dials.index) or matches neither (the table and the
experiments come from different models).
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field

import numpy as np

from dials_qconsistency.core import geometry
from dials_qconsistency.core.blocks import row_blocks, rows_by_group
from dials_qconsistency.core.q_vectors import REASONS, S1_MATCH_TOLERANCE, USED, QResult
from dials_qconsistency.core.time_of_flight import polychromatic_rows, row_wavelengths


S1_PREDICTED = "prediction (s1 ends at xyzcal.mm)"
S1_OBSERVED = "observed centroid (s1 points at xyzobs.mm.value, as after dials.index)"
S1_NEITHER = "neither (s1 matches no position: table and experiments differ?)"


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
    below, above, weight = _percentile_positions(n, np.true_divide(95, 100))
    below, above = int(below), int(above)
    middle_low, middle_high = (n - 1) // 2, n // 2
    ordered = np.partition(values, sorted({middle_low, middle_high, below, above}))
    return {
        "n": int(n),
        "mean": float(values.mean()),
        "median": float((ordered[middle_low] + ordered[middle_high]) / 2),
        "rms": float(np.sqrt(np.mean(values**2))),
        "p95": float(_lerp(ordered[below], ordered[above], weight)),
        "max": float(values.max()),
    }


def _lerp(a, b, t):
    """numpy's own linear interpolation for percentiles (exact same rounding)."""
    difference = b - a
    return np.where(t >= 0.5, b - difference * (1 - t), a + difference * t)


def _percentile_positions(counts, fraction):
    """(below, above, weight): numpy's 'linear' percentile of ``counts`` sorted
    values is _lerp(sorted[below], sorted[above], weight); scalars or arrays."""
    position = (counts - 1) * fraction
    below = np.floor(position).astype(np.int64)
    return below, np.minimum(below + 1, counts - 1), position - below


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
        below, above, weight = _percentile_positions(counts, fraction)
        return _lerp(ordered[starts + below], ordered[starts + above], weight)

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


def sample_rows(rows, limit: int | None) -> np.ndarray:
    """Indices of the selected rows (a boolean mask, or row numbers in
    ascending order), or of an even sample of at most ``limit`` of them: every
    k-th in table order, as dials.refine samples reflections. None or 0: all."""
    index = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
    if limit and index.size > limit:
        index = index[:: -(-index.size // limit)]
    return index


def take_rows(record, rows, n: int):
    """A copy of a per-row record of ``n`` rows (QResult, Decomposition) holding only ``rows``."""
    return dataclasses.replace(record, **{
        f.name: value[rows]
        for f in dataclasses.fields(record)
        if isinstance(value := getattr(record, f.name), np.ndarray) and value.shape[:1] == (n,)
    })


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


def direction_distances(q_pixel, q_pred, s0, rows) -> np.ndarray:
    """|ŝ1 − û| · |s0| of the selected rows (finite values): how far the table's
    s1 points from the position behind ``q_pixel``, whatever its length. For
    polychromatic rows, where |s1| is the wavelength s1 was made with: the
    observed one after dials.index, the calculated one after dials.refine."""
    s0 = s0[rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.linalg.norm(geometry.unit(q_pixel[rows] + s0) - geometry.unit(q_pred[rows] + s0), axis=1)
        d = d * np.linalg.norm(s0, axis=1)
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
    kind: str  # Experiment.kind: "rotation", "still", "tof" or "laue"
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
    verdict: str  # consistent, inconsistent or nothing to compare (verdict.judge)
    experiments: list[ExperimentSummary] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    residuals: dict = field(default_factory=dict)  # UsedRows.statistics of all used rows
    per_panel: list[dict] = field(default_factory=list)
    per_panel_group: list[dict] = field(default_factory=list)
    per_resolution_shell: list[dict] = field(default_factory=list)
    per_wavelength_band: list[dict] = field(default_factory=list)  # polychromatic rows only
    #: |Δq| statistics of the indexed rows refinement did not use (None: every indexed row is used)
    outliers: dict | None = None


#: The residual statistics of :meth:`UsedRows.statistics_by`: RMS of each value per row.
RMS_NAMES = ("rms_in_plane_mm", "rms_x_mm", "rms_y_mm", "rms_radial_mm", "rms_transverse_mm", "rms_radial",
             "rms_transverse", "rms_along_q", "rms_delta_phi_deg", "rms_delta_psi_deg")
#: ... and for tables with polychromatic (Laue) rows: RMS Δλ/λ and time-of-flight error (µs).
LAUE_RMS_NAMES = ("rms_wavelength_rel", "rms_tof_us")


class UsedRows:
    """|Δq| of the used rows, and their residual values a block at a time.

    Groupings (experiment, panel, panel group, resolution shell) are label
    arrays over the used rows; :meth:`statistics_by` reduces every grouping in
    one pass over blocks of rows, so no temporary is the size of the table.
    """

    def __init__(self, result: QResult, parts, used):
        self.rows = np.flatnonzero(used)
        self.norm = row_distances(result.q_bragg, result.q_pixel, self.rows)
        self.parts = parts
        self.selection = contiguous(self.rows, len(used))  # the rows, as a slice where they are consecutive
        self._all = None  # norm_statistics of every used row, once
        laue = parts is not None and parts.wavelength_rel is not None
        self.rms_names = RMS_NAMES + (LAUE_RMS_NAMES if laue else ())

    def _values(self, block) -> tuple[dict, np.ndarray]:
        """({statistic: value per row}, |q_bragg| - |q_pixel|) of the used rows at positions ``block``."""
        rows = self.selection
        rows = slice(rows.start + block.start, rows.start + block.stop) if isinstance(rows, slice) else rows[block]
        parts = self.parts
        xy = parts.delta_xy[rows]
        angle = np.degrees(parts.angle[rows])
        rotation = parts.rotation[rows]
        along = parts.along_q[rows]
        return {
            "rms_in_plane_mm": np.hypot(xy[:, 0], xy[:, 1]),
            "rms_x_mm": xy[:, 0],
            "rms_y_mm": xy[:, 1],
            "rms_radial_mm": parts.radial_mm[rows],
            "rms_transverse_mm": parts.transverse_mm[rows],
            "rms_radial": parts.radial[rows],
            "rms_transverse": parts.transverse[rows],
            "rms_along_q": along,
            "rms_delta_phi_deg": np.where(rotation, angle, np.nan),
            "rms_delta_psi_deg": np.where(rotation, np.nan, angle),
            **({"rms_wavelength_rel": parts.wavelength_rel[rows], "rms_tof_us": parts.tof_us[rows]}
               if parts.wavelength_rel is not None else {}),
        }, along

    def statistics_by(self, groupings) -> list[list[dict | None]]:
        """Statistics of every group of every grouping: ``groupings`` is a list
        of (labels, k), labels a group 0..k-1 (or -1: none) per used row, or
        None for all used rows as one group. Returns, per grouping, k dicts
        (None for an empty group).

        Keys: n, mean/median/rms/p95/max of |Δq| (Å⁻¹, :func:`norm_statistics`,
        numpy's floats); with the decomposition also the RMS of the in-plane
        residual and its fast (x), slow (y), radial and transverse parts (mm),
        of the radial and transverse parts in Å⁻¹, mean and RMS of |q_bragg| -
        |q_pixel| (Å⁻¹), RMS Δφ (rotation rows) and Δψ (still rows) in degrees:
        sums of squares of the finite values, group by group (``np.bincount``).
        """
        m = self.rows.size
        names = self.rms_names + ("along",)
        sums = [{name: np.zeros(k) for name in names} for _, k in groupings]
        counts = [{name: np.zeros(k) for name in names} for _, k in groupings]
        # A grouping whose rows all carry one label sums exactly what the first
        # such grouping sums (the same values in the same order): summed once.
        uniform = [labels is None or (labels.size and np.all(labels == labels[0])) for labels, _ in groupings]
        first = uniform.index(True) if any(uniform) else None
        summed = [i for i in range(len(groupings)) if not uniform[i] or i == first]
        for block in row_blocks(m if self.parts is not None else 0):  # no decomposition: |Δq| only
            values, along = self._values(block)
            terms = {name: v * v for name, v in values.items()}
            terms["along"] = along
            finite = {name: np.isfinite(v) for name, v in values.items()}
            finite["along"] = finite["rms_along_q"]
            one_group = np.zeros(block.stop - block.start, dtype=np.int64)
            for i in summed:
                (labels, k), total, count = groupings[i], sums[i], counts[i]
                label = one_group if uniform[i] else labels[block]
                keep = finite
                if not (label >= 0).all():
                    inside = label >= 0
                    label = np.where(inside, label, 0)
                    keep = {name: ok & inside for name, ok in finite.items()}
                everything = np.bincount(label, minlength=k)
                for name, term in terms.items():
                    ok = keep[name]
                    if ok.all():  # the usual case: no mask to apply
                        total[name] += np.bincount(label, weights=term, minlength=k)
                        count[name] += everything
                    elif ok.any():
                        total[name] += np.bincount(label[ok], weights=term[ok], minlength=k)
                        count[name] += np.bincount(label[ok], minlength=k)
        if first is not None:  # the sums of every uniform grouping, in the bin of its one label
            once = {name: (sums[first][name][0], counts[first][name][0]) for name in names}
            for i, (labels, k) in enumerate(groupings):
                if not uniform[i]:
                    continue
                group = 0 if labels is None else int(labels[0]) if labels.size else -1
                for name in names:
                    sums[i][name][:] = 0.0
                    counts[i][name][:] = 0.0
                    if group >= 0:
                        sums[i][name][group], counts[i][name][group] = once[name]
        out = []
        for (labels, k), total, count in zip(groupings, sums, counts):
            stats = self._norm_statistics_by(labels, k)
            for group, entry in enumerate(stats):
                if entry is None or self.parts is None:
                    continue
                for name in self.rms_names:
                    n = count[name][group]
                    entry[name] = float(np.sqrt(total[name][group] / n)) if n else None
                n = count["along"][group]
                entry["mean_along_q"] = float(total["along"][group] / n) if n else None
            out.append(stats)
        return out

    def _norm_statistics_by(self, labels, k) -> list[dict | None]:
        """:func:`norm_statistics` of |Δq| per group, the values in row order."""
        if labels is None or (labels.size and np.all(labels == labels[0])):
            stats = [None] * k
            group = 0 if labels is None else int(labels[0]) if labels.size else -1
            if self.norm.size and group >= 0:
                if self._all is None:  # all rows in one group: the same for every such grouping
                    self._all = norm_statistics(self.norm)
                stats[group] = dict(self._all)
            return stats
        return [norm_statistics(self.norm[rows]) if rows.size else None for rows in rows_by_group(labels, k)]


def resolution_shells(d_spacing, n_shells: int):
    """(shell index per value, edges in Å from low to high resolution): equal volumes in 1/d³."""
    inverse_cubed = 1.0 / np.asarray(d_spacing, dtype=float) ** 3
    low, high = inverse_cubed.min(), inverse_cubed.max()
    width = (high - low) / n_shells or 1.0
    shell = np.clip(np.floor((inverse_cubed - low) / width).astype(int), 0, n_shells - 1)
    edges = np.linspace(low, high, n_shells + 1) ** (-1.0 / 3.0)
    return shell, edges


def wavelength_bands(s0, polychromatic, n_bands: int):
    """(band per row, edges in Å): bands of equal width in λ = 1/|s0| over the
    polychromatic rows; -1 for the other rows."""
    wavelength = row_wavelengths(s0)
    low, high = wavelength[polychromatic].min(), wavelength[polychromatic].max()
    width = (high - low) / n_bands or 1.0
    band = np.clip(np.floor((wavelength - low) / width), 0, n_bands - 1)
    band = np.where(polychromatic, band, -1).astype(np.int32)
    return band, np.linspace(low, high, n_bands + 1)


def _delta_q_part(stats: dict) -> dict:
    return {name: stats[name] for name in ("n", "mean", "median", "rms", "p95", "max")}


def summarise(result: QResult, experiments, parts=None, n_shells: int = 10, hierarchy_level: int = 1) -> Summary:
    used = result.used
    counts = {REASONS[code]: int(np.count_nonzero(result.reason == code)) for code in range(len(REASONS))}
    table = UsedRows(result, parts, used)
    experiment_of = result.experiment[table.selection].astype(np.int32)  # labels: 4 bytes a row
    groupings = {"all": (None, 1), "experiment": (experiment_of, len(experiments))}
    labelled = {}
    if parts is not None and used.any():
        detector = experiments[int(experiment_of[0])].detector
        panel_of = result.panel[table.selection].astype(np.int32)
        n_panels = max(len(detector.panels), int(panel_of.max()) + 1)
        groupings["panel"] = (panel_of, n_panels)
        labelled["panel"] = [{"panel": p, "name": _panel_name(detector, p)} for p in range(n_panels)]
        groups = detector.groups_at_depth(hierarchy_level)  # disjoint: subtrees at one depth
        group_of_panel = np.full(n_panels, -1, dtype=np.int32)
        for index, group in enumerate(groups):
            group_of_panel[list(group.panels)] = index
        groupings["panel_group"] = (group_of_panel[panel_of], len(groups))
        labelled["panel_group"] = [{"group": g.name, "depth": g.depth, "panels": list(g.panels)} for g in groups]
        d_spacing = 1.0 / row_distances(result.q_bragg, rows=table.selection)
        if n_shells > 0 and np.all(np.isfinite(d_spacing)):
            shell, edges = resolution_shells(d_spacing, n_shells)
            groupings["shell"] = (shell.astype(np.int32), n_shells)
            labelled["shell"] = [{"d_max": float(edges[i]), "d_min": float(edges[i + 1])} for i in range(n_shells)]
        del d_spacing
        if parts.wavelength_rel is not None and n_shells > 0:
            laue_rows = polychromatic_rows(experiments, experiment_of)
            band, edges = wavelength_bands(result.s0[table.selection], laue_rows, n_shells)
            groupings["wavelength_band"] = (band, n_shells)
            labelled["wavelength_band"] = [{"wavelength_min": float(edges[i]), "wavelength_max": float(edges[i + 1])}
                                           for i in range(n_shells)]
    stats = dict(zip(groupings, table.statistics_by(list(groupings.values()))))

    (everything,) = stats["all"]
    overall = _delta_q_part(everything) if everything else norm_statistics(np.zeros(0))
    summary = Summary(len(result.reason), counts, overall, "", notes=list(result.notes))
    for index, (experiment, rows) in enumerate(zip(experiments, rows_by_group(result.experiment, len(experiments), used))):
        mine = stats["experiment"][index]
        if mine is None:
            continue
        calculated = distances(result.q_pixel_calculated, result.q_pred, rows)
        observed = None if result.q_pixel_observed is None else distances(result.q_pixel_observed, result.q_pred, rows)
        cal, obs = _largest(calculated), None if observed is None else _largest(observed)
        if experiment.is_laue:  # s1 has the length of the wavelength it was made with: compare directions
            calculated = direction_distances(result.q_pixel_calculated, result.q_pred, result.s0, rows)
            if observed is not None:
                observed = direction_distances(result.q_pixel_observed, result.q_pred, result.s0, rows)
        s1_kind = classify_s1_distances(calculated, observed)
        del calculated, observed
        predicted_from_q = experiment.is_rotation or experiment.is_laue  # q_pred is the model's own q_bragg
        summary.experiments.append(
            ExperimentSummary(
                index=index,
                kind=experiment.kind,
                delta_q=_delta_q_part(mine),
                s1_kind=s1_kind,
                max_pixel_calculated_vs_pred=cal,
                max_pixel_observed_vs_pred=obs,
                max_bragg_vs_pred=_largest(distances(result.q_bragg, result.q_pred, rows)) if predicted_from_q else None,
                outside_scan=int(np.count_nonzero(result.outside_scan[rows])),
                residuals=dict(mine) if parts is not None else {},
            )
        )
    if parts is None or not used.any():
        return summary
    summary.residuals = dict(everything)
    for name, target in (("panel", "per_panel"), ("panel_group", "per_panel_group"), ("shell", "per_resolution_shell"),
                         ("wavelength_band", "per_wavelength_band")):
        if name in stats:
            setattr(summary, target, [{**label, **entry} for label, entry in zip(labelled[name], stats[name])
                                      if entry is not None])
    return summary


def _panel_name(detector, index) -> str:
    return detector.panels[int(index)].name if int(index) < len(detector.panels) else ""


__all__ = ["Summary", "norm_statistics", "summarise", "USED"]
