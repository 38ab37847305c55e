"""dials.q_consistency.html: one self-contained page, as DIALS programs write them.

The page is a jinja2 template (``templates/q_consistency.html``) filled with
plotly.js charts (the plotly wheel from PyPI carries plotly.js; DIALS' own
copy is plotly.js 1.6 of 2016, too old for hover templates and typed arrays).
``external_dependencies``: ``embed`` puts plotly.js into the page (opens with
no network), ``remote`` links the CDN copy of the same version, ``local`` the
file inside the installed plotly package.

Every chart is a plain plotly.js figure (``data``, ``layout``) whose numeric
arrays are typed arrays (``{"dtype", "bdata"}``: base64 of float32 or int16),
so a chart of 100,000 points stays a few MB. Charts of points show at most
``max_points`` reflections, 1 in k of the used rows (said on each chart); the
histogram and every table count all of them. Lab frame, Å⁻¹ (no 2π), mm.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import threading

import numpy as np

from dials_qconsistency.core.findings import DETECTOR_MISTAKES
from dials_qconsistency.report.charts import chart_layout, histogram_chart, typed
from dials_qconsistency.report.text import bragg_self_test, computation_choices, self_test_remarks, verdict_numbers

DEPENDENCIES = ("remote", "local", "embed")


def plotly_script(dependencies: str) -> dict:
    """How the page gets plotly.js: the source itself (embed) or a script address."""
    import plotly
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    if dependencies == "embed":
        return {"source": get_plotlyjs()}
    if dependencies == "local":
        return {"address": "file://" + os.path.join(os.path.dirname(plotly.__file__), "package_data", "plotly.min.js")}
    return {"address": f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"}


@functools.lru_cache(maxsize=None)
def _template():
    """The page's jinja2 template, compiled once."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    environment = Environment(loader=PackageLoader("dials_qconsistency.report", "templates"),
                              autoescape=select_autoescape(["html"]))
    return environment.get_template("q_consistency.html")


def prepare_in_background() -> None:
    """Import jinja2 and plotly and compile the template on a thread while the
    program computes (0.1 s of a 1M-row run otherwise spent at its end); a
    failure is left for :func:`render` to raise. Not a daemon: a run that
    fails before its report still lets the imports finish before the
    interpreter shuts down (a daemon thread importing then crashed the
    process at exit, 8 times in 180 runs under load)."""
    def prepare():
        try:
            importlib.import_module("plotly.offline")
            _template()
        except Exception:
            pass

    threading.Thread(target=prepare, name="report imports").start()


def render(title, verdict, sections, chart_list, dependencies="embed") -> bytes:
    """The page: ``sections`` is a dict of the template's text parts (see the template)."""
    page = _template().render(
        title=title, verdict=verdict, plotly=plotly_script(dependencies), **sections,
        # a script literal, not parsed JSON: NaN is a JavaScript value; "</" would end the script
        charts=[{"id": c["id"], "json": json.dumps({"data": c["data"], "layout": c["layout"]}).replace("</", "<\\/")}
                for c in chart_list],
    )
    return page.encode("utf-8")


#: What to do next, by the mistake the diagnosis names.
NEXT_STEPS = {
    "detector": "Refine the detector: dials.refine with phil/refine_1_detector_beam.phil, then "
                "phil/refine_2_all_free.phil (add phil/refine_stills.phil for stills).",
    "wavelength_or_cell_scale": "Check the wavelength the images were imported with, then refine the cell and the "
                                "detector: dials.refine with phil/refine_2_all_free.phil.",
    "two_pi": "Remove the factor 2π: DIALS' q and A carry none (q = s1 − s0, |s0| = 1/λ).",
    "frame": "Fix the frame: a rotation or a sign flip between the goniometer, the crystal and the lab was applied "
             "where it should not be, or left out (check the script or conversion that wrote the model).",
    "crystal_orientation": "Refine the crystal orientation: dials.refine with phil/refine_2_all_free.phil.",
    "reindexing": "Reindex the table to the crystal's setting: dials.reindex with the operator named above.",
    "rotation_axis": "Fix the goniometer's rotation axis: import again with dials.import geometry.goniometer.axis=... "
                     "(the axis named above; geometry.goniometer.axes=... for a multi-axis goniometer, "
                     "geometry.goniometer.invert_rotation_axis=True for a reversed one), then index and refine again.",
    "cell_scale": "Refine the unit cell of the crystal named: dials.refine with phil/refine_2_all_free.phil.",
    "beam_direction": "Fix the beam direction: refine it (dials.refine with phil/refine_1_detector_beam.phil), or import "
                      "again with dials.import geometry.beam.direction=... (the direction named above).",
}


def next_step(verdict) -> str:
    """What to do, for the mistake the headline names (none: the files do not belong together)."""
    mistake = verdict.checks.get("leading_mistake")
    if verdict.consistent and mistake is not None:  # a suspect, named for its significance alone
        if verdict.checks.get("q_pixel_source") == "calculated" and verdict.checks.get("phi") == "calculated":
            return ("If the change named above is a mistake (it fits what the table's predictions leave, the stills' "
                    "Ewald offsets, significantly): " + _fix(mistake))
        return ("Judge the change named above on the table's own predictions: run again with the default "
                "q_pixel.source=calculated and phi=calculated, which tell a mistake from the centroids' scatter exactly.")
    if verdict.consistent:
        return "Nothing to fix: the model is consistent."
    if mistake is None:
        if verdict.consistent is None:
            return "Nothing to compare: index the reflections first."
        return "The table and the models do not belong together: give the .expt and .refl written by the same step."
    return _fix(mistake)


def _fix(mistake) -> str:
    """The next step for a named mistake."""
    key = ("detector" if mistake in DETECTOR_MISTAKES else mistake if mistake in NEXT_STEPS else
           "frame" if mistake in ("lab_axis_rotation", "sign_flip", "mirror") or "rotation" in mistake else mistake)
    return with_strategy_paths(NEXT_STEPS.get(key, "See the diagnosis above."))


def with_strategy_paths(text: str) -> str:
    """``text`` with each ``phil/<name>.phil`` it names given by its full path (:func:`strategy_path`)."""
    return re.sub(r"phil/(\w+\.phil)", lambda m: strategy_path(m.group(1)), text)


def strategy_path(name: str) -> str:
    """Where the refinement strategy ``name`` (a file of ``phil/``) is: in the
    installed package (``dials_qconsistency/phil``), else in the source tree
    the program runs from."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in (os.path.join(package, "phil"), os.path.join(os.path.dirname(package), "phil")):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return f"phil/{name}"


def number(value, spec=".3e"):
    """A table cell: the value formatted, or a dash for None."""
    return "–" if value is None else format(value, spec)


STATISTICS = ("n", "mean", "median", "rms", "p95", "max")
RESIDUALS = ("rms_in_plane_mm", "rms_x_mm", "rms_y_mm", "rms_radial_mm", "rms_transverse_mm", "rms_along_q")


def _statistics_table(title, label, entries, names):
    """|Δq| statistics and the RMS residuals, as the log's tables give them: in
    mm (in-plane, its fast x and slow y parts, as dials.refine's RMSDs, radial,
    transverse), |q| error, and the angle, Δφ (rotation rows) or Δψ (stills)."""
    header = [label, "n", "mean |Δq|", "median", "RMS", "95th pct", "max", "RMS in-plane (mm)", "x (mm)", "y (mm)",
              "radial (mm)", "transverse (mm)", "|q| err (Å⁻¹)", "Δφ / Δψ (°)"]
    rows = []
    for name, stats in zip(names, entries):
        rows.append([name, stats.get("n")] + [number(stats.get(k)) for k in STATISTICS[1:]]
                    + [number(stats.get(k), ".4f" if k.endswith("mm") else ".2e") for k in RESIDUALS]
                    + [_angles(stats.get("rms_delta_phi_deg"), stats.get("rms_delta_psi_deg"))])
    return {"title": title, "header": header, "rows": rows}


def _angles(phi, psi) -> str:
    """RMS Δφ and/or Δψ (degrees) of a group: the one its rows have, or both ("Δφ / Δψ")."""
    if phi is not None and psi is not None:
        return f"{phi:.4f} / {psi:.4f}"
    return number(phi if phi is not None else psi, ".4f")


def sections(summary, diagnoses, verdict, options, inputs, diagnosis_lines, extra_tables=()) -> dict:
    """The text parts of the page, from what the log and the JSON say."""
    tests = [[e.index, e.kind, e.s1_kind, number(e.max_pixel_calculated_vs_pred), number(e.max_pixel_observed_vs_pred),
              number(bragg_self_test(e))] for e in summary.experiments]
    remarks = [f"Experiment {e.index}: {remark}" for e in summary.experiments for remark in self_test_remarks(e)]
    lines = [line[0].upper() + line[1:] + "." for line in verdict_numbers(verdict.checks)] + remarks
    tables = [
        _statistics_table("Per experiment", "experiment", [{**e.delta_q, **e.residuals} for e in summary.experiments],
                          [f"{e.index} ({e.kind})" for e in summary.experiments]),
        _statistics_table("Per panel group", "group", summary.per_panel_group,
                          [str(g["group"]) for g in summary.per_panel_group]),
        _statistics_table("Per resolution shell", "d (Å)", summary.per_resolution_shell,
                          [f"{s['d_max']:.2f}–{s['d_min']:.2f}" for s in summary.per_resolution_shell]),
    ]
    if summary.per_wavelength_band:
        tables.append({"title": "Per wavelength band (polychromatic rows)",
                       "header": ["λ (Å)", "n", "mean |Δq|", "RMS Δλ/λ", "RMS Δt (µs)"],
                       "rows": [[f"{b['wavelength_min']:.2f}–{b['wavelength_max']:.2f}", b["n"], number(b["mean"]),
                                 number(b.get("rms_wavelength_rel"), ".2e"), number(b.get("rms_tof_us"), ".3g")]
                                for b in summary.per_wavelength_band]})
    mean = summary.delta_q.get("mean")
    if summary.outliers is not None and summary.outliers["n"]:
        out = summary.outliers
        lines.insert(0, f"Statistics, verdict, diagnosis and charts are about the {summary.delta_q['n']} rows used in "
                        f"refinement (DIALS' flag used_in_refinement), as dials.refine's RMSDs are; the other "
                        f"{out['n']} indexed rows (refinement's outliers or, in an integrated table, predictions it never "
                        f"saw) have mean |Δq| {number(out.get('mean'), '.3g')} Å⁻¹, "
                        f"max {number(out.get('max'), '.3g')} Å⁻¹ (rows=indexed: every indexed row).")
    choices = computation_choices(options, summary.rotation, summary.scan_varying)
    return {
        "inputs": f"{inputs[0]} and {inputs[1]}",
        "verdict_class": {True: "consistent", False: "inconsistent", None: "nothing"}[verdict.consistent],
        "mean_line": ("Mean |Δq| " + number(mean, ".4g") + " Å⁻¹ over " + str(summary.delta_q["n"]) + " reflections"
                      " (lab frame, no 2π).") if mean is not None else "",
        "counts": [(reason, count) for reason, count in summary.counts.items() if count or reason == "used"],
        "choices": choices + ".",
        "notes": [note[0].upper() + note[1:] for note in summary.notes],
        "self_tests": tests,
        "checks": lines,
        "diagnosis": diagnosis_lines,
        "next_step": next_step(verdict),
        "tables": [t for t in tables + list(extra_tables) if t["rows"]],
        "footer": "dials.q_consistency: q = s1 − s0 in the DIALS laboratory frame, Å⁻¹ without 2π; mm on the detector.",
    }


#: Rows of the per-image table of a run over many files: the worst images first.
MAX_IMAGE_ROWS = 200


def campaign_page(merged, outcomes, verdict, options, dependencies="embed") -> bytes:
    """The page of a run over many files: the merged verdict and statistics,
    every file (the worst first), the worst images, the histogram of every
    used reflection and the mean |Δq| of each file."""
    ranked = sorted(outcomes, key=lambda o: -(o.delta_q.get("mean") or 0.0))
    files = {"title": f"Files, the largest mean |Δq| first ({len(outcomes)})",
             "header": ["file", "reflections", "rows", "n used", "mean |Δq|", "median", "RMS", "95th pct", "max", "verdict",
                        "why"],
             "rows": [[o.index, o.reflections, o.n_rows, o.delta_q.get("n", 0)]
                      + [number(o.delta_q.get(k)) for k in STATISTICS[1:]] + [o.verdict, o.reason] for o in ranked]}
    images = sorted(((o.index, image) for o in outcomes for image in o.images), key=lambda item: -(item[1].get("mean") or 0.0))
    shown = (f"the first {MAX_IMAGE_ROWS} of {len(images)}" if len(images) > MAX_IMAGE_ROWS else str(len(images)))
    image_table = {"title": f"Images (stills: experiments), the largest mean |Δq| first ({shown})",
                   "header": ["file", "experiment", "image", "n", "mean |Δq|", "median", "RMS", "95th pct", "max"],
                   "rows": [[index, image.get("experiment"), "–" if image.get("image") is None else image["image"],
                             image.get("n")] + [number(image.get(k)) for k in STATISTICS[1:]]
                            for index, image in images[:MAX_IMAGE_ROWS]]}
    every = np.concatenate([o.norms for o in outcomes]) if outcomes else np.zeros(0)
    chart_list = []
    if every.size:
        chart_list.append(histogram_chart(every, f"|Δq| of all {every.size} used reflections of every file"))
        means = np.array([o.delta_q.get("mean") if o.delta_q.get("mean") is not None else np.nan for o in outcomes])
        chart_list.append({"id": "per_file", "data": [{"type": "scattergl", "mode": "markers",
                                                       "x": typed(np.array([o.index for o in outcomes]), "i4"),
                                                       "y": typed(means), "text": [o.reflections for o in outcomes],
                                                       "hovertemplate": "%{text}<br>mean |Δq| %{y:.3g}<extra></extra>"}],
                           "layout": chart_layout("Mean |Δq| of each file", "file", "mean |Δq| (Å⁻¹)")})
    mean = merged.delta_q.get("mean")
    parts = {
        "inputs": f"{merged.n_files} files, {merged.n_rows} rows",
        "verdict_class": {True: "consistent", False: "inconsistent", None: "nothing"}[verdict.consistent],
        "mean_line": f"Mean |Δq| {number(mean, '.4g')} Å⁻¹ over {merged.delta_q['n']} reflections of every file "
                     "(exact, lab frame, no 2π)." if mean is not None else "",
        "counts": [(reason, count) for reason, count in merged.counts.items() if count or reason == "used"],
        "choices": computation_choices(options, any(o.rotation for o in outcomes),
                                       any(o.scan_varying for o in outcomes)) + ".",  # as the log gives them
        "self_tests": [], "checks": [], "notes": [],
        "diagnosis": ["The diagnosis is made for one pair at a time: run dials.q_consistency on the pair of a file "
                      "marked inconsistent."],
        "next_step": ("Run dials.q_consistency on the pair of each file marked inconsistent (the table above, the "
                      "log and the CSV say why) for its diagnosis." if verdict.consistent is False else next_step(verdict)),
        "tables": [files, image_table],
        "footer": "dials.q_consistency over many files: q = s1 − s0 in the DIALS laboratory frame, Å⁻¹ without 2π.",
    }
    return render("dials.q_consistency: many files", verdict, parts, chart_list, dependencies)


