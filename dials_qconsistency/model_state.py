"""Which scan-varying model state each reflection of rotation data uses.

Two choices, both reproducing a DIALS program exactly:

* ``refinement`` — what dials.refine used: reflections are grouped in blocks
  of *observed* φ (``block_width`` degrees, counted from the scan start) and
  every reflection of a block takes the model state at the scan point
  ``floor(block centre)`` (``BlockCalculator.per_width`` and
  ``ScanVaryingPredictionParameterisation``).
* ``integrate`` — what the scan-varying predictor of dials.integrate used: the
  lab-frame reciprocal vectors at the start and end of the reflection's image
  are linearly interpolated by the fractional position of φ within the image
  (``ScanVaryingRayPredictor``). Reflections predicted just outside the scan
  take the first or last image's pair of states, as DIALS does.
"""

from __future__ import annotations

import math

import numpy as np

DEG2RAD = math.pi / 180.0


def refinement_scan_point(scan, phi_observed, block_width_deg: float = 1.0):
    """Scan-point index (0-based into ``*_at_scan_points``) per reflection.

    Mirrors dials.refine's block assignment; reflections outside every block
    stay in block 0 with centre 0.0, as DIALS leaves them. Returns
    ``(index, outside)`` where ``outside`` marks reflections not in any block.
    """
    phi = np.asarray(phi_observed, dtype=float)
    width = block_width_deg * DEG2RAD
    start, stop = scan.oscillation_range
    n_blocks = int(abs(stop - start) / width) + 1
    if stop > start:
        step = width + 1e-11
    elif stop == start:
        step = 1e-11
    else:
        step = -width + 1e-11
    half_width = width * (0.5 - 1e-11)

    blocks = np.arange(n_blocks)
    block_starts = start + blocks * step
    block_centres = scan.array_index_from_angle(block_starts + half_width)

    # DIALS assigns blocks in order, so a reflection on a shared edge ends up in
    # the later block: test the neighbours of the estimated block, keep the last.
    with np.errstate(invalid="ignore"):
        guess = np.floor((phi - start) / step)
    guess = np.where(np.isfinite(guess), guess, -10).astype(np.int64)
    assigned = np.full(phi.shape, -1, dtype=np.int64)
    for shift in (-1, 0, 1):
        candidate = guess + shift
        valid = (candidate >= 0) & (candidate < n_blocks)
        safe = np.clip(candidate, 0, n_blocks - 1)
        b_start = block_starts[safe]
        inside = valid & (b_start <= phi) & (phi <= b_start + step)
        assigned = np.where(inside, np.maximum(assigned, candidate), assigned)

    outside = assigned < 0
    centre = np.where(outside, 0.0, block_centres[np.clip(assigned, 0, n_blocks - 1)])
    frame = np.floor(centre).astype(np.int64)
    index = frame - scan.array_range[0]
    return index, outside


def integrate_frames(scan, phi):
    """Image (array index), scan-point pair index and fraction α for each φ.

    ``phi = angle(frame) + α · width``; the pair (i, i+1) is clamped to the
    scan like the DIALS predictor does for reflections just outside it.
    """
    position = scan.array_index_from_angle(np.asarray(phi, dtype=float))
    frame = np.floor(position).astype(np.int64)
    alpha = position - frame
    pair = np.clip(frame - scan.array_range[0], 0, scan.num_images - 1)
    outside = (frame < scan.array_range[0]) | (frame >= scan.array_range[1])
    return frame, pair, alpha, outside
