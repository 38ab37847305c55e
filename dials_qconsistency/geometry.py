"""Vectorised lab-frame geometry (pure numpy, no per-reflection loops).

Conventions (DIALS / imgCIF laboratory frame): s0 = -unit(beam direction)/λ,
|s1| = 1/λ, q = s1 - s0 in Å⁻¹ without 2π; detector positions in mm; angles in
radians. Arrays of N vectors are (N, 3); stacks of matrices are (N, 3, 3).
"""

from __future__ import annotations

import numpy as np


def unit(vectors: np.ndarray) -> np.ndarray:
    """Normalise vectors along the last axis."""
    vectors = np.asarray(vectors, dtype=float)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def rotation_matrices(axis, angles) -> np.ndarray:
    """Right-handed rotations by ``angles`` (rad) about ``axis``: (N, 3, 3).

    Same matrix as scitbx ``axis_and_angle_as_r3_rotation_matrix`` (the axis
    is normalised first).
    """
    u = unit(np.asarray(axis, dtype=float))
    angles = np.asarray(angles, dtype=float)
    c, s = np.cos(angles), np.sin(angles)
    t = 1.0 - c
    x, y, z = u
    r = np.empty(angles.shape + (3, 3))
    r[..., 0, 0] = c + x * x * t
    r[..., 0, 1] = x * y * t - z * s
    r[..., 0, 2] = x * z * t + y * s
    r[..., 1, 0] = y * x * t + z * s
    r[..., 1, 1] = c + y * y * t
    r[..., 1, 2] = y * z * t - x * s
    r[..., 2, 0] = z * x * t - y * s
    r[..., 2, 1] = z * y * t + x * s
    r[..., 2, 2] = c + z * z * t
    return r


def rotation_matrix(axis, angle: float) -> np.ndarray:
    """One right-handed rotation matrix (3, 3); angle in radians."""
    return rotation_matrices(axis, np.asarray(angle, dtype=float))


def matvec(matrices: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Apply one (3, 3) or N (N, 3, 3) matrices to N vectors (N, 3)."""
    return np.einsum("...ij,...j->...i", matrices, vectors)


def rowdot(a, b) -> np.ndarray:
    """Dot products of matching rows (broadcasting)."""
    return np.einsum("...i,...i->...", a, b)


def lab_coordinates(origin, fast, slow, xy_mm) -> np.ndarray:
    """Lab position (mm) of panel coordinates (x along fast, y along slow).

    Panel vectors may be one panel's (3,) or one per row (N, 3).
    """
    xy_mm = np.asarray(xy_mm, dtype=float)
    return np.asarray(origin) + xy_mm[..., 0:1] * np.asarray(fast) + xy_mm[..., 1:2] * np.asarray(slow)


def attenuation_length(mu, thickness, rays, fast, slow, origin) -> np.ndarray:
    """Mean absorption depth (mm) along unit rays into a sensor (dxtbx formula).

    The sensor normal is taken to point away from the sample; all arguments
    may be per row.
    """
    normal = np.cross(fast, slow)
    normal = np.where((rowdot(origin, normal) < 0)[..., None], -normal, normal)
    cos_t = rowdot(rays, normal)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return (1.0 / mu) - (thickness / cos_t + 1.0 / mu) * np.exp(-mu * thickness / cos_t)


def _parallax_shift(xy_mm, origin, fast, slow, mu, thickness):
    """(ray · fast, ray · slow) · depth: how far parallax moves a panel point."""
    rays = unit(lab_coordinates(origin, fast, slow, xy_mm))
    depth = attenuation_length(mu, thickness, rays, fast, slow, origin)
    return np.stack([rowdot(rays, fast), rowdot(rays, slow)], axis=-1) * np.asarray(depth)[..., None]


def pixel_to_millimetre(xy_px, pixel_size, origin, fast, slow, mu=0.0, thickness=0.0, parallax=False):
    """Panel px -> mm, sub-pixel; parallax-corrected like dxtbx where asked.

    The simple mapping scales by the pixel size; the parallax-corrected one
    (``ParallaxCorrectedPxMmStrategy.to_millimeter``) then moves the point back
    along the ray by the attenuation length. Panel values may be per row.
    """
    xy = np.asarray(xy_px, dtype=float) * np.asarray(pixel_size, dtype=float)
    parallax = np.asarray(parallax, dtype=bool)
    if not parallax.any():
        return xy
    shift = _parallax_shift(xy, origin, fast, slow, mu, thickness)
    return np.where(parallax[..., None], xy - shift, xy)


def millimetre_to_pixel(xy_mm, pixel_size, origin, fast, slow, mu=0.0, thickness=0.0, parallax=False):
    """Panel mm -> px, the dxtbx inverse (used by the simulator and tests)."""
    xy = np.asarray(xy_mm, dtype=float)
    parallax = np.asarray(parallax, dtype=bool)
    if parallax.any():
        xy = np.where(parallax[..., None], xy + _parallax_shift(xy, origin, fast, slow, mu, thickness), xy)
    return xy / np.asarray(pixel_size, dtype=float)


def q_from_lab_position(lab_mm, s0) -> np.ndarray:
    """q = k_out - k_in for scattering towards lab positions (mm); s0 (N,3) or (3,)."""
    s0 = np.asarray(s0, dtype=float)
    wavenumber = np.linalg.norm(s0, axis=-1, keepdims=True)
    return unit(lab_mm) * wavenumber - s0


def q_bragg_still(A, hkl) -> np.ndarray:
    """Stills: r = A · h (A (3,3) or (N,3,3))."""
    return matvec(A, np.asarray(hkl, dtype=float))


def q_bragg_rotation(S, axis, phi, F, A, hkl) -> np.ndarray:
    """Rotation data: r = S · R(axis, φ) · F · A · h; S, A may be per row."""
    r_crystal = matvec(A, np.asarray(hkl, dtype=float))
    r_goniometer = matvec(F, r_crystal)
    r_rotated = matvec(rotation_matrices(axis, phi), r_goniometer)
    return matvec(S, r_rotated)
