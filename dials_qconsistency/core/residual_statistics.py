"""The residual statistics of the used rows per grouping (experiment, panel,
panel group, resolution shell, wavelength band): |Δq| order statistics and the
RMS of every part of the decomposition, reduced in one pass over blocks of rows.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dials_qconsistency.core.blocks import map_blocks, rows_by_group
from dials_qconsistency.core.row_statistics import contiguous, norm_statistics, row_distances


#: The residual statistics of :meth:`UsedRows.statistics_by`: RMS of each value per row.
RMS_NAMES = ("rms_in_plane_mm", "rms_x_mm", "rms_y_mm", "rms_radial_mm", "rms_transverse_mm", "rms_radial",
             "rms_transverse", "rms_along_q", "rms_delta_phi_deg", "rms_delta_psi_deg")


#: ... and for tables with polychromatic (Laue) rows: RMS Δλ/λ and time-of-flight error (µs).
LAUE_RMS_NAMES = ("rms_wavelength_rel", "rms_tof_us")


#: Up to this many groups, each group's values are picked by a pass over the
#: labels (k passes) rather than by sorting the labels once.
FEW_GROUPS = 16


class UsedRows:
    """|Δq| of the used rows, and their residual values a block at a time.

    Groupings (experiment, panel, panel group, resolution shell) are label
    arrays over the used rows; :meth:`statistics_by` reduces every grouping in
    one pass over blocks of rows, so no temporary is the size of the table.
    """

    def __init__(self, result, parts, used):  # result: q_vectors.QResult
        self.rows = np.flatnonzero(used)
        self.norm = row_distances(result.q_bragg, result.q_pixel, self.rows)
        self.parts = parts
        self.selection = contiguous(self.rows, len(used))  # the rows, as a slice where they are consecutive
        self._all = None  # norm_statistics of every used row, once
        laue = parts is not None and parts.wavelength_rel is not None
        self.rms_names = RMS_NAMES + (LAUE_RMS_NAMES if laue else ())

    def _values(self, block) -> tuple[dict, np.ndarray]:
        """({statistic: value per row}, |q_bragg| - |q_pixel|) of the used rows at positions ``block``."""
        rows = self.selection
        rows = slice(rows.start + block.start, rows.start + block.stop) if isinstance(rows, slice) else rows[block]
        parts = self.parts
        xy = parts.delta_xy[rows]
        angle = np.degrees(parts.angle[rows])
        rotation = parts.rotation[rows]
        along = parts.along_q[rows]
        return {
            "rms_in_plane_mm": np.hypot(xy[:, 0], xy[:, 1]),
            "rms_x_mm": xy[:, 0],
            "rms_y_mm": xy[:, 1],
            "rms_radial_mm": parts.radial_mm[rows],
            "rms_transverse_mm": parts.transverse_mm[rows],
            "rms_radial": parts.radial[rows],
            "rms_transverse": parts.transverse[rows],
            "rms_along_q": along,
            "rms_delta_phi_deg": np.where(rotation, angle, np.nan),
            "rms_delta_psi_deg": np.where(rotation, np.nan, angle),
            **({"rms_wavelength_rel": parts.wavelength_rel[rows], "rms_tof_us": parts.tof_us[rows]}
               if parts.wavelength_rel is not None else {}),
        }, along

    def statistics_by(self, groupings, threads: int = 1) -> list[list[dict | None]]:
        """Statistics of every group of every grouping: ``groupings`` is a list
        of (labels, k), labels a group 0..k-1 (or -1: none) per used row, or
        None for all used rows as one group. Returns, per grouping, k dicts
        (None for an empty group).

        Keys: n, mean/median/rms/p95/max of |Δq| (Å⁻¹, :func:`norm_statistics`,
        numpy's floats); with the decomposition also the RMS of the in-plane
        residual and its fast (x), slow (y), radial and transverse parts (mm),
        of the radial and transverse parts in Å⁻¹, mean and RMS of |q_bragg| -
        |q_pixel| (Å⁻¹), RMS Δφ (rotation rows) and Δψ (still rows) in degrees:
        sums of squares of the finite values, group by group (``np.bincount``).
        With ``threads`` > 1 a pool of that many threads computes the order
        statistics (``np.partition``, one task) and the sums of the blocks of
        rows (``np.bincount``, a task a block) at once (numpy lets the GIL go
        in both); this thread adds the blocks' sums in block order, so the
        floats do not depend on the threads.
        """
        order_statistics = lambda: [self._norm_statistics_by(labels, k) for labels, k in groupings]  # noqa: E731
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                ordered = pool.submit(order_statistics)
                sums, counts = self._sums_by(groupings, pool)
                ordered = ordered.result()
        else:
            sums, counts = self._sums_by(groupings)
            ordered = order_statistics()
        out = []
        for stats, total, count in zip(ordered, sums, counts):
            for group, entry in enumerate(stats):
                if entry is None or self.parts is None:
                    continue
                for name in self.rms_names:
                    n = count[name][group]
                    entry[name] = float(np.sqrt(total[name][group] / n)) if n else None
                n = count["along"][group]
                entry["mean_along_q"] = float(total["along"][group] / n) if n else None
            out.append(stats)
        return out

    def _sums_by(self, groupings, pool=None) -> tuple[list[dict], list[dict]]:
        """(sums, counts): per grouping, name -> per-group sum of the squared
        finite values (of |q_bragg| − |q_pixel| itself for "along") and their
        count; each block's sums on ``pool``'s threads when given, added here
        in block order."""
        m = self.rows.size
        names = self.rms_names + ("along",)
        sums = [{name: np.zeros(k) for name in names} for _, k in groupings]
        counts = [{name: np.zeros(k) for name in names} for _, k in groupings]
        # A grouping whose rows all carry one label sums exactly what the first
        # such grouping sums (the same values in the same order): summed once.
        uniform = [labels is None or (labels.size and np.all(labels == labels[0])) for labels, _ in groupings]
        first = uniform.index(True) if any(uniform) else None
        summed = [i for i in range(len(groupings)) if not uniform[i] or i == first]

        def block_sums(block) -> list[dict]:
            """Per summed grouping, name -> (sums, counts) of the block's rows
            (no entry: no finite value of that name in the block)."""
            values, along = self._values(block)
            terms = {name: v * v for name, v in values.items()}
            terms["along"] = along
            finite = {name: np.isfinite(v) for name, v in values.items()}
            finite["along"] = finite["rms_along_q"]
            one_group = np.zeros(block.stop - block.start, dtype=np.intp)
            out = []
            for i in summed:
                labels, k = groupings[i]
                label = one_group if uniform[i] else labels[block].astype(np.intp)  # bincount's own type: cast once
                keep = finite
                if not (label >= 0).all():
                    inside = label >= 0
                    label = np.where(inside, label, 0)
                    keep = {name: ok & inside for name, ok in finite.items()}
                everything = np.bincount(label, minlength=k)
                mine = {}
                for name, term in terms.items():
                    ok = keep[name]
                    if ok.all():  # the usual case: no mask to apply
                        mine[name] = (np.bincount(label, weights=term, minlength=k), everything)
                    elif ok.any():
                        mine[name] = (np.bincount(label[ok], weights=term[ok], minlength=k),
                                      np.bincount(label[ok], minlength=k))
                out.append(mine)
            return out

        for partial in map_blocks(m if self.parts is not None else 0, block_sums, pool):  # no decomposition: |Δq| only
            for i, mine in zip(summed, partial):
                for name, (total, count) in mine.items():
                    sums[i][name] += total
                    counts[i][name] += count
        if first is not None:  # the sums of every uniform grouping, in the bin of its one label
            once = {name: (sums[first][name][0], counts[first][name][0]) for name in names}
            for i, (labels, k) in enumerate(groupings):
                if not uniform[i]:
                    continue
                group = 0 if labels is None else int(labels[0]) if labels.size else -1
                for name in names:
                    sums[i][name][:] = 0.0
                    counts[i][name][:] = 0.0
                    if group >= 0:
                        sums[i][name][group], counts[i][name][group] = once[name]
        return sums, counts

    def _norm_statistics_by(self, labels, k) -> list[dict | None]:
        """:func:`norm_statistics` of |Δq| per group, the values in row order."""
        if labels is None or (labels.size and np.all(labels == labels[0])):
            stats = [None] * k
            group = 0 if labels is None else int(labels[0]) if labels.size else -1
            if self.norm.size and group >= 0:
                if self._all is None:  # all rows in one group: the same for every such grouping
                    self._all = norm_statistics(self.norm)
                stats[group] = dict(self._all)
            return stats
        if k <= FEW_GROUPS:  # a pass per group picks its values (in row order) faster than sorting the labels
            picked = (self.norm[labels == group] for group in range(k))
        else:
            picked = (self.norm[rows] for rows in rows_by_group(labels, k))
        return [norm_statistics(values, overwrite=True) if values.size else None for values in picked]  # copies

