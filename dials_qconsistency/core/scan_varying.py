"""Which scan-varying model state each reflection of rotation data uses.

Two choices for reflections, both reproducing a DIALS program exactly, and the
model at one image for per-pixel maps:

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

from dials_qconsistency.core.geometry import setting_matrices, unit

DEG2RAD = math.pi / 180.0

#: DIALS' flags integrated_sum | integrated_prf: only dials.integrate sets them,
#: on rows it integrated, so a table with them holds its predictions.
INTEGRATED_FLAGS = (1 << 8) | (1 << 9)


def choose_model_state(requested: str, flags) -> tuple[str, bool]:
    """``(state, chosen_automatically)`` for ``model_state=requested``.

    ``auto`` is ``integrate`` when some row of the table carries DIALS'
    ``integrated`` flags (``flags`` may be None) and ``refinement`` otherwise;
    the other choices stand. Spot finding also writes ``intensity.sum.value``,
    so the columns cannot tell.
    """
    if requested != "auto":
        return requested, False
    integrated = flags is not None and bool(np.any(np.asarray(flags) & INTEGRATED_FLAGS))
    return ("integrate" if integrated else "refinement"), True


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


def scan_varying_states(experiment):
    """A, S and s0 at every scan point (n = images + 1), or None when nothing varies.

    Models that do not vary are repeated; without a crystal A is the identity.
    """
    crystal, beam, gonio, scan = experiment.crystal, experiment.beam, experiment.goniometer, experiment.scan
    sources = {
        "A": crystal.A_at_scan_points if crystal is not None else None,
        "S": gonio.setting_rotation_at_scan_points,
        "s0": beam.s0_at_scan_points,
    }
    if all(v is None for v in sources.values()):
        return None
    n_points = scan.num_images + 1  # counts checked when the .expt was read
    A = crystal.A if crystal is not None else np.eye(3)
    return {
        "A": sources["A"] if sources["A"] is not None else np.broadcast_to(A, (n_points, 3, 3)),
        "S": sources["S"] if sources["S"] is not None else np.broadcast_to(gonio.setting_rotation, (n_points, 3, 3)),
        "s0": sources["s0"] if sources["s0"] is not None else np.broadcast_to(beam.s0, (n_points, 3)),
    }


def integrate_setting(experiment, varying, phi):
    """dials.integrate's scan-varying model at rotation angles φ (rad).

    Returns ``(M, s0, S, outside)``: the lab-frame setting matrices (r = M·h),
    linear between the states at the two ends of each φ's image (the predictor
    interpolates r, and r is linear in M); s0 with the interpolated direction
    and the mean wavenumber; the setting rotation S of the nearer image end (for
    the Δφ decomposition); and which φ lie outside the scan.
    """
    gonio, scan = experiment.goniometer, experiment.scan
    frame, pair, alpha, outside = integrate_frames(scan, phi)
    phi_begin = scan.angle_from_array_index(frame)
    phi_end = scan.angle_from_array_index(frame + 1)
    M_begin = setting_matrices(varying["S"][pair], gonio.axis, phi_begin, gonio.fixed_rotation, varying["A"][pair])
    M_end = setting_matrices(varying["S"][pair + 1], gonio.axis, phi_end, gonio.fixed_rotation, varying["A"][pair + 1])
    a = alpha[:, None, None]
    M = M_begin + a * (M_end - M_begin)
    s0a, s0b = varying["s0"][pair], varying["s0"][pair + 1]
    wavenumber = 0.5 * (np.linalg.norm(s0a, axis=1) + np.linalg.norm(s0b, axis=1))
    ua, ub = unit(s0a), unit(s0b)
    s0 = wavenumber[:, None] * (alpha[:, None] * (ub - ua) + ua)
    S = np.where((alpha < 0.5)[:, None, None], varying["S"][pair], varying["S"][pair + 1])
    return M, s0, S, outside


def image_setting(experiment, image=None):
    """The model at the centre of one image, for per-pixel maps.

    Returns ``(M, s0, phi)`` with r_lab = M·h (Å⁻¹): stills give (A, s0, None);
    rotation data give φ (rad) at the centre of ``image`` (its number in the
    scan, the first image by default), the static model evaluated exactly
    (M = S·R(φ)·F·A) or the scan-varying one interpolated as dials.integrate
    does. M is None when the experiment has no crystal.
    """
    crystal, beam = experiment.crystal, experiment.beam
    if not experiment.is_rotation:
        return (crystal.A if crystal is not None else None), np.asarray(beam.s0, dtype=float), None
    scan, gonio = experiment.scan, experiment.goniometer
    first, last = scan.image_range
    image = first if image is None else image
    if not first <= image <= last:
        raise ValueError(f"image {image} is outside the scan (images {first} to {last})")
    phi = float(scan.angle_from_array_index(scan.array_range[0] + (image - first) + 0.5))
    varying = scan_varying_states(experiment)
    if varying is None:
        A = crystal.A if crystal is not None else np.eye(3)
        M = setting_matrices(gonio.setting_rotation, gonio.axis, phi, gonio.fixed_rotation, A)
        s0 = np.asarray(beam.s0, dtype=float)
    else:
        M, s0, _, _ = integrate_setting(experiment, varying, np.array([phi]))
        M, s0 = M[0], s0[0]
    return (M if crystal is not None else None), s0, phi
