"""The text summary written to the log and to stdout."""

from __future__ import annotations

from .analysis import BANDS, S1_NEITHER, S1_OBSERVED, S1_PREDICTED, Summary


def _fmt(value, spec=".3e") -> str:
    return "-" if value is None else format(value, spec)


def _stats_row(label: str, stats: dict) -> str:
    return (
        f"{label:<14}{stats['n']:>8}  {_fmt(stats['mean'])}  {_fmt(stats['median'])}  "
        f"{_fmt(stats['rms'])}  {_fmt(stats['p95'])}  {_fmt(stats['max'])}"
    )


def summary_text(summary: Summary, options) -> str:
    lines = [f"Rows in the table: {summary.n_rows}"]
    for reason, count in summary.counts.items():
        if count or reason == "used":
            lines.append(f"  {reason:<48} {count:>8}")
    lines.append(
        f"q_pixel from {options.q_pixel_source} positions; "
        f"scan-varying model state: {options.model_state}"
        + (f" (block width {options.block_width:g} deg)" if options.model_state == "refinement" else "")
    )
    for note in summary.notes:
        lines.append(f"Note: {note}")
    if not summary.delta_q["n"]:
        lines.append("Nothing to compare: no row has an indexed reflection with a position and s1.")
        return "\n".join(lines)

    lines.append("")
    lines.append("|delta_q| = |q_bragg - q_pixel| (1/Angstrom, no 2pi):")
    lines.append(f"{'':<14}{'n':>8}  {'mean':>9}  {'median':>9}  {'RMS':>9}  {'95th pct':>9}  {'max':>9}")
    lines.append(_stats_row("all", summary.delta_q))
    for e in summary.experiments:
        lines.append(_stats_row(f"expt {e.index} ({e.kind[:3]})", e.delta_q))
    bands = ", ".join(
        f"< {upper:g} {verdict}" if upper != float("inf") else f"above: {verdict}" for upper, verdict in BANDS
    )
    lines.append(f"Mean |delta_q| {summary.delta_q['mean']:.4g}: {summary.verdict} ({bands}).")

    lines.append("")
    lines.append("Self-tests (max over rows used, 1/Angstrom):")
    for e in summary.experiments:
        parts = [f"|q_pixel(xyzcal) - q_pred| {_fmt(e.max_pixel_calculated_vs_pred)}"]
        if e.max_pixel_observed_vs_pred is not None:
            parts.append(f"|q_pixel(xyzobs) - q_pred| {_fmt(e.max_pixel_observed_vs_pred)}")
        if e.max_bragg_vs_pred is not None and e.s1_kind == S1_PREDICTED:
            parts.append(f"|q_bragg - q_pred| {_fmt(e.max_bragg_vs_pred)}")
        lines.append(f"  expt {e.index}: " + "; ".join(parts))
        lines.append(f"    s1: {e.s1_kind}")
        if e.s1_kind == S1_OBSERVED:
            lines.append("    (not a failure: q_pred follows the observations, so it is no self-test of the model)")
        if e.s1_kind == S1_NEITHER:
            lines.append(
                "    The table's s1 agrees with neither spot position under these models: the experiments "
                "are probably not the ones the table was made with. delta_q is computed from the models given."
            )
        if e.outside_scan:
            lines.append(
                f"    {e.outside_scan} row(s) lie outside the scan: their model state is that of the "
                "nearest scan end, as DIALS uses"
            )
    return "\n".join(lines)
