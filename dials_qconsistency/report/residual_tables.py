"""The tables of the HTML report that cctbx.xfel.detector_residuals users look
for: per panel group the RMS and weighted in-plane residual (µm) and the
correlations of the radial and transverse residuals with Δψ (or Δφ), and the
spread of the unit cell across the experiments.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dials_qconsistency.core.blocks import map_blocks
from dials_qconsistency.core.row_statistics import contiguous
from dials_qconsistency.core.verdict import PRECISION_MM, PRECISION_PSI
from dials_qconsistency.report.html import number


#: Per-group sums behind the residual table, accumulated a block of rows at a time.
SUMS = ("n_xy", "xy2", "w_xy2", "w", "n_r", "r_a", "r_b", "r_aa", "r_bb", "r_ab", "n_t", "t_a", "t_b", "t_aa", "t_bb",
        "t_ab")


def _group_sums(result, parts, variance, used, label, groups: int, pool=None) -> dict:
    """The sums of :data:`SUMS` per group (index ``groups``: rows in no group),
    over the ``used`` rows in blocks: no temporary the size of the table.
    Consecutive used rows are read as views, and finite blocks unmasked; the
    blocks are summed on ``pool``'s threads when given, added in block order."""
    selection = contiguous(used, len(result.reason))

    def block_sums(block) -> dict:
        out = {}

        def add(name, bins, ok, weights=None):
            if ok is not None:
                bins, weights = bins[ok], None if weights is None else weights[ok]
            out[name] = np.bincount(bins, weights=weights, minlength=groups + 1)

        rows = (slice(selection.start + block.start, selection.start + block.stop)
                if isinstance(selection, slice) else used[block])
        bin_ = label[block]
        x, y = parts.delta_xy[rows, 0], parts.delta_xy[rows, 1]
        xy2 = x * x + y * y
        ok = np.isfinite(xy2)
        ok = None if ok.all() else ok
        add("n_xy", bin_, ok)
        add("xy2", bin_, ok, xy2)
        if variance is not None:  # weights 1/σ² of x and y where both variances are positive
            var_x, var_y = variance[rows, 0], variance[rows, 1]
            weighted = (var_x > 0) & (var_y > 0)
            weighted = weighted if ok is None else weighted & ok
            if not weighted.all():
                var_x, var_y, x_w, y_w, bins = var_x[weighted], var_y[weighted], x[weighted], y[weighted], bin_[weighted]
            else:
                x_w, y_w, bins = x, y, bin_
            w_x, w_y = 1.0 / var_x, 1.0 / var_y
            add("w_xy2", bins, None, w_x * (x_w * x_w) + w_y * (y_w * y_w))
            add("w", bins, None, w_x + w_y)
        angle = np.degrees(parts.angle[rows])
        angle_ok = np.isfinite(angle)
        for prefix, values in (("r", parts.radial_mm[rows]), ("t", parts.transverse_mm[rows])):
            pair = np.isfinite(values) & angle_ok
            a, b, where = (values, angle, bin_) if pair.all() else (values[pair], angle[pair], bin_[pair])
            add(f"n_{prefix}", where, None)
            for name, weights in (("a", a), ("b", b), ("aa", a * a), ("bb", b * b), ("ab", a * b)):
                add(f"{prefix}_{name}", where, None, weights)
        return out

    sums = {name: np.zeros(groups + 1) for name in SUMS}
    for partial in map_blocks(used.size, block_sums, pool):  # in block order
        for name, values in partial.items():
            sums[name] += values
    return sums


#: An angle (Δφ at the calculated φ, degrees) whose RMS is within numerical precision.
PRECISION_DEG = float(np.degrees(PRECISION_PSI))


def _correlation(n, sa, sb, saa, sbb, sab):
    """Pearson's r of a residual a (mm) with an angle b (degrees) from sums
    (None below 3 pairs, for a constant variable, or where either is within
    numerical precision, RMS at most ``PRECISION_MM`` or ``PRECISION_DEG``:
    the correlation of rounding)."""
    if n < 3 or saa <= n * PRECISION_MM ** 2 or sbb <= n * PRECISION_DEG ** 2:
        return None
    var_a, var_b = saa / n - (sa / n) ** 2, sbb / n - (sb / n) ** 2
    if var_a <= 1e-12 * saa / n or var_b <= 1e-12 * sbb / n:
        return None
    return float(np.clip((sab / n - sa * sb / n / n) / np.sqrt(var_a * var_b), -1.0, 1.0))


def residual_tables(experiments, result, parts, variance, depth=1, threads=1) -> list[dict]:
    """The tables cctbx.xfel.detector_residuals users look for: per panel group the
    RMS and weighted in-plane residual and the correlations of the radial and
    transverse residuals with Δψ (or Δφ); the spread of the unit cell across the
    experiments. Sums over blocks of rows (on up to ``threads`` threads, the
    same floats), so any table size costs little memory."""
    tables = []
    used = np.flatnonzero(result.used)
    if used.size and parts is not None:
        detector = experiments[int(result.experiment[used[0]])].detector
        groups = detector.groups_at_depth(depth)
        group_of_panel = np.full(max(len(detector.panels), int(result.panel[used].max()) + 1), len(groups))
        for index, group in enumerate(groups):
            group_of_panel[list(group.panels)] = index
        label = group_of_panel[result.panel[used]]
        with ThreadPoolExecutor(threads) if threads > 1 else contextlib.nullcontext() as pool:
            sums = _group_sums(result, parts, variance, used, label, len(groups), pool)
        total = {name: values.sum() for name, values in sums.items()}
        counts = np.bincount(label, minlength=len(groups) + 1)
        rows = []
        for name, at in [("all", None)] + [(g.name, i) for i, g in enumerate(groups)]:
            n = used.size if at is None else int(counts[at])
            if not n:
                continue
            s = total if at is None else {key: values[at] for key, values in sums.items()}
            rms = float(1000 * np.sqrt(s["xy2"] / s["n_xy"])) if s["n_xy"] else None
            weighted = float(1000 * np.sqrt(s["w_xy2"] / s["w"])) if variance is not None and s["w"] else None
            rows.append([name, n, number(rms, ".1f"),
                         number(weighted, ".1f"),
                         number(_correlation(*(s[k] for k in ("n_r", "r_a", "r_b", "r_aa", "r_bb", "r_ab"))), ".2f"),
                         number(_correlation(*(s[k] for k in ("n_t", "t_a", "t_b", "t_aa", "t_bb", "t_ab"))), ".2f")])
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

