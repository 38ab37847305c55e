"""The verdict: is the model consistent, judged by what the data can resolve.

A model is called **consistent** when

* the table's s1 belongs to these models: it ends at the calculated or the
  observed spot position (an s1 that matches neither means that the table was
  made with other models);
* no still (models without a goniometer or a turning scan) has rows whose
  rotation angles vary: that is a rotation table, whose models lost their
  rotation (a 100° sweep fits into stills' Ewald offsets as Δψ, so nothing
  else would show it);
* with calculated positions, the model reproduces its own predictions to
  numerical precision: the model's spot lies on xyzcal.mm (in-plane RMS at most
  ``PRECISION_MM``) and, for rotation data at the calculated φ, q_bragg equals
  q at the calculated position (RMS |Δq| at most ``PRECISION_Q``); for stills |Δq| is
  then exactly the Ewald offset 2|q|·|sin(Δψ/2)|;
* for stills whose table has DIALS' ``delpsical.rad``, whatever the positions,
  the model's Δψ equals it (RMS at most ``PRECISION_PSI``): a crystal other
  than the predictor's moves no calculated position, only the offsets;
* no mistake named by the diagnosis is large against the centroids' own
  uncertainty: the RMS distance by which the fitted change moves the spots
  (√(before² − after²), Å⁻¹) stays below ``LARGE`` times the median
  uncertainty σ_q of an observed centroid in q.

σ_q of a row is σ_mm·|s0|/|L|: the centroid's standard deviation in the
detector plane (√(var x + var y) from ``xyzobs.mm.variance``, or the pixel's
own √((px² + py²)/12) where the table has no variances) turned into Å⁻¹ at the
spot's distance |L| from the sample. With observed positions the normalised
residuals (in-plane residual over σ along each panel axis, as refinement
weights them) are reported too.

The headline is the first reason: positions off their panels (a table of
another detector), a rotation table taken as stills, then a named mistake
(the stills' Ewald offsets instead where the model's spots are exactly the
table's and only a detector change was fitted: no detector change can
separate them), then the failed checks. When the
leading named mistake (pooled, or of an experiment whose s1 matches neither
position) still leaves more than ``UNEXPLAINED`` σ_q (RMS) after its fit, it
does not explain the table: "made with other models" leads instead. With
calculated positions, once a check fails, a mistake too small to count against
σ_q whose fit leaves at most ``EXACT_LEFT`` of what it moves is given too,
before the checks it explains (a 0.3 mm distance on SXD's 3 mm pixels).
A mistake named for its significance alone (where no fit explains half the
residual; with calculated positions the diagnosis's partial fit) is a
suspect: given before the checks it explains when one fails; else the
verdict is consistent and its headline names it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from dials_qconsistency.core import geometry
from dials_qconsistency.core.statistics import OFF_PANEL_PIXELS, S1_NEITHER
from dials_qconsistency.core.row_statistics import sample_rows, take_rows
from dials_qconsistency.core.blocks import rows_by_group
from dials_qconsistency.core.decomposition import spot_lab_positions
from dials_qconsistency.core.findings import DETECTOR_MISTAKES

#: The model's spot on xyzcal.mm to this RMS (mm): rounding, not geometry.
PRECISION_MM = 1e-6
#: q_bragg = q_pred to this RMS (Å⁻¹) for rotation data at the calculated φ.
PRECISION_Q = 1e-9
#: Stills: the model's Δψ = the table's delpsical.rad to this RMS (rad).
PRECISION_PSI = 1e-9
#: The model's wavelengths on the table's calculated times of flight to this
#: RMS relative error (CODATA revisions of m_n differ by 1.5e-9).
PRECISION_WAVELENGTH = 1e-7
#: A named mistake counts when it moves the spots by at least this fraction of σ_q
#: (a time-of-flight mistake: the times, against σ_t).
LARGE = 0.25
#: σ_q is the median over at most this many used rows (an even sample).
SAMPLE = 100_000
#: With calculated positions, a named mistake too small against σ_q is still
#: given as a reason when the checks fail and its fit leaves at most this
#: fraction of what it moves (RMS): it is what separates the models from the
#: table's predictions.
EXACT_LEFT = 0.1
#: A fitted mistake that leaves more than this many σ_q (RMS) unexplained does
#: not account for a table whose s1 matches neither position: that table was
#: made with other models, and the verdict says so first.
UNEXPLAINED = 10


@dataclass
class Verdict:
    consistent: bool | None  # None: nothing to compare
    headline: str  # one sentence, first in the log, the JSON and the report
    reasons: list[str] = field(default_factory=list)  # why not consistent
    checks: dict = field(default_factory=dict)  # the numbers behind it

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def short(self) -> str:
        return {True: "consistent", False: "inconsistent", None: "nothing to compare"}[self.consistent]


@dataclass
class CentroidSigma:
    """σ_q (Å⁻¹) of an observed centroid on an even sample of used rows (finite,
    > 0), and each sampled row's experiment."""
    sigma: np.ndarray
    experiment: np.ndarray

    def median(self, experiments=None) -> float | None:
        """The median over the rows of ``experiments`` (None: all); None without rows."""
        sigma = self.sigma if experiments is None else self.sigma[np.isin(self.experiment, list(experiments))]
        return float(np.median(sigma)) if sigma.size else None


def centroid_sigmas(experiments, result, variance=None, max_rows=SAMPLE) -> CentroidSigma:
    """σ_q of the observed centroids of an even sample of used rows: their
    variance (else a pixel's own spread) turned into Å⁻¹ at each spot."""
    rows = sample_rows(result.used, max_rows)
    if rows.size == 0:
        return CentroidSigma(np.zeros(0), np.zeros(0, dtype=np.int64))
    points = take_rows(result, rows, len(result.reason), ("reason", "experiment", "panel", "position_mm", "s0"))
    distance = np.linalg.norm(spot_lab_positions(experiments, points), axis=1)  # sample to spot, mm
    if variance is not None:
        sigma_mm = np.sqrt(np.sum(np.maximum(variance[rows, :2], 0), axis=1))
    else:  # a pixel's own spread, √((px² + py²)/12), of each row's panel
        sigma_mm = np.full(rows.size, np.nan)
        for index, mine in enumerate(rows_by_group(points.experiment, len(experiments))):
            if mine.size:
                pixel = np.array([p.pixel_size for p in experiments[index].detector.panels])[points.panel[mine]]
                sigma_mm[mine] = np.sqrt(np.sum(pixel**2, axis=1) / 12.0)
    sigma = sigma_mm * np.linalg.norm(points.s0, axis=1) / distance
    kept = np.isfinite(sigma) & (sigma > 0)
    return CentroidSigma(sigma[kept], np.asarray(points.experiment)[kept])


def normalised_residual(parts, result, variance, max_rows=SAMPLE) -> float | None:
    """RMS of the in-plane residual over σ along each panel axis (observed positions)."""
    if variance is None or parts is None:
        return None
    rows = sample_rows(result.used, max_rows)
    var = variance[rows, :2]
    ok = geometry.rows_where_all(lambda v: v > 0, var) & geometry.finite_rows(parts.delta_xy[rows])
    if not ok.any():
        return None
    return float(np.sqrt(np.mean(parts.delta_xy[rows][ok] ** 2 / var[ok])))


def time_sigma_us(experiments, result, columns) -> float | None:
    """Median time-of-flight uncertainty (µs) of the observed centroids of the
    used time-of-flight rows: the frame variance (z of ``xyzobs.px.variance``)
    times the scan's µs per frame there. (DIALS' ``xyzobs.mm.variance`` z of
    time-of-flight data is not in µs².) None without them."""
    variance, frame = columns.get("xyzobs.px.variance"), columns.get("xyzobs.px.value")
    if result.tof is None or variance is None or frame is None:
        return None
    sigma = []
    for experiment, rows in zip(experiments, rows_by_group(result.experiment, len(experiments),
                                                           result.used & np.isfinite(result.tof))):
        if not rows.size or experiment.kind != "tof":
            continue
        times = experiment.scan.time_of_flight
        per_frame = np.interp(np.asarray(frame, dtype=float)[rows, 2], np.arange(times.size), np.gradient(times))
        sigma.append(np.sqrt(np.asarray(variance, dtype=float)[rows, 2]) * per_frame)
    sigma = np.concatenate(sigma) if sigma else np.zeros(0)
    sigma = sigma[np.isfinite(sigma) & (sigma > 0)]
    return float(np.median(sigma)) if sigma.size else None


def judge(summary, options, diagnoses=None, sigma_q=None, normalised=None, scan_varying=False,
          sigma_t=None, sigma_q_of=None) -> Verdict:
    """The verdict of one table (``diagnoses`` None: without the diagnosis;
    ``scan_varying``: some model varies along its scan; ``sigma_t``: the
    centroids' time-of-flight uncertainty, µs, for time-of-flight data;
    ``sigma_q_of(experiments)``: σ_q over those experiments' rows, against
    which a mistake named for them is weighed; else ``sigma_q`` for all)."""
    if not summary.delta_q["n"]:
        return Verdict(None, "Nothing to compare: no row has an indexed reflection with a position and s1.")
    # The model's spots on the table's calculated ones to rounding: no detector
    # change separates these models from the table's (a fit that names one
    # has taken up something else, the Ewald offsets of stills).
    in_plane = summary.residuals.get("rms_in_plane_mm")
    spots_exact = options.q_pixel_source == "calculated" and in_plane is not None and in_plane <= PRECISION_MM
    reasons = _named_mistakes(diagnoses, sigma_q, sigma_t, sigma_q_of)  # the mistake first, then the checks it breaks
    named = [entry for entry, _ in reasons]
    mistake_of = {reason: entry["mistake"] for entry, reason in reasons
                  if reason and not (spots_exact and entry["mistake"] in DETECTOR_MISTAKES)}
    reasons = list(mistake_of)
    checks = {"q_pixel_source": options.q_pixel_source, "phi": options.phi, "centroid_sigma_q": sigma_q,
              "normalised_residual": normalised}
    if sigma_t is not None:
        checks["centroid_sigma_t_us"] = sigma_t
    others = [e.index for e in summary.experiments if e.s1_kind == S1_NEITHER]
    off_panel = [e for e in summary.experiments if e.off_panel > OFF_PANEL_SHARE]
    turning = [e for e in summary.experiments if e.turning]
    if off_panel:  # first: no fitted mistake explains a table of another detector
        reasons.insert(0,
            f"{'' if len(off_panel) == 1 else 'at least '}{min(e.off_panel for e in off_panel):.0%} of the table's "
            f"positions lie off their panels (by more than {OFF_PANEL_PIXELS} pixels) in experiment(s) "
            f"{_list([e.index for e in off_panel])}: the table was "
            "made with another detector than these models' (are these files a pair?)"
        )
    if turning:  # then: a rotation table taken as stills, whatever its residuals
        lacks = turning[0].turning[0]
        low, high = min(e.turning[1] for e in turning), max(e.turning[2] for e in turning)
        checks["turning_stills"] = [{"experiment": e.index, "lacks": e.turning[0], "phi_deg": list(e.turning[1:])}
                                    for e in turning]
        reasons.insert(bool(off_panel),
            f"experiment(s) {_list([e.index for e in turning])} are stills ({lacks}: q_bragg = A.h), yet the rotation "
            f"angles of their indexed rows run from {low:.3g} to {high:.3g} deg: a rotation table (is the goniometer or "
            "the scan missing from the .expt, or are these files not a pair?)"
        )
    explained_at = len(reasons)  # a small mistake that explains the checks comes before them
    leading = next((entry for entry in named if entry["large"]), None)  # the first large named mistake
    if others:
        other_models = (f"the table's s1 matches neither spot position in experiment(s) {_list(others)}: the table "
                        "was made with other models than these")
        # A leading fit, pooled or of such an experiment, that leaves more than
        # UNEXPLAINED σ_q does not explain the table: "other models" leads.
        scopes = {"pooled"} | {f"experiment {index}" for index in others}
        poor_fit = leading is not None and leading["unexplained"] and leading["scope"] in scopes
        reasons.insert(bool(off_panel) + bool(turning) if poor_fit else len(reasons), other_models)
        explained_at += poor_fit  # "other models" went before it
    psi = max((e.rms_psi_vs_table for e in summary.experiments if e.rms_psi_vs_table is not None), default=None)
    if psi is not None:  # stills: whatever the positions, Δψ depends on the crystal and beam alone
        checks["rms_delta_psi_vs_delpsical_rad"] = psi
        if psi > PRECISION_PSI:
            first = spots_exact and (leading is None or leading["mistake"] in DETECTOR_MISTAKES)
            explained_at += first
            reasons.insert(bool(off_panel) + bool(turning) if first else len(reasons),
                f"for stills the model's Ewald offsets differ from the table's delpsical.rad by {psi:.3g} rad (RMS), "
                f"beyond numerical precision ({PRECISION_PSI:g}): the crystals (or beams) are not the ones the "
                "table was predicted with"
            )
    if options.q_pixel_source == "calculated":
        checks["rms_in_plane_mm"] = in_plane
        if in_plane is not None and in_plane > PRECISION_MM:
            reasons.append(
                f"the model's spots are {in_plane:.3g} mm (RMS) from the calculated positions in the table, "
                f"not at them (numerical precision: {PRECISION_MM:g} mm)"
            )
        # Rotation data at the calculated φ, and Laue data (the goniometer static):
        # q_bragg must be q at the table's calculated positions (and angles). Not
        # "q_pred": with the detector changed q_bragg still equals it.
        laue = [e for e in summary.experiments if e.kind in ("tof", "laue")]
        for key, label, kinds, applies in (("rms_delta_q_rotation", "rotation", ("rotation",), options.phi == "calculated"),
                                           ("rms_delta_q_laue", "Laue", ("tof", "laue"), bool(laue))):
            if not applies:
                continue
            worst = max((e.delta_q["rms"] for e in summary.experiments
                         if e.kind in kinds and e.delta_q["rms"] is not None), default=None)
            checks[key] = worst
            if worst is not None and worst > PRECISION_Q:
                reasons.append(
                    f"for {label} data q_bragg differs from q at the table's calculated positions"
                    f"{' and angles' if label == 'rotation' else ''} by {worst:.3g} 1/Angstrom (RMS), "
                    f"beyond numerical precision ({PRECISION_Q:g})"
                    + (f": if these are the models the table was made with, check scan_varying.model_state "
                       f"({_other_model_state(options.model_state)})"
                       # auto takes the state from the table's flags: then the other is no remedy
                       if scan_varying and label == "rotation" and not getattr(options, "model_state_auto", False)
                       else "")
                )
        wavelength = summary.residuals.get("rms_wavelength_rel")
        if wavelength is not None:  # time-of-flight data: the model's times on the table's calculated ones
            checks["rms_wavelength_rel"] = wavelength
            if wavelength > PRECISION_WAVELENGTH:
                reasons.append(
                    f"the model's wavelengths differ from those of the table's calculated times of flight by "
                    f"{wavelength:.3g} (RMS, relative), beyond numerical precision ({PRECISION_WAVELENGTH:g}): the "
                    "flight path or the times belong to another model"
                )
    if reasons and options.q_pixel_source == "calculated":
        # Small against the centroids, yet all that separates these models from
        # the table's own predictions: said before the checks it explains, the
        # best of each scope; no detector change where the spots are exact.
        exact, scopes = [], set()
        for entry in named:
            if (entry["large"] or entry["scope"] in scopes or entry["left_after_fit"] is None
                    or not entry["moves_spots_by"] or entry["left_after_fit"] > EXACT_LEFT * entry["moves_spots_by"]
                    or (spots_exact and entry["mistake"] in DETECTOR_MISTAKES)):
                continue
            scopes.add(entry["scope"])
            exact.append(_exact_reason(entry, sigma_q))
        reasons[explained_at:explained_at] = exact
    # Named for its significance alone (where no fit explains half the residual:
    # the centroids' scatter, observed; the stills' Ewald offsets, calculated):
    # a suspect. It explains a failed check, and leads before it; where nothing
    # fails, the model is consistent (a part of a refined sweep has such fits on
    # its centroids), and the headline says what fits all the same.
    suspects = [entry for entry in named if entry.get("significant") and entry["large"]]
    suspect_of = {_suspect_reason(entry): entry["mistake"] for entry in suspects}
    if reasons and suspect_of:
        reasons[explained_at:explained_at] = list(suspect_of)
        mistake_of.update(suspect_of)
    checks["named"] = named
    # The named mistake the headline gives (None: a pairing problem or a failed check leads).
    checks["leading_mistake"] = mistake_of.get(reasons[0]) if reasons else None
    if reasons:
        return Verdict(False, "INCONSISTENT: " + reasons[0] + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else ""),
                       reasons, checks)
    how = ("to numerical precision" if options.q_pixel_source == "calculated"
           else "within what the centroids can resolve")
    if suspect_of:
        headline, checks["leading_mistake"] = next(iter(suspect_of.items()))
        return Verdict(True, f"CONSISTENT {how}, though one change fits significantly: {headline}", [], checks)
    return Verdict(True, f"CONSISTENT {how}: no mistake in frame, scale or detector is large against the "
                         "centroids' uncertainty", [], checks)


#: A table is said to be of another detector when more than this share of an
#: experiment's rows lie off their panels.
OFF_PANEL_SHARE = 0.25


def _other_model_state(state) -> str:
    """The scan-varying model state to try instead of ``state``, and for which table."""
    if state == "integrate":
        return "refinement for a table of dials.refine"
    return "integrate for a table of dials.integrate"


def _named_mistakes(diagnoses, sigma_q, sigma_t=None, sigma_q_of=None) -> list[tuple[dict, str | None]]:
    """(what the diagnosis named, the reason it gives or None when the mistake is
    small against σ_q); the pooled finding speaks for every experiment. Each
    entry says whether the fit leaves more than ``UNEXPLAINED`` σ_q RMS
    (``unexplained``) and how much (``left_after_fit``, Å⁻¹; spot fits only),
    and the σ_q it is weighed against (``centroid_sigma_q``: of the rows of the
    experiments it is named for, where ``sigma_q_of`` tells it)."""
    diagnoses = diagnoses or []
    pooled_found = any(d.scope == "pooled" and f.mistake != "no_common_cause" for d in diagnoses for f in d.findings)
    out = []
    for diagnosis in diagnoses:
        if diagnosis.scope != "pooled" and pooled_found:
            continue
        for finding in diagnosis.findings + diagnosis.partial:  # a partial fit (calculated positions) is a suspect too
            if finding.mistake == "no_common_cause":
                continue  # each experiment's finding is judged on its own
            timing = "rms_time_before_us" in finding.size  # a time-of-flight mistake moves the times, not the spots
            effect = _effect(diagnosis, finding)
            sigma, what, unit = (sigma_t, "the times of flight", "us") if timing else (
                _sigma_of_scope(diagnosis.scope, finding, sigma_q, sigma_q_of), finding.size.get("measure", "the spots"),
                "1/Angstrom")
            large = effect is None or sigma is None or effect >= LARGE * sigma
            suspect = "f" in finding.size  # named for its significance against the scatter, not what the residual is
            left = None if timing else finding.size.get("rms_after_fit")
            unexplained = bool(left is not None and sigma and left > UNEXPLAINED * sigma)
            reason = None
            if large and not suspect:
                reason = f"{diagnosis.scope}: {finding.message}"
                if effect is not None and sigma:
                    # a size in q at the table's angles (``measure``) is no distance the centroids resolve
                    shown = None if "measure" in finding.size else sigma
                    reason += f" ({_moves(effect, shown, what, unit, own=not timing and sigma != sigma_q)}"
                    if unexplained:
                        reason += f", and leaves {left:.3g} {unit} RMS, {_times(left / sigma)} x, unexplained"
                    reason += ")"
            entry = {"scope": diagnosis.scope, "mistake": finding.mistake, "message": finding.message,
                     "moves_spots_by": effect, "left_after_fit": left, "large": bool(large),
                     "unexplained": unexplained, "centroid_sigma_q": None if timing else sigma}
            if suspect:
                entry.update(significant=True, explained=finding.size.get("explained"), f=finding.size["f"],
                             measure=finding.size.get("measure", "the spots"))
            out.append((entry, reason))
    return out


#: The σ_q of a finding's own experiments replaces that of all rows when they
#: differ by more than this factor (a list of stills beside a sweep, detectors
#: at other distances).
OWN_SIGMA = 1.25


def _sigma_of_scope(scope, finding, sigma_q, sigma_q_of) -> float | None:
    """σ_q of the experiments a finding is named for (one experiment's scope, or
    those a pooled finding stands for) where it differs from all rows' by more
    than OWN_SIGMA, else of all rows."""
    experiments = [int(scope.split()[-1])] if scope.startswith("experiment ") else finding.size.get("experiment_indices")
    if sigma_q_of is None or experiments is None or not sigma_q:
        return sigma_q
    own = sigma_q_of(experiments)
    return own if own and not 1 / OWN_SIGMA <= own / sigma_q <= OWN_SIGMA else sigma_q


def _suspect_reason(entry) -> str:
    """The reason of a mistake named for its significance against the scatter."""
    return (f"{entry['scope']}: {entry['message']} (it moves {entry['measure']} by "
            f"{entry['moves_spots_by']:.3g} 1/Angstrom RMS, {100 * entry['explained']:.0f}% of the squared residual; "
            f"F = {entry['f']:.0f} against the scatter it leaves)")


def _exact_reason(entry, sigma_q) -> str:
    """The reason of a named mistake too small to count against σ_q that
    accounts for the model's spots being off the table's calculated ones."""
    return (f"{entry['scope']}: {entry['message']} "
            f"({_moves(entry['moves_spots_by'], entry['centroid_sigma_q'], own=entry['centroid_sigma_q'] != sigma_q)}: "
            "below what the centroids resolve, but all that separates these models from the table's predictions)")


def _moves(effect: float, sigma: float | None, what: str = "the spots", unit: str = "1/Angstrom", own=False) -> str:
    """How far a named mistake moves the spots (or times), against the centroids'
    uncertainty ``sigma`` (``own``: that of its experiments' rows, not of all)."""
    against = ""
    if sigma:
        against = (f", {_times(effect / sigma)} x their centroids' uncertainty ({sigma:.3g} {unit})" if own
                   else f", {_times(effect / sigma)} x the centroids' uncertainty")
    return f"it moves {what} by {effect:.3g} {unit} RMS{against}"


def _times(ratio: float) -> str:
    return f"{ratio:.1f}" if ratio < 100 else f"{ratio:.0f}"


def _effect(diagnosis, finding) -> float | None:
    if "rms_time_before_us" in finding.size:
        before, after = finding.size["rms_time_before_us"], finding.size["rms_time_after_us"]
        return float(np.sqrt(max(before**2 - after**2, 0.0)))
    # a finding common to some experiments carries its own RMS over their rows
    before = finding.size.get("rms_before_fit", diagnosis.rms_in_plane_before)
    after = finding.size.get("rms_after_fit")
    if before is None or after is None:
        return None
    return float(np.sqrt(max(before**2 - after**2, 0.0)))


def _list(indices) -> str:
    shown = ", ".join(str(i) for i in indices[:5])
    return shown + (f" and {len(indices) - 5} more" if len(indices) > 5 else "")


def campaign_verdict(merged) -> Verdict:
    """The verdict of a run over many files: each file's self-tests (the
    diagnosis is made for one pair at a time), counted."""
    if not merged.delta_q["n"]:
        return Verdict(None, "Nothing to compare: no file has an indexed reflection with a position and s1.")
    if merged.verdict == "consistent":
        return Verdict(True, f"CONSISTENT: every one of the {merged.n_files} files' models reproduces its own "
                             "predictions to numerical precision (the diagnosis is made for one pair at a time)")
    return Verdict(False, f"INCONSISTENT: {merged.verdict} (the files marked inconsistent in the table and the CSV)",
                   [merged.verdict])


def gate_failure(statistics: dict, bounds, verdict=None) -> str | None:
    """The first fail_if bound exceeded, as a one-line reason (None if all hold)."""
    if getattr(bounds, "inconsistent", False) and verdict is not None and verdict.consistent is not True:
        return f"the verdict is {verdict.short} (fail_if.inconsistent=True): {verdict.headline}"
    for name, key in (("mean_delta_q", "mean"), ("median_delta_q", "median"), ("max_delta_q", "max")):
        bound = getattr(bounds, name)
        if bound is None:
            continue
        value = statistics.get(key)
        if value is None:
            return f"{name}: no reflection to compare, so the bound {bound:g} cannot be met"
        if value > bound:
            return f"{key} |delta_q| = {value:.4g} 1/Angstrom exceeds fail_if.{name}={bound:g}"
    return None
