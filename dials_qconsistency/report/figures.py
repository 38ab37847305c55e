"""PNG figures of Δq (matplotlib, headless Agg backend).

The detector views draw every panel in its true place: panel corners and spots
are projected from the lab frame (mm) onto the plane perpendicular to the beam,
seen from the sample. Colour bars are in Å⁻¹ (no 2π). Figures of points draw
the sample of ``report.points`` (at most ``output.max_plot_points``
reflections, every k-th used row, said on the figure); the histogram counts
every one.
"""

from __future__ import annotations

import io
import os

import numpy as np

from dials_qconsistency.core import geometry
from dials_qconsistency.core import row_statistics
from dials_qconsistency.core.row_statistics import row_distances
from dials_qconsistency.core.decomposition import panel_frames, spot_lab_positions
from dials_qconsistency.core.time_of_flight import polychromatic_rows, row_wavelengths

#: Per-row quantities shown as detector heatmaps: file suffix -> (label, getter).
HEATMAPS = {
    "norm": ("|Δq| (Å⁻¹)", lambda r, p: np.linalg.norm(r.delta_q, axis=1)),
    "dqx": ("Δq_x (Å⁻¹)", lambda r, p: r.delta_q[:, 0]),
    "dqy": ("Δq_y (Å⁻¹)", lambda r, p: r.delta_q[:, 1]),
    "dqz": ("Δq_z (Å⁻¹)", lambda r, p: r.delta_q[:, 2]),
    "along_q": ("|q_bragg| - |q_pixel| (Å⁻¹)", lambda r, p: p.along_q),
    "radial": ("radial Δq (Å⁻¹)", lambda r, p: p.radial),
    "transverse": ("transverse Δq (Å⁻¹)", lambda r, p: p.transverse),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def view_basis(s0):
    """Orthonormal (u, v) across the beam: u is lab X made perpendicular to it, v = b × u."""
    b = geometry.unit(np.asarray(s0, dtype=float))
    x = np.array([1.0, 0.0, 0.0]) if abs(b[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = geometry.unit(x - (x @ b) * b)
    return u, np.cross(b, u)


def project(lab, basis):
    u, v = basis
    return np.stack([lab @ u, lab @ v], axis=-1)


#: A detector with a panel corner this far from the beam (2θ, degrees) or more,
#: beside or behind the sample (ISIS SXD), is drawn by direction: seen from the
#: sample its panels would fold onto one another, and the side ones into lines.
WIDE_ANGLE_DEG = 90.0


class DetectorView:
    """Where the detector charts and figures put a lab point (mm). Seen from
    the sample along the beam: its across-beam components (mm; u is lab X made
    perpendicular to the beam, v = b × u). A wide-angle detector
    (:data:`WIDE_ANGLE_DEG`) by direction instead: 2θ (degrees) as the distance
    from the beam, at the point's azimuth about it from u (an azimuthal
    equidistant map), so that no panel hides another."""

    def __init__(self, experiments):
        self.beam = geometry.unit(np.asarray(experiments[0].beam.along_s0, dtype=float))
        self.basis = view_basis(self.beam)
        corners = np.concatenate([_outline_lab(panel, 1) for panel in experiments[0].detector.panels])
        self.angular = bool(np.max(self._two_theta(corners)) >= WIDE_ANGLE_DEG)
        self.labels = (("2θ · cos(azimuth) (deg; azimuth from lab X across the beam)", "2θ · sin(azimuth) (deg)")
                       if self.angular else ("mm across the beam (lab X side)", "mm"))
        self.seen = "by direction (2θ)" if self.angular else "seen from the sample"

    def _two_theta(self, lab):
        across = project(lab, self.basis)
        return np.degrees(np.arctan2(np.hypot(across[..., 0], across[..., 1]), lab @ self.beam))

    def project(self, lab) -> np.ndarray:
        """(n, 2) chart coordinates of lab points (n, 3), mm or degrees."""
        lab = np.asarray(lab, dtype=float)
        across = project(lab, self.basis)
        if not self.angular:
            return across
        two_theta = self._two_theta(lab)
        azimuth = np.arctan2(across[..., 1], across[..., 0])
        return np.stack([two_theta * np.cos(azimuth), two_theta * np.sin(azimuth)], axis=-1)

    def displacement(self, start, delta) -> np.ndarray:
        """Chart vectors of lab displacements ``delta`` (mm) at lab points ``start``:
        the projected delta itself seen from the sample; by direction, the
        difference of the projected ends (the displacements are small)."""
        if not self.angular:
            return project(np.asarray(delta, dtype=float), self.basis)
        return self.project(np.asarray(start) + np.asarray(delta)) - self.project(start)

    def outline(self, panel) -> np.ndarray:
        """A panel's edge as a polygon (its corners; by direction, points along
        the edges, which the map bends)."""
        return self.project(_outline_lab(panel, 16 if self.angular else 1))


def _outline_lab(panel, steps: int) -> np.ndarray:
    """Lab points (mm) around a panel's edge from its origin: the four corners
    and ``steps`` - 1 points between each two."""
    size = panel.size_mm
    t = np.arange(steps) / steps
    zero, one = np.zeros(steps), np.ones(steps)
    local = np.concatenate([np.column_stack(edge) * size for edge in
                            ((t, zero), (one, t), (1 - t, one), (zero, 1 - t))])
    return geometry.lab_coordinates(panel.origin, panel.fast, panel.slow, local)


def _draw_panels(ax, detector, view):
    from matplotlib.patches import Polygon

    for index, panel in enumerate(detector.panels):
        ax.add_patch(Polygon(view.outline(panel), closed=True, fill=False, lw=0.6, ec="0.4", label=f"panel {index}"))
    ax.set_aspect("equal")
    ax.autoscale_view()
    ax.set_xlabel(view.labels[0])
    ax.set_ylabel(view.labels[1])


#: The least colour range (per unit of the quantity's label): values within
#: numerical precision (a consistent model at its calculated positions,
#: ~1e-16 Å⁻¹) are drawn as the zero they are, not as a pattern of rounding.
COLOUR_FLOOR = {"Å⁻¹": 1e-9, "deg": float(np.degrees(1e-9))}


def colour_limit(values, label: str) -> float:
    """The colour scale's half range (signed) or top (|Δq|) for ``values``
    labelled ``label`` ("... (unit)"): their largest magnitude, at least the
    unit's :data:`COLOUR_FLOOR`."""
    finite = np.asarray(values)[np.isfinite(values)]
    largest = float(np.max(np.abs(finite))) if finite.size else 0.0
    return max(largest, COLOUR_FLOOR.get(label[label.rindex("(") + 1:-1], 0.0)) or 1.0


def detector_heatmap(experiments, result, parts, quantity="norm"):
    """(figure, number of panels drawn) for one per-row quantity over the detector."""
    plt = _pyplot()
    label, getter = HEATMAPS[quantity]
    detector = experiments[0].detector
    view = DetectorView(experiments)
    fig, ax = plt.subplots(figsize=(7, 6))
    _draw_panels(ax, detector, view)
    used = result.used
    xy = view.project(spot_lab_positions(experiments, result)[used])
    values = np.asarray(getter(result, parts))[used]
    signed = quantity != "norm"
    limit = colour_limit(values, label)
    scatter = ax.scatter(
        xy[:, 0], xy[:, 1], c=values, s=6, cmap="coolwarm" if signed else "viridis",
        vmin=-limit if signed else 0.0, vmax=limit or 1.0,
    )
    fig.colorbar(scatter, ax=ax, label=label)
    ax.set_title(f"{label} on the detector ({used.sum()} reflections)")
    return fig, len(detector.panels)


def arrow_map(experiments, result, parts):
    """(figure, panels drawn): in-plane residuals (model spot - q_pixel spot) as arrows."""
    plt = _pyplot()
    detector = experiments[0].detector
    view = DetectorView(experiments)
    fig, ax = plt.subplots(figsize=(7, 6))
    _draw_panels(ax, detector, view)
    used = result.used & geometry.finite_rows(parts.delta_xy)
    start = spot_lab_positions(experiments, result)[used]
    d = panel_frames(experiments, result)[used]
    delta_lab = parts.delta_xy[used, :1] * d[:, :, 0] + parts.delta_xy[used, 1:] * d[:, :, 1]
    xy, dxy = view.project(start), view.displacement(start, delta_lab)
    typical = float(np.median(np.linalg.norm(delta_lab, axis=1))) if len(delta_lab) else 0.0  # mm
    drawn = float(np.median(np.linalg.norm(dxy, axis=1))) if len(dxy) else 0.0  # in the chart's units
    extent = float(np.ptp(xy[:, 0])) if xy.size else 1.0
    scale = 0.02 * extent / drawn if drawn > 0 else 1.0
    ax.quiver(xy[:, 0], xy[:, 1], dxy[:, 0] * scale, dxy[:, 1] * scale, angles="xy", scale_units="xy", scale=1, width=0.002)
    ax.set_title(f"in-plane residuals, arrows × {scale:.3g} (median {typical:.3g} mm)")
    return fig, len(detector.panels)


def components_vs_pixel(experiments, result, parts):
    plt = _pyplot()
    used = result.used
    pixel = np.full((len(result.reason), 2), np.nan)
    for experiment, rows in zip(experiments, result.used_rows_by_experiment(len(experiments))):
        sizes = np.array([p.pixel_size for p in experiment.detector.panels])
        pixel[rows] = result.position_mm[rows] / sizes[result.panel[rows]]
    fig, axes = plt.subplots(3, 2, figsize=(9, 8), sharex="col")
    for row, name in enumerate("xyz"):
        for column, axis_name in enumerate(("fast", "slow")):
            ax = axes[row, column]
            ax.scatter(pixel[used, column], result.delta_q[used, row], s=3)
            ax.axhline(0, color="0.5", lw=0.5)
            ax.set_ylabel(f"Δq_{name} (Å⁻¹)")
            if row == 2:
                ax.set_xlabel(f"{axis_name} pixel")
    fig.suptitle("Δq components against panel position")
    return fig


def histogram(result):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    norms = row_distances(result.q_bragg, result.q_pixel, np.flatnonzero(result.used))  # every used row
    counts, edges = row_statistics.histogram(norms)
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge")
    ax.set_xlabel("|Δq| (Å⁻¹)")
    ax.set_ylabel("reflections")
    return fig


def against_resolution(result):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    used = result.used
    q = np.linalg.norm(result.q_bragg[used], axis=1)
    ax.scatter(q**2, np.linalg.norm(result.delta_q[used], axis=1), s=3)
    ticks = ax.get_xticks()
    ax.set_xticks(ticks[ticks > 0])
    ax.set_xticklabels([f"{1 / np.sqrt(t):.2f}" for t in ticks[ticks > 0]])
    ax.set_xlabel("d (Å), linear in 1/d²")
    ax.set_ylabel("|Δq| (Å⁻¹)")
    return fig


def against_image(experiments, result):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for index, (experiment, rows) in enumerate(zip(experiments, result.used_rows_by_experiment(len(experiments)))):
        if not rows.size or not experiment.is_rotation:
            continue
        scan = experiment.scan
        ax.scatter(scan.image_position(result.phi[rows]), np.linalg.norm(result.delta_q[rows], axis=1), s=3,
                   label=f"experiment {index}")
        for end in (scan.image_range[0], scan.image_range[1] + 1):  # rows beyond were predicted past the scan's ends
            ax.axvline(end, color="0.6", linestyle="--", linewidth=0.8)
    ax.set_xlabel("image number (φ's place in the scan; dashed: its ends)")
    ax.set_ylabel("|Δq| (Å⁻¹)")
    return fig


def against_wavelength(experiments, result, parts):
    """Polychromatic rows: |Δq| and the time-of-flight error against each reflection's wavelength."""
    plt = _pyplot()
    laue = result.used & polychromatic_rows(experiments, result.experiment)
    wavelength = row_wavelengths(result.s0[laue])
    timing = parts.tof_us is not None and np.isfinite(parts.tof_us[laue]).any()
    fig, axes = plt.subplots(1, 2 if timing else 1, figsize=(10 if timing else 6, 4), squeeze=False)
    axes[0, 0].scatter(wavelength, np.linalg.norm(result.delta_q[laue], axis=1), s=3)
    axes[0, 0].set_xlabel("λ (Å)")
    axes[0, 0].set_ylabel("|Δq| (Å⁻¹)")
    if timing:
        axes[0, 1].scatter(wavelength, parts.tof_us[laue], s=3)
        axes[0, 1].set_xlabel("λ (Å)")
        axes[0, 1].set_ylabel("t(λ_b) − t (µs)")
    fig.tight_layout()
    return fig


def _png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def plot_path(target: str, name: str) -> str:
    """A directory (existing, or ending in a separator) gets ``name.png``; anything else is a prefix."""
    if target.endswith(os.sep) or os.path.isdir(target):
        return os.path.join(target, f"{name}.png")
    return f"{target}{name}.png"


#: Every figure a run can write (``vs_image`` only for rotation data,
#: ``vs_wavelength`` only for polychromatic data).
FIGURE_NAMES = [f"detector_{q}" for q in HEATMAPS] + [
    "detector_arrows", "components_vs_pixel", "histogram", "vs_resolution", "vs_image", "vs_wavelength",
]


def render_plots(target, experiments, result, sample) -> dict[str, bytes]:
    """Every figure as PNG bytes, keyed by its output path: those of points
    from ``sample`` (:func:`points.point_sample`), the histogram from every
    used row of ``result``. None without used rows."""
    if sample is None:
        return {}
    points, point_parts, total = sample.points, sample.parts, sample.total
    makers = {f"detector_{q}": (lambda q=q: detector_heatmap(experiments, points, point_parts, q)[0]) for q in HEATMAPS}
    makers["detector_arrows"] = lambda: arrow_map(experiments, points, point_parts)[0]
    makers["components_vs_pixel"] = lambda: components_vs_pixel(experiments, points, point_parts)
    makers["histogram"] = lambda: histogram(result)  # every used row
    makers["vs_resolution"] = lambda: against_resolution(points)
    if any(e.is_rotation for e in experiments):
        makers["vs_image"] = lambda: against_image(experiments, points)
    if any(e.is_laue for e in experiments):
        makers["vs_wavelength"] = lambda: against_wavelength(experiments, points, point_parts)
    rendered = {}
    for name, make in makers.items():  # one figure open at a time
        fig = make()
        if sample.sampled and name != "histogram":
            fig.text(0.01, 0.005, f"{sample.shown} of {total} reflections shown (1 in {-(-total // sample.max_points)} of the"
                     " used rows, in table order)", fontsize=7, color="0.3")
        rendered[plot_path(target, name)] = _png(fig)
    return rendered
