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

from .compute import REASONS, USED, QResult

#: Interpretation bands for mean |Δq| in Å⁻¹ (upper bound, verdict).
BANDS = ((0.02, "excellent"), (0.05, "good"), (np.inf, "review the model"))
#: |q_pixel - q_pred| below this (Å⁻¹) means s1 ends at that position.
S1_MATCH_TOLERANCE = 1e-7

S1_PREDICTED = "prediction (s1 ends at xyzcal.mm)"
S1_OBSERVED = "observed centroid (s1 points at xyzobs.mm.value, as after dials.index)"
S1_NEITHER = "neither (s1 matches no position: table and experiments differ?)"


def band(mean_delta_q: float) -> str:
    for upper, verdict in BANDS:
        if mean_delta_q < upper:
            return verdict
    return BANDS[-1][1]


def norm_statistics(values: np.ndarray) -> dict:
    """n, mean, median, RMS, 95th percentile and max of non-negative values."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return {"n": 0, "mean": None, "median": None, "rms": None, "p95": None, "max": None}
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "rms": float(np.sqrt(np.mean(values**2))),
        "p95": float(np.percentile(values, 95)),
        "max": float(values.max()),
    }


def _norms(a, b) -> np.ndarray:
    d = np.linalg.norm(a - b, axis=1)
    return d[np.isfinite(d)]


def _max_norm(a, b) -> float | None:
    d = _norms(a, b)
    return float(d.max()) if d.size else None


def classify_s1(q_pixel_calculated, q_pixel_observed, q_pred) -> str:
    """Is s1 a prediction, an observed centroid, or neither?

    A prediction ends exactly at xyzcal.mm. After dials.index s1 was computed
    from the observed centroids with the geometry of that moment, so it points
    at xyzobs.mm.value exactly or, once the detector was refined, much closer
    to it than to xyzcal.mm (median distance less than half).
    """
    calculated = _norms(q_pixel_calculated, q_pred)
    if calculated.size and calculated.max() <= S1_MATCH_TOLERANCE:
        return S1_PREDICTED
    if q_pixel_observed is not None:
        observed = _norms(q_pixel_observed, q_pred)
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


@dataclass
class Summary:
    n_rows: int
    counts: dict
    delta_q: dict
    verdict: str
    experiments: list[ExperimentSummary] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def summarise(result: QResult, experiments) -> Summary:
    used = result.used
    counts = {REASONS[code]: int(np.count_nonzero(result.reason == code)) for code in range(len(REASONS))}
    norms = np.linalg.norm(result.delta_q, axis=1)
    overall = norm_statistics(norms[used])
    verdict = band(overall["mean"]) if overall["n"] else "nothing to compare"
    summary = Summary(len(result.reason), counts, overall, verdict, notes=list(result.notes))
    for index, experiment in enumerate(experiments):
        rows = used & (result.experiment == index)
        if not rows.any():
            continue
        cal = _max_norm(result.q_pixel_calculated[rows], result.q_pred[rows])
        obs = (
            _max_norm(result.q_pixel_observed[rows], result.q_pred[rows])
            if result.q_pixel_observed is not None
            else None
        )
        s1_kind = classify_s1(
            result.q_pixel_calculated[rows],
            None if result.q_pixel_observed is None else result.q_pixel_observed[rows],
            result.q_pred[rows],
        )
        rotation = experiment.is_rotation
        summary.experiments.append(
            ExperimentSummary(
                index=index,
                kind="rotation" if rotation else "still",
                delta_q=norm_statistics(norms[rows]),
                s1_kind=s1_kind,
                max_pixel_calculated_vs_pred=cal,
                max_pixel_observed_vs_pred=obs,
                max_bragg_vs_pred=_max_norm(result.q_bragg[rows], result.q_pred[rows]) if rotation else None,
                outside_scan=int(np.count_nonzero(result.outside_scan[rows])),
            )
        )
    return summary


__all__ = ["BANDS", "Summary", "band", "norm_statistics", "summarise", "USED"]
