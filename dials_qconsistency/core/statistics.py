"""The summary of one table: counts, |Δq| statistics and self-tests (Å⁻¹).

|Δq| = |q_bragg - q_pixel|. The self-tests compare q_pixel at the calculated
and at the observed spot positions with q_pred = s1 - s0, which tells whether
the table's s1 is a prediction (refined models), follows the observed
centroids (as after dials.index) or matches neither (the table and the
experiments come from different models).
"""

from __future__ import annotations


from dataclasses import dataclass, field

import numpy as np

from dials_qconsistency.core.blocks import row_blocks
from dials_qconsistency.core.residual_statistics import UsedRows
from dials_qconsistency.core.row_statistics import (
    direction_distances,
    distances,
    finite_values,
    largest_distance,
    largest_value,
    norm_statistics,
    row_distances,
    sample_rows,
)
from dials_qconsistency.core.q_vectors import REASONS, S1_MATCH_TOLERANCE, USED, QResult
from dials_qconsistency.core.time_of_flight import polychromatic_rows, row_wavelengths


S1_PREDICTED = "prediction (s1 ends at xyzcal.mm)"
S1_OBSERVED = "observed centroid (s1 points at xyzobs.mm.value, as after dials.index)"
S1_NEITHER = "neither (s1 matches no position: table and experiments differ?)"


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
class S1Test:
    """What the table's s1 is, for one experiment's used rows (Å⁻¹)."""

    s1_kind: str
    max_pixel_calculated_vs_pred: float | None
    max_pixel_observed_vs_pred: float | None
    max_bragg_vs_pred: float | None  # rotation and Laue data only (q_pred is the model's own q_bragg)
    outside_scan: int  # rows whose model state was clamped to the scan
    off_panel: float = 0.0  # where s1 matches neither position: the share of rows whose position lies off its panel


#: How many pixels a row's position may lie beyond its panel's edges (DIALS'
#: own predictions on the 3 mm pixels of ISIS SXD lie up to 0.6 pixel off)
#: before it counts as off its panel.
OFF_PANEL_PIXELS = 5
#: The rows (an even sample) whose positions tell the share off their panels:
#: a share is all the verdict needs, and a few pages of the input are read
#: again, not the whole position and panel columns (80 MB at 10M rows).
OFF_PANEL_SAMPLE = 1000


def share_off_their_panels(result: QResult, detector, rows) -> float:
    """The share of ``rows`` (of an even sample of OFF_PANEL_SAMPLE of them)
    whose position (the q_pixel one, panel mm) lies more than
    OFF_PANEL_PIXELS beyond its panel's edges: a table made with another
    detector, or paired with the wrong models."""
    rows = sample_rows(rows, OFF_PANEL_SAMPLE)
    if not rows.size:
        return 0.0
    pixel = np.array([np.asarray(p.pixel_size, dtype=float) for p in detector.panels])
    extent = np.array([p.size_mm for p in detector.panels])
    panel, xy = result.panel[rows], result.position_mm[rows]
    off = (xy < -OFF_PANEL_PIXELS * pixel[panel]) | (xy > extent[panel] + OFF_PANEL_PIXELS * pixel[panel])
    return float(np.count_nonzero(off.any(axis=1))) / rows.size


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
    off_panel: float = 0.0
    residuals: dict = field(default_factory=dict)
    #: A still whose rows' rotation angles vary: (what its models lack, lowest
    #: and highest angle, degrees); None otherwise.
    turning: tuple | None = None
    #: Stills: RMS |Δψ − delpsical.rad| (rad), the model's Ewald offsets against
    #: those DIALS' stills predictor wrote; None without the column.
    rms_psi_vs_table: float | None = None


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
    rotation: bool = False  # some experiment is rotation data
    scan_varying: bool = False  # some model of the experiments varies along its scan


def resolution_shells(q_bragg, rows, n_shells: int):
    """(shell index per selected row (int32), edges in Å from low to high
    resolution): shells of equal volume in 1/d³, d = 1/|q_bragg|; None when
    some d is not finite. A block of rows at a time: besides the result, one
    array of the rows' length."""
    inverse_cubed = row_distances(q_bragg, rows=rows)  # |q|, then 1/d³ in its place
    blocks = row_blocks(inverse_cubed.size)
    for block in blocks:
        with np.errstate(divide="ignore"):  # |q| = 0: d infinite, no shells
            d_spacing = 1.0 / inverse_cubed[block]
        if not np.isfinite(d_spacing).all():
            return None
        inverse_cubed[block] = 1.0 / d_spacing**3
    low, high = inverse_cubed.min(), inverse_cubed.max()
    width = (high - low) / n_shells or 1.0
    shell = np.empty(inverse_cubed.size, dtype=np.int32)
    for block in blocks:
        shell[block] = np.clip(np.floor((inverse_cubed[block] - low) / width).astype(int), 0, n_shells - 1)
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


def s1_self_tests(result: QResult, experiments) -> list[S1Test | None]:
    """The self-tests of s1 per experiment (None: no used row): the q_pred
    distances a summary reports, computed while the result still has q_pred."""
    tests = []
    for experiment, rows in zip(experiments, result.used_rows_by_experiment(len(experiments))):
        if not rows.size:
            tests.append(None)
            continue
        observed = result.observed_to_pred
        cal = largest_distance(result.q_pixel_calculated, result.q_pred, rows)
        obs = None if observed is None else largest_value(observed, rows)
        if experiment.is_laue:  # s1 has the length of the wavelength it was made with: compare directions
            s1_kind = classify_s1_distances(
                direction_distances(result.q_pixel_calculated, result.q_pred, result.s0, rows),
                None if observed is None else finite_values(result.observed_direction_to_pred, rows))
        elif cal is not None and cal <= S1_MATCH_TOLERANCE:  # a prediction (the usual case): no distances kept
            s1_kind = S1_PREDICTED
        else:
            s1_kind = classify_s1_distances(distances(result.q_pixel_calculated, result.q_pred, rows),
                                            None if observed is None else finite_values(observed, rows))
        predicted_from_q = experiment.is_rotation or experiment.is_laue  # q_pred is the model's own q_bragg
        tests.append(S1Test(s1_kind, cal, obs,
                            largest_distance(result.q_bragg, result.q_pred, rows) if predicted_from_q else None,
                            int(np.count_nonzero(result.outside_scan[rows])),
                            share_off_their_panels(result, experiment.detector, rows) if s1_kind == S1_NEITHER else 0.0))
    return tests


def stills_psi_tests(result: QResult, experiments, parts, delpsical) -> list[float | None]:
    """Per experiment, RMS |Δψ − delpsical.rad| (rad) over the used rows of a
    still whose ``delpsical.rad`` (DIALS' stills predictor's) is finite: a
    crystal (or beam) other than the one the predictor used changes the Ewald
    offsets, which moves no calculated position. None: not a still, no
    decomposition, no column, or no finite nonzero value in it (a column of
    zeros was not written by the predictor)."""
    if delpsical is None or parts is None:
        return [None] * len(experiments)
    tests = []
    for experiment, rows in zip(experiments, result.used_rows_by_experiment(len(experiments))):
        table = np.asarray(delpsical)[rows] if experiment.kind == "still" else np.zeros(0)
        finite = np.isfinite(table)
        if not np.any(table[finite]):  # not a still, no row, or nothing the predictor wrote
            tests.append(None)
            continue
        difference = parts.angle[rows][finite] - table[finite]
        tests.append(float(np.sqrt(np.mean(difference * difference))))
    return tests


def summarise(result: QResult, experiments, parts=None, n_shells: int = 10, hierarchy_level: int = 1,
              threads: int = 1, s1_tests=None, psi_tests=None) -> Summary:
    """The statistics of the used rows (``threads``: how many may compute at
    once); ``s1_tests``: :func:`s1_self_tests` of ``result``, if made already
    (they must be once the result's q_pred has been let go); ``psi_tests``:
    :func:`stills_psi_tests`."""
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
        shells = resolution_shells(result.q_bragg, table.selection, n_shells) if n_shells > 0 else None
        if shells is not None:
            shell, edges = shells
            groupings["shell"] = (shell, n_shells)
            labelled["shell"] = [{"d_max": float(edges[i]), "d_min": float(edges[i + 1])} for i in range(n_shells)]
        if parts.wavelength_rel is not None and n_shells > 0:
            laue_rows = polychromatic_rows(experiments, experiment_of)
            band, edges = wavelength_bands(result.s0[table.selection], laue_rows, n_shells)
            groupings["wavelength_band"] = (band, n_shells)
            labelled["wavelength_band"] = [{"wavelength_min": float(edges[i]), "wavelength_max": float(edges[i + 1])}
                                           for i in range(n_shells)]
    stats = dict(zip(groupings, table.statistics_by(list(groupings.values()), threads)))

    (everything,) = stats["all"]
    overall = _delta_q_part(everything) if everything else norm_statistics(np.zeros(0))
    summary = Summary(len(result.reason), counts, overall, "", notes=list(result.notes),
                      rotation=any(e.is_rotation for e in experiments),
                      scan_varying=any(e.is_scan_varying for e in experiments))
    if s1_tests is None:
        s1_tests = s1_self_tests(result, experiments)
    for index, (experiment, test) in enumerate(zip(experiments, s1_tests)):
        mine = stats["experiment"][index]
        if mine is None:
            continue
        summary.experiments.append(
            ExperimentSummary(
                index=index,
                kind=experiment.kind,
                delta_q=_delta_q_part(mine),
                s1_kind=test.s1_kind,
                max_pixel_calculated_vs_pred=test.max_pixel_calculated_vs_pred,
                max_pixel_observed_vs_pred=test.max_pixel_observed_vs_pred,
                max_bragg_vs_pred=test.max_bragg_vs_pred,
                outside_scan=test.outside_scan,
                off_panel=test.off_panel,
                residuals=dict(mine) if parts is not None else {},
                turning=result.turning_stills.get(index),
                rms_psi_vs_table=psi_tests[index] if psi_tests else None,
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
