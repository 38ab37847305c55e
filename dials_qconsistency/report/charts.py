"""The charts of dials.q_consistency.html: plain plotly.js figures (``data``,
``layout``) whose numeric arrays are typed arrays (``{"dtype", "bdata"}``:
base64 of float32 or int16), so a chart of 100,000 points stays a few MB.
Charts of points show the sample of ``report.points`` (at most
``output.max_plot_points`` reflections, 1 in k of the used rows, said on each
chart); the histogram counts all of them. Lab frame, Å⁻¹
(no 2π), mm.
"""

from __future__ import annotations

import base64

import numpy as np

from dials_qconsistency.core import geometry
from dials_qconsistency.core.blocks import rows_by_group
from dials_qconsistency.core.decomposition import panel_frames, spot_lab_positions
from dials_qconsistency.core.row_statistics import histogram, row_distances, sample_rows
from dials_qconsistency.core.time_of_flight import polychromatic_rows, row_wavelengths
from dials_qconsistency.report.figures import COLOUR_FLOOR, HEATMAPS, DetectorView, colour_limit
from dials_qconsistency.report.points import PointSample

#: The quantities the detector chart can colour the spots by: the PNG heatmaps' and Δψ/Δφ.
COLOURS = {key: HEATMAPS[key] for key in ("norm", "dqx", "dqy", "dqz", "along_q")}
COLOURS["angle"] = ("Δφ or Δψ (deg)", lambda r, p: np.degrees(p.angle))  # named by angle_label


#: The arrows chart draws at most this many arrows (more cannot be told apart).
MAX_ARROWS = 5000


#: In-plane residuals below this (mm) are rounding: drawn unscaled, and said so.
ROUNDING_MM = 1e-6


def typed(values, dtype="f4"):
    """A plotly.js typed array: base64 of the values as float32 (f4) or int16 (i2); NaN stays NaN."""
    array = np.ascontiguousarray(values, dtype={"f4": "<f4", "f8": "<f8", "i2": "<i2", "i4": "<i4"}[dtype])
    spec = {"dtype": dtype, "bdata": base64.b64encode(array.tobytes()).decode("ascii")}
    if array.ndim == 2:
        spec["shape"] = f"{array.shape[0]},{array.shape[1]}"
    return spec


def chart_layout(title, x_title, y_title, **extra):
    return {"title": {"text": title}, "xaxis": {"title": {"text": x_title}}, "yaxis": {"title": {"text": y_title}},
            "margin": {"t": 50, "l": 70, "r": 20, "b": 50}, "hovermode": "closest", **extra}


def _sample_note(shown, total):
    if shown >= total:
        return f"all {total} used reflections"
    return f"{shown} of {total} used reflections shown (1 in {-(-total // shown)}, in table order)"


def detector_chart(experiments, points, parts, hkl, image, sample_note):
    """|Δq| (or a component, by the buttons) at each spot over the panels in
    their lab layout, seen from the sample; hover gives hkl, panel, image."""
    view = DetectorView(experiments)
    used = points.used
    xy = view.project(spot_lab_positions(experiments, points)[used])
    colours = {key: np.asarray(getter(points, parts))[used] for key, (_, getter) in COLOURS.items()}
    hkl = hkl[used]
    # one float64 row per spot (plotly.js misreads 2-D float32 arrays in scattergl hovers)
    custom = np.column_stack([hkl, points.panel[used], image[used], points.experiment[used], colours["norm"],
                              points.delta_q[used]])
    images = any(e.is_rotation or e.kind == "tof" for e in experiments)  # a still has no image number of its own
    hover = ("hkl (%{customdata[0]}, %{customdata[1]}, %{customdata[2]})<br>panel %{customdata[3]}, "
             + ("image %{customdata[4]}, " if images else "") + "experiment %{customdata[5]}<br>|Δq| "
             "%{customdata[6]:.3g} Å⁻¹; Δq (%{customdata[7]:.2e}, %{customdata[8]:.2e}, %{customdata[9]:.2e})"
             "<extra></extra>")
    spots = {"type": "scattergl", "mode": "markers", "name": "spots", "x": typed(xy[:, 0]), "y": typed(xy[:, 1]),
             "customdata": typed(custom, "f8"), "hovertemplate": hover,
             "marker": {"size": 5, "color": typed(colours["norm"]), "colorscale": "Viridis", "showscale": True,
                        "colorbar": {"title": {"text": "Å⁻¹"}}}}
    panels = panel_outlines(experiments, view)
    buttons = []
    for key, (label, _) in COLOURS.items():
        if not np.isfinite(colours[key]).any():  # no angle for time-of-flight rows: nothing to show
            continue
        if key == "angle":
            label = angle_label(parts.rotation[used])
        signed = key != "norm"
        limit = colour_limit(colours[key], label)
        unit = label[label.rindex("(") + 1:-1]
        buttons.append({"label": label, "method": "restyle", "args": [
            {"marker.color": [typed(colours[key])], "marker.colorscale": ["RdBu" if signed else "Viridis"],
             "marker.cmin": [-limit if signed else 0.0], "marker.cmax": [limit],
             "marker.colorbar.title.text": [unit]}, [1]]})
    if buttons:  # the first view as its button draws it (the same colour limits when chosen again)
        first = buttons[0]["args"][0]
        spots["marker"].update(cmin=first["marker.cmin"][0], cmax=first["marker.cmax"][0])
    layout = chart_layout(f"Δq on the detector, {view.seen} ({sample_note})", *view.labels,
                     yaxis={"title": {"text": view.labels[1]}, "scaleanchor": "x"}, showlegend=False,
                     updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "y": 1.12, "xanchor": "right"}])
    return {"id": "detector", "data": [panels, spots], "layout": layout}


def panel_outlines(experiments, view) -> dict:
    """The first experiment's panels outlined in ``view`` (a figures.DetectorView), as a trace."""
    outline_x, outline_y = [], []
    for panel in experiments[0].detector.panels:
        corners = view.outline(panel)
        outline_x += list(corners[:, 0]) + [corners[0, 0], None]
        outline_y += list(corners[:, 1]) + [corners[0, 1], None]
    return {"type": "scatter", "mode": "lines", "name": "panels", "x": outline_x, "y": outline_y,
            "line": {"color": "#888", "width": 1}, "hoverinfo": "skip"}


def angle_label(rotation) -> str:
    """The detector chart's name for the angle: Δφ for rotation rows, Δψ for stills."""
    if rotation.all():
        return "Δφ (deg)"
    return "Δψ (deg)" if not rotation.any() else "Δφ (rotation) or Δψ (stills) (deg)"


def arrows_chart(experiments, points, parts, sample_note):
    """In-plane residuals (model spot − q_pixel spot) as segments from each spot, scaled to be seen."""
    view = DetectorView(experiments)
    used = points.used & geometry.finite_rows(parts.delta_xy)
    every = np.flatnonzero(used)
    if every.size > MAX_ARROWS:  # more arrows than can be told apart: an even sample of them
        used = np.zeros_like(used)
        used[sample_rows(every, MAX_ARROWS)] = True
        sample_note = f"{int(used.sum())} arrows of {sample_note}"
    start_lab = spot_lab_positions(experiments, points)[used]
    d = panel_frames(experiments, points)[used]
    delta_lab = parts.delta_xy[used, :1] * d[:, :, 0] + parts.delta_xy[used, 1:] * d[:, :, 1]
    start, delta = view.project(start_lab), view.displacement(start_lab, delta_lab)
    typical = float(np.median(np.linalg.norm(delta_lab, axis=1))) if len(delta_lab) else 0.0  # mm
    drawn = float(np.median(np.linalg.norm(delta, axis=1))) if len(delta) else 0.0  # in the chart's units
    extent = float(np.ptp(start[:, 0])) if start.size else 1.0
    rounding = typical < ROUNDING_MM
    scale = 1.0 if rounding or drawn <= 0 else 0.02 * extent / drawn
    end = start + scale * delta
    x = np.column_stack([start[:, 0], end[:, 0], np.full(len(start), np.nan)]).ravel()
    y = np.column_stack([start[:, 1], end[:, 1], np.full(len(start), np.nan)]).ravel()
    trace = {"type": "scattergl", "mode": "lines", "x": typed(x), "y": typed(y), "line": {"width": 1, "color": "#1f77b4"},
             "hoverinfo": "skip"}
    data = [panel_outlines(experiments, view), trace]
    if not rounding:  # a head at each arrow's end, turned along it (plotly turns markers clockwise from up)
        data.append({"type": "scattergl", "mode": "markers", "x": typed(end[:, 0]), "y": typed(end[:, 1]),
                     "marker": {"symbol": "triangle-up", "size": 6, "color": "#1f77b4",
                                "angle": typed(np.degrees(np.arctan2(delta[:, 0], delta[:, 1])))},
                     "hoverinfo": "skip"})
    title = (f"In-plane residuals: none beyond rounding (median {typical:.2g} mm; {sample_note})" if rounding else
             f"In-plane residuals, arrows × {scale:.3g} (median {typical:.3g} mm; {sample_note})")
    return {"id": "arrows", "data": data, "layout": chart_layout(title, *view.labels, showlegend=False,
                                                              yaxis={"title": {"text": view.labels[1]},
                                                                     "scaleanchor": "x"})}


def component_charts(experiments, points, sample_note):
    """Δq components against the fast and the slow pixel coordinate."""
    used = points.used
    pixel = np.full((len(points.reason), 2), np.nan)
    for experiment, rows in zip(experiments, rows_by_group(points.experiment, len(experiments), used)):
        sizes = np.array([p.pixel_size for p in experiment.detector.panels])
        pixel[rows] = points.position_mm[rows] / sizes[points.panel[rows]]
    charts = []
    for column, axis_name in enumerate(("fast", "slow")):
        data = [{"type": "scattergl", "mode": "markers", "name": f"Δq_{c}", "x": typed(pixel[used, column]),
                 "y": typed(points.delta_q[used, row]), "marker": {"size": 3}} for row, c in enumerate("xyz")]
        charts.append({"id": f"components_{axis_name}", "data": data,
                       "layout": chart_layout(f"Δq components against the {axis_name} pixel ({sample_note})",
                                         f"{axis_name} pixel", "Δq (Å⁻¹)")})
    return charts


def trend_charts(experiments, result, points, image, sample_note):
    """|Δq| against resolution and against image (rotation) or experiment (stills); the histogram of all rows."""
    used = points.used
    norm = np.linalg.norm(points.delta_q[used], axis=1)
    q2 = np.sum(points.q_bragg[used] ** 2, axis=1)
    charts = [{"id": "vs_resolution", "data": [{"type": "scattergl", "mode": "markers", "x": typed(q2), "y": typed(norm),
                                                "marker": {"size": 3}}],
               "layout": chart_layout(f"|Δq| against resolution ({sample_note})", "1/d² (Å⁻²)", "|Δq| (Å⁻¹)")}]
    by_image = any(e.is_rotation for e in experiments) or (points.tof is not None and all(
        e.kind == "tof" for e in experiments))
    tof = not any(e.is_rotation for e in experiments)
    x, what = ((image[used], "time-of-flight bin (image)" if tof else "image") if by_image
               else (points.experiment[used], "experiment (still)"))
    charts.append({"id": "vs_image", "data": [{"type": "scattergl", "mode": "markers", "x": typed(x), "y": typed(norm),
                                               "marker": {"size": 3}}],
                   "layout": chart_layout(f"|Δq| against {what} ({sample_note})", what, "|Δq| (Å⁻¹)")})
    every = row_distances(result.q_bragg, result.q_pixel, np.flatnonzero(result.used))  # every used row
    charts.append(histogram_chart(every, f"|Δq| of all {every.size} used reflections"))
    return charts


def histogram_chart(values, title) -> dict:
    """The chart of |Δq| ``values`` (Å⁻¹) in 50 bins (:func:`row_statistics.histogram`)."""
    counts, edges = histogram(values)
    return {"id": "histogram", "data": [{"type": "bar", "x": typed((edges[:-1] + edges[1:]) / 2),
                                         "y": typed(counts, "i4"), "width": float(edges[1] - edges[0])}],
            "layout": chart_layout(title, "|Δq| (Å⁻¹)", "reflections")}


def two_theta(q, s0):
    """2θ (deg) of scattering vectors q at incident beams s0 (Å⁻¹): sin θ = |q| / 2|s0|."""
    return np.degrees(2 * np.arcsin(np.clip(np.linalg.norm(q, axis=1) / (2 * np.linalg.norm(s0, axis=1)), -1, 1)))


def stills_charts(experiments, summary, points, parts, sample_note):
    """What cctbx.xfel.detector_residuals shows for stills: Δ2θ against Δψ (the
    trumpet) and against 2θ, and the distribution of the per-still RMS |Δq|."""
    used = points.used
    angle = np.degrees(parts.angle[used])
    kind_still = np.array([e.kind == "still" for e in experiments] + [False])
    still = kind_still[points.experiment[used]]  # monochromatic stills: not rotation, not Laue
    if not still.any():
        return []
    tt_bragg, tt_pixel = two_theta(points.q_bragg[used], points.s0[used]), two_theta(points.q_pixel[used], points.s0[used])
    delta = (tt_bragg - tt_pixel)[still]
    # Δ2θ within numerical precision (a consistent model at its calculated
    # positions): drawn on an axis of that size, said so, not in femto-degrees
    floor = COLOUR_FLOOR["deg"]
    rounding = not np.any(np.abs(delta) > floor)
    y_range = {"range": [-floor, floor]} if rounding else {}
    note = f"none beyond rounding; {sample_note}" if rounding else sample_note
    charts = [
        {"id": "trumpet", "data": [{"type": "scattergl", "mode": "markers", "x": typed(angle[still]), "y": typed(delta),
                                    "marker": {"size": 3}}],
         "layout": chart_layout(f"Δ2θ against Δψ, stills ({note})", "Δψ (deg)", "2θ(q_bragg) − 2θ(q_pixel) (deg)")},
        {"id": "delta_two_theta", "data": [{"type": "scattergl", "mode": "markers", "x": typed(tt_pixel[still]),
                                            "y": typed(delta), "marker": {"size": 3}}],
         "layout": chart_layout(f"Δ2θ against 2θ, stills ({note})", "2θ (deg)", "Δ2θ (deg)")},
    ]
    for chart in charts:
        chart["layout"]["yaxis"].update(y_range)
    rms = np.array([e.delta_q["rms"] for e in summary.experiments if e.kind == "still" and e.delta_q.get("rms") is not None])
    if rms.size > 1:
        charts.append({"id": "per_still", "data": [{"type": "histogram", "x": typed(rms), "nbinsx": 40}],
                       "layout": chart_layout(f"RMS |Δq| of each still ({rms.size} stills)", "RMS |Δq| (Å⁻¹)", "stills")})
    return charts


def wavelength_charts(experiments, points, parts, sample_note):
    """Polychromatic (Laue, time-of-flight) rows: |Δq| and the time-of-flight
    error against each reflection's wavelength."""
    laue = points.used & polychromatic_rows(experiments, points.experiment)
    if not laue.any():
        return []
    wavelength = row_wavelengths(points.s0[laue])
    charts = [{"id": "vs_wavelength", "data": [{"type": "scattergl", "mode": "markers", "x": typed(wavelength),
                                                "y": typed(np.linalg.norm(points.delta_q[laue], axis=1)),
                                                "marker": {"size": 3}}],
               "layout": chart_layout(f"|Δq| against wavelength ({sample_note})", "λ (Å)", "|Δq| (Å⁻¹)")}]
    if parts.tof_us is not None and np.isfinite(parts.tof_us[laue]).any():
        charts.append({"id": "tof_vs_wavelength", "data": [{"type": "scattergl", "mode": "markers",
                                                            "x": typed(wavelength), "y": typed(parts.tof_us[laue]),
                                                            "marker": {"size": 3}}],
                       "layout": chart_layout(f"Time-of-flight error t(λ_b) − t against wavelength ({sample_note})",
                                         "λ (Å)", "Δt (µs)")})
    return charts


def image_numbers(experiments, result):
    """Image number of each used row (rotation data: the image its φ falls in,
    clamped to the scan as the campaign's per-image table has it; time-of-flight
    data: the time bin its time falls in), the experiment index for stills; -1
    elsewhere."""
    image = np.full(len(result.reason), -1, dtype=np.int64)
    for index, (experiment, rows) in enumerate(zip(experiments, result.used_rows_by_experiment(len(experiments)))):
        if rows.size and experiment.is_rotation:
            image[rows] = experiment.scan.image_numbers(result.phi[rows])
        elif rows.size and experiment.kind == "tof" and result.tof is not None:
            times = experiment.scan.time_of_flight
            bins = np.interp(result.tof[rows], times, np.arange(times.size, dtype=float))
            image[rows] = np.floor(bins).astype(np.int64) + experiment.scan.image_range[0]
        elif rows.size:
            image[rows] = index
    return image


def charts(experiments, result, sample: PointSample | None, summary=None) -> list[dict]:
    """Every chart of the page: those of points from ``sample``
    (:func:`points.point_sample`, with its Miller indices), the histogram from
    every used row of ``result`` (an empty list when no row was used)."""
    if sample is None:
        return []
    points, point_parts = sample.points, sample.parts
    image = image_numbers(experiments, points)
    note = _sample_note(sample.shown, sample.total)
    return ([detector_chart(experiments, points, point_parts, sample.miller_index, image, note),
             arrows_chart(experiments, points, point_parts, note)]
            + component_charts(experiments, points, note) + trend_charts(experiments, result, points, image, note)
            + (stills_charts(experiments, summary, points, point_parts, note) if summary is not None else [])
            + wavelength_charts(experiments, points, point_parts, note))

