"""The text summary written to the log and to stdout."""

from __future__ import annotations

import json
import math

from dials_qconsistency.core.q_vectors import NOT_REFINED, REASONS
from dials_qconsistency.core.statistics import S1_NEITHER, S1_OBSERVED, Summary
from dials_qconsistency.core.verdict import PRECISION_Q


def _fmt(value, spec=".3e") -> str:
    return "-" if value is None else format(value, spec)


STATS_HEADER = f"{'':<14}{'n':>8}  {'mean':>9}  {'median':>9}  {'RMS':>9}  {'95th pct':>9}  {'max':>9}"


def _stats_row(label: str, stats: dict) -> str:
    return (
        f"{label:<14}{stats['n']:>8}  {_fmt(stats['mean'])}  {_fmt(stats['median'])}  "
        f"{_fmt(stats['rms'])}  {_fmt(stats['p95'])}  {_fmt(stats['max'])}"
    )


def _statistics_lines(title: str, label: str, stats: dict) -> list[str]:
    """A blank line, the title, the header and the first row of a statistics table."""
    return ["", title, STATS_HEADER, _stats_row(label, stats)]


def verdict_text(verdict) -> str:
    """The verdict first: one sentence, then every reason and the numbers behind it."""
    lines = [f"Verdict: {verdict.headline}"]
    if len(verdict.reasons) > 1:
        lines += [f"  - {reason}" for reason in verdict.reasons]
    numbers = verdict_numbers(verdict.checks)
    if numbers:
        lines.append("  (" + "; ".join(numbers) + ")")
    return "\n".join(lines)


#: The numbers behind a verdict: check key -> how to say it (the log's and the report's words).
VERDICT_NUMBERS = (
    ("rms_in_plane_mm", "model spot to xyzcal.mm RMS {:.3g} mm"),
    ("rms_delta_q_rotation", "rotation data |q_bragg - q_pixel| at the calculated positions and angles RMS {:.3g} "
                             "1/Angstrom"),
    ("rms_delta_q_laue", "Laue data |q_bragg - q_pixel| at the calculated positions RMS {:.3g} 1/Angstrom"),
    ("rms_delta_psi_vs_delpsical_rad", "stills |dpsi - delpsical.rad| RMS {:.3g} rad"),
    ("rms_wavelength_rel", "time of flight: wavelength error RMS {:.3g} (relative)"),
    ("centroid_sigma_q", "centroid uncertainty {:.3g} 1/Angstrom (median)"),
    ("centroid_sigma_t_us", "centroid time-of-flight uncertainty {:.3g} us (median)"),
    ("normalised_residual", "normalised residual RMS {:.3g} (in-plane residual over the centroid sigma)"),
)


def verdict_numbers(checks) -> list[str]:
    return [text.format(checks[key]) for key, text in VERDICT_NUMBERS if checks.get(key) is not None]


def _counts_and_choices(first_line, counts, options, rotation=True, scan_varying=True) -> list[str]:
    """The row counts by reason (used always shown) and the computation choices."""
    lines = [first_line]
    shown = {reason: count for reason, count in counts.items() if count or reason == "used"}
    width = max(map(len, shown), default=0)
    for reason, count in shown.items():
        lines.append(f"  {reason:<{width}} {count:>10}")
    lines.append(computation_choices(options, rotation, scan_varying))
    return lines


def computation_choices(options, rotation=True, scan_varying=True) -> str:
    """The positions, rotation angle and scan-varying model state used, in words
    (the angle for rotation data, the state where a model varies along its scan)."""
    choices = f"q_pixel from {options.q_pixel_source} positions"
    if rotation:  # neither applies to stills
        choices += f"; q_bragg at the {options.phi} rotation angle"
    if rotation and scan_varying:
        state = options.model_state
        if state == "refinement":
            state += f" (block width {options.block_width:g} deg"
            state += ", chosen: no row of the table is flagged integrated)" if options.model_state_auto else ")"
        elif state == "integrate" and options.model_state_auto:
            state += " (chosen: rows of the table are flagged integrated)"
        elif state == "auto":  # a run over many files: chosen for each table
            state += " (for each table: integrate where rows are flagged integrated, else refinement)"
        choices += f"; scan-varying model state: {state}"
    return choices


#: With more experiments than this the terminal lists only the worst few of them
#: (the largest mean |Δq| first); every one is in the HTML report and the JSON.
MAX_LISTED = 10
WORST_LISTED = 5


def listed(experiments) -> tuple[list, str]:
    """(the experiments the terminal lists, a note on the ones it leaves out)."""
    if len(experiments) <= MAX_LISTED:
        return list(experiments), ""
    worst = sorted(experiments, key=lambda e: -(e.delta_q.get("mean") or 0.0))[:WORST_LISTED]
    return worst, (f"  ... the {len(worst)} of {len(experiments)} experiments with the largest mean |delta_q|; "
                   "every one: the HTML report and the JSON")


def summary_text(summary: Summary, options) -> str:
    lines = _counts_and_choices(f"Rows in the table: {summary.n_rows}", summary.counts, options, summary.rotation,
                                summary.scan_varying)
    for note in summary.notes:
        lines.append(f"Note: {note}")
    if not summary.delta_q["n"]:  # the verdict has said so
        return "\n".join(lines)

    lines += _statistics_lines("|delta_q| = |q_bragg - q_pixel| (1/Angstrom, no 2pi):", "all", summary.delta_q)
    if summary.outliers is not None and summary.outliers["n"]:
        lines.append(_stats_row("not used", summary.outliers))
        lines.append("  (all: the rows used in refinement, flag used_in_refinement, as dials.refine's RMSDs; "
                     "not used: the other indexed rows, refinement's outliers and, in an integrated table, the "
                     "predictions it never saw; rows=indexed puts every indexed row in the statistics)")
    shown, note = listed(summary.experiments)
    for e in shown:
        lines.append(_stats_row(f"expt {e.index} ({e.kind[:3]})", e.delta_q))
    if note:
        lines.append(note)
    lines.append(f"Mean |delta_q| {summary.delta_q['mean']:.4g} 1/Angstrom.")

    lines.append("")
    lines.append("Self-tests (max over rows used, 1/Angstrom):")
    if note:
        kinds = {}
        for e in summary.experiments:
            kinds[e.s1_kind] = kinds.get(e.s1_kind, 0) + 1
        largest = max((e.max_pixel_calculated_vs_pred or 0.0) for e in summary.experiments)
        lines.append(f"  every experiment: |q_pixel(xyzcal) - q_pred| at most {_fmt(largest)}")
        lines += [f"  s1: {kind} in {count} experiment(s)" for kind, count in kinds.items()]
    for e in shown:
        parts = [f"|q_pixel(xyzcal) - q_pred| {_fmt(e.max_pixel_calculated_vs_pred)}"]
        if e.max_pixel_observed_vs_pred is not None:
            parts.append(f"|q_pixel(xyzobs) - q_pred| {_fmt(e.max_pixel_observed_vs_pred)}")
        if bragg_self_test(e) is not None:
            parts.append(f"|q_bragg - q_pred| {_fmt(bragg_self_test(e))}")
        if e.rms_psi_vs_table is not None:
            parts.append(f"|dpsi - delpsical.rad| RMS {_fmt(e.rms_psi_vs_table)} rad")
        lines.append(f"  expt {e.index}: " + "; ".join(parts))
        lines.append(f"    s1: {e.s1_kind}")
        lines += [f"    {remark}" for remark in self_test_remarks(e)]
    return "\n".join(lines)


def bragg_self_test(e) -> float | None:
    """max |q_bragg − q_pred| of an experiment, where it is a self-test of the
    model: rotation or Laue data whose s1 is the prediction (not after
    dials.index: q_pred then follows the observations); where s1 matches
    neither position, only when q_bragg is q_pred to numerical precision: the
    table was predicted with this crystal, goniometer and beam, and another
    detector (else what its s1 is remains unknown)."""
    if e.s1_kind == S1_OBSERVED or e.max_bragg_vs_pred is None:
        return None
    if e.s1_kind == S1_NEITHER and e.max_bragg_vs_pred > PRECISION_Q:
        return None
    return e.max_bragg_vs_pred


def self_test_remarks(e) -> list[str]:
    """What the log and the HTML report say under an experiment's self-tests."""
    remarks = []
    if e.s1_kind == S1_OBSERVED:
        remarks.append("not a failure: q_pred follows the observations, so it is no self-test of the model")
    if e.s1_kind == S1_NEITHER:
        remarks.append("The table's s1 agrees with neither spot position under these models: the experiments are "
                       "probably not the ones the table was made with. delta_q is computed from the models given.")
    if e.outside_scan:
        remarks.append(f"{e.outside_scan} of the rows in the statistics {'lies' if e.outside_scan == 1 else 'lie'} "
                       "outside the scan: their model state is that of the nearest scan end, as DIALS uses")
    return remarks


def diagnosis_text(diagnoses) -> str:
    """One block per scope: consistent, or each named mistake with its size
    (with many experiments: the pooled scope, and the few that name a mistake)."""
    if not diagnoses:
        return ""
    lines = ["", "Diagnosis (best rotation, mirror, scale and detector fits; see the JSON for all of them):"]
    each = [d for d in diagnoses if d.scope != "pooled"]
    if len(each) > MAX_LISTED:
        named = [d for d in each if d.findings][:WORST_LISTED]
        diagnoses = [d for d in diagnoses if d.scope == "pooled"] + named
        lines += ["  " + line for line in diagnosis_lines(diagnoses)]
        lines.append(f"  ... {sum(1 for d in each if d.findings)} of {len(each)} experiments name a mistake"
                     f"{f' (the first {len(named)} above)' if named else ''}; every one: the HTML report and the JSON")
        return "\n".join(lines)
    return "\n".join(lines + ["  " + line for line in diagnosis_lines(diagnoses)])


def diagnosis_lines(diagnoses) -> list[str]:
    """Each scope's finding in a sentence (the log's and the report's)."""
    lines = []
    for d in diagnoses:
        if d.rms_delta_q is None:
            continue
        if d.consistent:
            lines.append(f"{d.scope}: no fitted frame, scale or detector change explains the residual")
            for finding in d.partial:  # significant, but not what the residual is
                lines.append(f"  (the best fit all the same, {finding.mistake}: {finding.message} [explains "
                             f"{100 * finding.size['explained']:.1f}%, F = {finding.size['f']:.0f}])")
            continue
        for finding in d.findings:
            explained = finding.size.get("explained")
            extra = f" [explains {100 * explained:.1f}% of the squared residual]" if explained is not None else ""
            lines.append(f"{d.scope}: {finding.mistake}: {finding.message}{extra}")
    return lines


def residuals_text(summary) -> str:
    """The positional-residual table per experiment and per panel group, like dials.report's."""
    if not summary.residuals:
        return ""
    header = f"{'':<18}{'n':>7}  {'RMS in-plane':>12}  {'RMS x':>8}  {'RMS y':>8}  {'radial':>8}  {'transv.':>8}  {'|q| err':>9}  {'dphi/dpsi':>9}"
    lines = ["", "Residuals (model spot - q_pixel spot, mm; |q_bragg| - |q_pixel| RMS, 1/Angstrom; angle RMS, deg):", header]

    def row(label, s):
        angle = s.get("rms_delta_phi_deg") if s.get("rms_delta_phi_deg") is not None else s.get("rms_delta_psi_deg")
        return (
            f"{label:<18}{s['n']:>7}  {_fmt(s['rms_in_plane_mm'], '.4f'):>12}  {_fmt(s['rms_x_mm'], '.4f'):>8}  "
            f"{_fmt(s['rms_y_mm'], '.4f'):>8}  {_fmt(s['rms_radial_mm'], '.4f'):>8}  {_fmt(s['rms_transverse_mm'], '.4f'):>8}  "
            f"{_fmt(s['rms_along_q'], '.2e'):>9}  {_fmt(angle, '.4f'):>9}"
        )

    lines.append(row("all", summary.residuals))
    shown, note = listed(summary.experiments)
    for e in shown:
        lines.append(row(f"expt {e.index}", e.residuals))
    if note:
        lines.append(note)
    for g in summary.per_panel_group:
        lines.append(row(f"group {g['group']}"[:18], g))
    if summary.per_wavelength_band:
        lines += ["", "Per wavelength band (polychromatic rows; wavelength error (lambda_b - lambda)/lambda, "
                      "lambda_b where q_bragg diffracts, and time-of-flight error, microseconds):",
                  f"{'lambda (A)':<14}{'n':>8}  {'mean |dq|':>9}  {'RMS dl/l':>9}  {'RMS dt us':>9}"]
        for band in summary.per_wavelength_band:
            lines.append(f"{band['wavelength_min']:.2f}-{band['wavelength_max']:.2f}".ljust(14)
                         + f"{band['n']:>8}  {_fmt(band['mean'], '.3e'):>9}  {_fmt(band['rms_wavelength_rel'], '.2e'):>9}"
                         f"  {_fmt(band['rms_tof_us'], '.3g'):>9}")
    return "\n".join(lines)


def json_report(summary, diagnoses, options, files) -> dict:
    """The machine-readable report (schema in README.rst)."""
    experiments = []
    for e in summary.experiments:
        experiments.append(
            {
                "index": e.index,
                "kind": e.kind,
                "delta_q": e.delta_q,
                "residuals": e.residuals,
                "s1": e.s1_kind,
                "max_q_pixel_calculated_vs_q_pred": e.max_pixel_calculated_vs_pred,
                "max_q_pixel_observed_vs_q_pred": e.max_pixel_observed_vs_pred,
                "max_q_bragg_vs_q_pred": e.max_bragg_vs_pred,
                "rms_delta_psi_vs_delpsical_rad": e.rms_psi_vs_table,
                "rows_outside_scan": e.outside_scan,
            }
        )
    return {
        "program": "dials.q_consistency",
        "files": files,
        "settings": {
            "q_pixel_source": options.q_pixel_source,
            "phi": options.phi,
            "model_state": options.model_state,
            "block_width_deg": options.block_width,
            "units": "1/Angstrom without 2pi; lengths mm; angles as named",
        },
        "rows": {"total": summary.n_rows, **summary.counts},
        "overall": {"delta_q": summary.delta_q, "verdict": summary.verdict, "residuals": summary.residuals,
                    "rows": "used_in_refinement" if summary.outliers is not None else "indexed",
                    "outliers": summary.outliers},
        "per_experiment": experiments,
        "per_panel": summary.per_panel,
        "per_panel_group": summary.per_panel_group,
        "per_resolution_shell": summary.per_resolution_shell,
        **({"per_wavelength_band": summary.per_wavelength_band} if summary.per_wavelength_band else {}),
        "diagnosis": [d.as_dict() for d in diagnoses],
        "notes": summary.notes,
    }


# --- runs over many files -------------------------------------------------------------------

STATISTIC_NAMES = ("n", "mean", "median", "rms", "p95", "max")


def campaign_text(merged, outcomes, options, worst: int = 10, every_file: str = "the log") -> str:
    """The merged summary of a run over many files, and its worst files
    (``every_file``: where each file's line is, for the user)."""
    lines = _counts_and_choices(f"Files: {merged.n_files}; rows in the tables: {merged.n_rows}", merged.counts, options,
                                rotation=any(o.rotation for o in outcomes),
                                scan_varying=any(o.scan_varying for o in outcomes))
    if not merged.delta_q["n"]:
        lines.append("Nothing to compare: no file has an indexed reflection with a position and s1.")
        return "\n".join(lines)
    lines += _statistics_lines("|delta_q| = |q_bragg - q_pixel| over every file (1/Angstrom, no 2pi; exact, "
                               "not estimated):", "all files", merged.delta_q)
    lines.append(f"Mean |delta_q| {merged.delta_q['mean']:.4g}: {merged.verdict}.")
    ranked = sorted((o for o in outcomes if o.delta_q.get("n")), key=lambda o: -o.delta_q["mean"])[:worst]
    if ranked:
        lines.append("")
        lines.append(f"The {len(ranked)} files with the largest mean |delta_q| (every file: {every_file}):")
        for o in ranked:
            lines.append(f"  {o.delta_q['mean']:.3e}  n={o.delta_q['n']:<8} {o.verdict:<13} {o.reflections}")
    failing = [o for o in sorted(outcomes, key=lambda o: o.index) if o.verdict == "inconsistent"]
    if failing:
        lines.append("")
        lines.append(f"The files marked inconsistent ({len(failing)}{'' if len(failing) <= worst else f', the first {worst}'}; "
                     "run dials.q_consistency on one pair for its diagnosis):")
        lines += [f"  {o.reflections}: {o.reason}" for o in failing[:worst]]
    return "\n".join(lines)


def file_line(outcome) -> str:
    stats = outcome.delta_q
    mean = _fmt(stats.get("mean"))
    return (f"file {outcome.index}: {outcome.reflections}: {stats.get('n', 0)} used, mean |delta_q| {mean}, {outcome.verdict}"
            + (f": {outcome.reason}" if outcome.reason else ""))


def _csv(header, rows) -> bytes:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else (repr(v) if isinstance(v, float) else v) for v in row])
    return buffer.getvalue().encode()


def per_file_csv(outcomes) -> bytes:
    """One row per file: its paths, row counts (``not_used``: the indexed rows
    refinement did not use, as the log's "not used"; ``other``: the rest, not
    indexed or without a position), |Δq| statistics, verdict, why, and s1 kind."""
    header = ["file", "experiments", "reflections", "output", "rows", "used", "not_used", "other"]
    header += [f"delta_q_{name}" for name in STATISTIC_NAMES] + ["verdict", "reason", "s1"]
    rows = []
    for o in outcomes:
        used, not_used = o.counts.get("used", 0), o.counts.get(REASONS[NOT_REFINED], 0)
        rows.append(
            [o.index, o.experiments, o.reflections, o.output or "", o.n_rows, used, not_used, o.n_rows - used - not_used]
            + [o.delta_q.get(name) for name in STATISTIC_NAMES]
            + [o.verdict, o.reason, "; ".join(o.s1)]
        )
    return _csv(header, rows)


def per_image_csv(outcomes) -> bytes:
    """One row per image (rotation data) or still (experiment) of every file."""
    header = ["file", "reflections", "experiment", "identifier", "image"]
    header += [f"delta_q_{name}" for name in STATISTIC_NAMES]
    rows = []
    for o in outcomes:
        for image in o.images:
            rows.append([o.index, o.reflections, image["experiment"], image["identifier"], image["image"]]
                        + [image[name] for name in STATISTIC_NAMES])
    return _csv(header, rows)


def _finite(value):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_bytes(report: dict) -> bytes:
    """The JSON report as written: indented, NaN and infinity as null."""
    return (json.dumps(_finite(report), indent=1) + "\n").encode()
