"""The tables of the HTML report that cctbx.xfel.detector_residuals users look
for: per panel group the RMS and weighted in-plane residual (µm) and the
correlations of the radial and transverse residuals with Δψ (or Δφ), and the
spread of the unit cell across the experiments.
"""

from __future__ import annotations

import numpy as np

from dials_qconsistency.report.html import number


def _weighted_rmsd_um(xy, variance):
    """√(Σ w r² / Σ w) over both panel axes (µm), w = 1 / the centroid variance, as refinement weights."""
    ok = np.all(np.isfinite(xy), axis=1) & np.all(variance > 0, axis=1)
    if not ok.any():
        return None
    weights = 1.0 / variance[ok]
    return float(1000 * np.sqrt(np.sum(weights * xy[ok] ** 2) / np.sum(weights)))


def _correlation(a, b):
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return None
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def residual_tables(experiments, result, parts, variance, depth=1) -> list[dict]:
    """The tables cctbx.xfel.detector_residuals users look for: per panel group the
    RMS and weighted in-plane residual and the correlations of the radial and
    transverse residuals with Δψ (or Δφ); the spread of the unit cell across the
    experiments."""
    tables = []
    used = np.flatnonzero(result.used)
    if used.size and parts is not None:
        detector = experiments[int(result.experiment[used[0]])].detector
        groups = detector.groups_at_depth(depth)
        group_of_panel = np.full(max(len(detector.panels), int(result.panel[used].max()) + 1), -1)
        for index, group in enumerate(groups):
            group_of_panel[list(group.panels)] = index
        label = group_of_panel[result.panel[used]]
        xy, angle = parts.delta_xy[used], np.degrees(parts.angle[used])
        radial, transverse = parts.radial_mm[used], parts.transverse_mm[used]
        var = variance[used, :2] if variance is not None else None
        rows = []
        for name, mine in [("all", np.ones(used.size, bool))] + [(g.name, label == i) for i, g in enumerate(groups)]:
            if not mine.any():
                continue
            rms = float(1000 * np.sqrt(np.nanmean(np.sum(xy[mine] ** 2, axis=1))))
            weighted = None if var is None else _weighted_rmsd_um(xy[mine], var[mine])
            rows.append([name, int(mine.sum()), number(rms, ".1f"), number(weighted, ".1f"),
                         number(_correlation(radial[mine], angle[mine]), ".2f"),
                         number(_correlation(transverse[mine], angle[mine]), ".2f")])
        tables.append({"title": "In-plane residuals per panel group (as cctbx.xfel.detector_residuals reports them)",
                       "header": ["group", "n", "RMS in-plane (µm)", "weighted RMSD (µm)", "r(radial, Δψ/Δφ)",
                                  "r(transverse, Δψ/Δφ)"], "rows": rows})
    cells = []
    for experiment in experiments:
        if experiment.crystal is not None:
            real = np.linalg.inv(experiment.crystal.A)  # rows a, b, c (Å)
            a, b, c = real
            angle = lambda u, v: np.degrees(np.arccos(np.clip(u @ v / np.linalg.norm(u) / np.linalg.norm(v), -1, 1)))
            cells.append([np.linalg.norm(a), np.linalg.norm(b), np.linalg.norm(c), angle(b, c), angle(a, c), angle(a, b)])
    if len(cells) > 1:
        cells = np.array(cells)
        rows = [[name, number(float(cells[:, i].mean()), ".4f"), number(float(cells[:, i].std()), ".4f"),
                 number(float(cells[:, i].min()), ".4f"), number(float(cells[:, i].max()), ".4f")]
                for i, name in enumerate(("a (Å)", "b (Å)", "c (Å)", "α (°)", "β (°)", "γ (°)"))]
        tables.append({"title": f"Unit cell across the {len(cells)} experiments (the model's, as refined)",
                       "header": ["parameter", "mean", "standard deviation", "min", "max"], "rows": rows})
    return tables

