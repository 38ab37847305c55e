"""Vectorised lab-frame geometry (pure numpy, no per-reflection loops).

Conventions (DIALS / imgCIF laboratory frame): s0 = -unit(beam direction)/λ,
|s1| = 1/λ, q = s1 - s0 in Å⁻¹ without 2π; detector positions in mm; angles in
radians. Arrays of N vectors are (N, 3); stacks of matrices are (N, 3, 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def norms(vectors) -> np.ndarray:
    """Lengths of 3-vectors along the last axis: sqrt((x² + y²) + z²), the same
    bits as ``np.linalg.norm(v, axis=-1)`` and the same whatever the row count."""
    x, y, z = components(vectors)
    return np.sqrt(x * x + y * y + z * z)


def rows_where_all(test, vectors) -> np.ndarray:
    """Rows of (..., k) ``vectors`` where ``test`` (elementwise, to booleans)
    holds for every component, a column at a time: numpy's reduction along a
    short last axis (``np.all(..., axis=-1)``) is several times slower."""
    vectors = np.asarray(vectors)
    holds = test(vectors[..., 0])
    for i in range(1, vectors.shape[-1]):
        holds &= test(vectors[..., i])
    return holds


def finite_rows(vectors) -> np.ndarray:
    """Rows of (..., k) vectors whose every component is finite."""
    return rows_where_all(np.isfinite, vectors)


def nonzero_rows(vectors) -> np.ndarray:
    """Rows of (..., k) vectors with some component not zero."""
    return ~rows_where_all(lambda v: v == 0, vectors)


def unit(vectors: np.ndarray) -> np.ndarray:
    """Normalise vectors along the last axis."""
    vectors = np.asarray(vectors, dtype=float)
    return vectors / norms(vectors)[..., None]


def _is_one_vector(vectors) -> bool:
    """Is ``vectors`` (N, k) a broadcast of one vector (row stride 0)?"""
    return vectors.ndim == 2 and len(vectors) > 0 and vectors.strides[0] == 0


def _unit_rows(vectors) -> np.ndarray:
    """:func:`unit` of (N, 3) vectors; a broadcast of one vector (a static
    goniometer's axis for every row) is normalised once: the same bits."""
    vectors = np.asarray(vectors, dtype=float)
    return np.broadcast_to(unit(vectors[0]), vectors.shape) if _is_one_vector(vectors) else unit(vectors)


def unit_components(v):
    """:func:`unit` of vectors given as their three parts (x, y, z)."""
    length = np.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])
    return v[0] / length, v[1] / length, v[2] / length


def cross_components(a, b):
    """a × b of vectors given as their three parts (x, y, z)."""
    return a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]


def dot_components(a, b):
    """a · b of vectors given as their three parts (x, y, z)."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def cross(a, b) -> np.ndarray:
    """a × b along the last axis (broadcasting), without numpy's axis shuffling."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    out = np.empty(np.broadcast_shapes(a.shape, b.shape))
    out[..., 0], out[..., 1], out[..., 2] = cross_components(components(a), components(b))
    return out


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


def apply_matrix(matrix, vectors) -> np.ndarray:
    """One (3, 3) matrix applied to every row of ``vectors`` (..., 3); for one
    matrix per row, :func:`matvec`.

    Written out element by element, so each row's result is the same bits
    whatever the number of rows (a BLAS product may round differently for
    different array sizes, and results must not depend on how rows are chunked).
    """
    m = np.asarray(matrix, dtype=float)
    v = np.asarray(vectors, dtype=float)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    out = np.empty(v.shape)
    for i in range(3):
        out[..., i] = m[i, 0] * x + m[i, 1] * y + m[i, 2] * z
    return out


def matvec(matrices: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Apply N (N, 3, 3) matrices (or one) to N vectors (N, 3); for one matrix
    and rows that must not depend on the row count, :func:`apply_matrix`."""
    return np.einsum("...ij,...j->...i", matrices, vectors)


def rowdot(a, b) -> np.ndarray:
    """Dot products of matching rows (broadcasting)."""
    return np.einsum("...i,...i->...", a, b)


def lab_coordinates(origin, fast, slow, xy_mm) -> np.ndarray:
    """Lab position (mm) of panel coordinates (x along fast, y along slow), (..., 3).

    Panel vectors may be one panel's (3,) or one per row (N, 3).
    """
    xy_mm = np.asarray(xy_mm, dtype=float)
    return np.stack(panel_points_to_lab(origin, fast, slow, xy_mm[..., 0], xy_mm[..., 1]), axis=-1)


def components(vectors):
    """The x, y and z parts of (3,) or (..., 3) vectors, as three arrays (a
    tuple of three parts is returned as it is)."""
    if isinstance(vectors, tuple):
        return vectors
    vectors = np.asarray(vectors, dtype=float)
    return vectors[..., 0], vectors[..., 1], vectors[..., 2]


def panel_points_to_lab(origin, fast, slow, x_mm, y_mm):
    """Lab position components (lx, ly, lz), mm, of panel points (x along fast, y along slow).

    Panel vectors are one panel's (3,) or one per point (N, 3); ``x_mm`` and
    ``y_mm`` broadcast against each other, so a row of x and a column of y give
    a whole pixel grid without building (ny, nx, 3) temporaries.
    """
    o, f, s = components(origin), components(fast), components(slow)
    return tuple(o[i] + x_mm * f[i] + y_mm * s[i] for i in range(3))


def q_from_lab_components(lx, ly, lz, s0):
    """q = k_out − k_in (Å⁻¹) as components (qx, qy, qz) for scattering towards lab points (mm).

    The one implementation of position → q: the per-reflection q_pixel of
    dials.q_consistency and the per-pixel maps of dials.q_map both end here.
    ``s0`` is (3,) or one per point (N, 3); |k_out| = |s0|.
    """
    if not isinstance(s0, tuple) and _is_one_vector(np.asarray(s0)):
        s0 = np.asarray(s0)[0]  # one s0 for every point: |s0| once, the same bits
    s = components(s0)
    scale = np.sqrt(s[0] * s[0] + s[1] * s[1] + s[2] * s[2]) / np.sqrt(lx * lx + ly * ly + lz * lz)
    return lx * scale - s[0], ly * scale - s[1], lz * scale - s[2]


def q_from_lab_position(lab_mm, s0) -> np.ndarray:
    """q = k_out - k_in (N, 3) for scattering towards lab positions (N, 3) mm."""
    return np.stack(q_from_lab_components(*components(lab_mm), s0), axis=-1)


def _parallax_shift(x_mm, y_mm, origin, fast, slow, mu, thickness):
    """How far parallax moves a panel point along fast and slow (mm).

    The ray from the sample to the point, times dxtbx's mean absorption depth
    ``1/μ − (t/cos θ + 1/μ)·exp(−μ t / cos θ)`` (θ from the sensor normal,
    which points away from the sample). Panel values may be per point.
    """
    lx, ly, lz = panel_points_to_lab(origin, fast, slow, x_mm, y_mm)
    inverse_length = 1.0 / np.sqrt(lx * lx + ly * ly + lz * lz)
    f, s = components(fast), components(slow)
    normal = components(np.cross(fast, slow))
    o = components(origin)
    away = np.where(o[0] * normal[0] + o[1] * normal[1] + o[2] * normal[2] < 0, -1.0, 1.0)
    cos_t = (lx * normal[0] + ly * normal[1] + lz * normal[2]) * inverse_length * away
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        depth = (1.0 / mu) - (thickness / cos_t + 1.0 / mu) * np.exp(-mu * thickness / cos_t)
    along_fast = (lx * f[0] + ly * f[1] + lz * f[2]) * inverse_length
    along_slow = (lx * s[0] + ly * s[1] + lz * s[2]) * inverse_length
    return along_fast * depth, along_slow * depth


def pixel_to_millimetre_xy(x_px, y_px, pixel_size, origin, fast, slow, mu=0.0, thickness=0.0, parallax=False):
    """Panel px -> mm (x, y), sub-pixel; parallax-corrected like dxtbx where asked.

    The simple mapping scales by the pixel size; the parallax-corrected one
    (``ParallaxCorrectedPxMmStrategy.to_millimeter``) then moves the point back
    along the ray by the absorption depth. Panel values may be per point; the
    coordinates broadcast (a row of x and a column of y give a grid).
    """
    pixel_size = np.asarray(pixel_size, dtype=float)
    x = np.asarray(x_px, dtype=float) * pixel_size[..., 0]
    y = np.asarray(y_px, dtype=float) * pixel_size[..., 1]
    parallax = np.asarray(parallax, dtype=bool)
    if not parallax.any():
        return x, y
    dx, dy = _parallax_shift(x, y, origin, fast, slow, mu, thickness)
    return np.where(parallax, x - dx, x), np.where(parallax, y - dy, y)


def pixel_to_millimetre(xy_px, pixel_size, origin, fast, slow, mu=0.0, thickness=0.0, parallax=False):
    """:func:`pixel_to_millimetre_xy` for stacked (..., 2) coordinates."""
    xy_px = np.asarray(xy_px, dtype=float)
    x, y = pixel_to_millimetre_xy(xy_px[..., 0], xy_px[..., 1], pixel_size, origin, fast, slow, mu, thickness, parallax)
    return np.stack([x, y], axis=-1)


def millimetre_to_pixel(xy_mm, pixel_size, origin, fast, slow, mu=0.0, thickness=0.0, parallax=False):
    """Panel mm (..., 2) -> px, the dxtbx inverse (used by the simulator and tests)."""
    x, y = np.asarray(xy_mm, dtype=float)[..., 0], np.asarray(xy_mm, dtype=float)[..., 1]
    parallax = np.asarray(parallax, dtype=bool)
    if parallax.any():
        dx, dy = _parallax_shift(x, y, origin, fast, slow, mu, thickness)
        x, y = np.where(parallax, x + dx, x), np.where(parallax, y + dy, y)
    return np.stack([x, y], axis=-1) / np.asarray(pixel_size, dtype=float)


def q_bragg_still(A, hkl) -> np.ndarray:
    """Stills: r = A · h (A (3,3) or (N,3,3))."""
    A, hkl = np.asarray(A, dtype=float), np.asarray(hkl, dtype=float)
    return apply_matrix(A, hkl) if A.ndim == 2 else matvec(A, hkl)


def q_bragg_rotation(S, axis, phi, F, A, hkl, out=None) -> np.ndarray:
    """Rotation data: r = S · R(axis, φ) · F · A · h; S, A may be per row.

    With one S and one A (a static model) the constant products are single
    3×3 matrix products and R(φ) is applied by Rodrigues' formula to the
    vectors, without building a matrix per row; written into ``out`` (N, 3)
    when given.
    """
    S, A = np.asarray(S, dtype=float), np.asarray(A, dtype=float)
    if S.ndim == 2 and A.ndim == 2:
        hkl = np.asarray(hkl)
        h, k, l = (hkl[..., i].astype(float) for i in range(3))
        FA = np.asarray(F, dtype=float) @ A
        x, y, z = (FA[i, 0] * h + FA[i, 1] * k + FA[i, 2] * l for i in range(3))
        rx, ry, rz = _rodrigues(x, y, z, axis, phi)
        out = np.empty(rx.shape + (3,)) if out is None else out
        for i in range(3):
            out[..., i] = S[i, 0] * rx + S[i, 1] * ry + S[i, 2] * rz
        return out
    hkl = np.asarray(hkl, dtype=float)
    r_crystal = matvec(A, hkl)
    r_goniometer = matvec(F, r_crystal)
    r_rotated = rotate_about_axis(r_goniometer, axis, phi)
    if out is None:
        return matvec(S, r_rotated)
    out[...] = matvec(S, r_rotated)
    return out


def _rodrigues(x, y, z, axis, angles):
    """Components of the right-handed rotation of (x, y, z) by ``angles`` (rad)
    about one ``axis``: v cos θ + (e × v) sin θ + e (e·v)(1 − cos θ)."""
    e = unit(np.asarray(axis, dtype=float))
    angles = np.asarray(angles, dtype=float)
    c, s = np.cos(angles), np.sin(angles)
    along = (e[0] * x + e[1] * y + e[2] * z) * (1.0 - c)
    return (
        x * c + (e[1] * z - e[2] * y) * s + e[0] * along,
        y * c + (e[2] * x - e[0] * z) * s + e[1] * along,
        z * c + (e[0] * y - e[1] * x) * s + e[2] * along,
    )


def rotate_about_axis(vectors, axis, angles) -> np.ndarray:
    """Right-handed rotation of each row of ``vectors`` (N, 3) by its angle (rad) about one ``axis``."""
    return np.stack(_rodrigues(*components(vectors), axis, angles), axis=-1)


def setting_matrices(S, axis, phi, F, A) -> np.ndarray:
    """Lab-frame setting matrices M = S · R(axis, φ) · F · A (r_lab = M · h); S, A, φ may be per row."""
    return np.matmul(np.matmul(np.matmul(S, rotation_matrices(axis, phi)), F), A)


def ewald_rotation_angles(r, axis, s0) -> np.ndarray:
    """Both angles δ (rad) about ``axis`` that put R(axis, δ)·r on the Ewald sphere.

    Solves |s0 + R(δ)·r| = |s0|, i.e. s0·R(δ)·r = -|r|²/2, written as
    a·cos δ + b·sin δ = c. ``axis`` and ``s0`` may be one vector or one per
    row (all in one frame). Returns (N, 2), NaN where the point never reaches
    the sphere (the blind region).
    """
    return np.stack(_ewald_rotation_pair(r, axis, s0), axis=-1)


def _ewald_rotation_pair(r, axis, s0):
    """The two angles of :func:`ewald_rotation_angles`, as two arrays, computed
    on components; a static axis or beam (one vector for every row) enters as
    scalars."""
    e = components(unit(np.asarray(axis, dtype=float)[0]) if _is_one_vector(np.asarray(axis)) else _unit_rows(axis))
    k = components(np.asarray(s0)[0] if _is_one_vector(np.asarray(s0)) else s0)
    r = components(r)
    along = _rowdot_components(r, e)
    perpendicular = tuple(r[i] - along * e[i] for i in range(3))
    a = _rowdot_components(perpendicular, k)
    b = _rowdot_components(cross_components(e, r), k)
    c = -0.5 * _rowdot_components(r, r) - along * _rowdot_components(e, k)
    rho = np.hypot(a, b)
    with np.errstate(invalid="ignore", divide="ignore"):
        spread = np.arccos(c / rho)
    base = np.arctan2(b, a)
    return base - spread, base + spread


def _rowdot_components(a, b):
    """:func:`rowdot` of component triples, added in the order numpy's einsum
    adds a C-contiguous row, (x + z) + y: the same bits as ``rowdot`` of
    C-ordered stacked vectors (every caller's), without einsum's cost."""
    return (a[0] * b[0] + a[2] * b[2]) + a[1] * b[1]


def wrap_angle(angles) -> np.ndarray:
    """Angles (rad) wrapped into [-π, π): np.mod(angle + π, 2π) - π, the same
    bits, with one turn added or taken away where np.mod does just that
    (-2π <= t = angle + π < 4π: for t < 0 np.mod adds the turn to fmod's
    exact t, rounding as t + 2π does; for t >= 2π fmod's t - 2π is exact, and
    so is the subtraction); elsewhere np.mod itself."""
    turn = 2 * np.pi
    t = np.asarray(angles, dtype=float) + np.pi
    wrapped = np.where(t < 0, t + turn, np.where(t >= turn, t - turn, t))
    far = (t < -turn) | (t >= 2 * turn)
    if far.any():
        wrapped[far] = np.mod(t[far], turn)
    return wrapped - np.pi


def nearest_ewald_rotation(r, axis, s0) -> np.ndarray:
    """The smaller (in magnitude) of the two Ewald-sphere rotation angles (rad),
    the first on a tie; NaN where neither exists."""
    first, second = (wrap_angle(angle) for angle in _ewald_rotation_pair(r, axis, s0))
    size = lambda angle: np.where(np.isnan(angle), np.inf, np.abs(angle))  # noqa: E731
    return np.where(size(second) < size(first), second, first)


def stills_rotation(r, s0):
    """DIALS' stills prediction: rotate r in the plane of s0 and r onto the sphere.

    Returns (Δψ (rad), axis (N, 3)): the right-handed rotation by Δψ about
    the unit axis ``unit(r × s0)`` takes r onto the Ewald sphere, |r| kept
    (DIALS' ``delpsical.rad`` convention: a positive angle turns r towards s0).
    """
    r = np.asarray(r, dtype=float)
    s0 = np.broadcast_to(np.asarray(s0, dtype=float), r.shape)
    length = norms(r)
    wavenumber = norms(s0)
    u = unit(s0)
    with np.errstate(invalid="ignore", divide="ignore"):
        now = np.arccos(np.clip(rowdot(r, u) / length, -1.0, 1.0))
        on_sphere = np.arccos(np.clip(-length / (2.0 * wavenumber), -1.0, 1.0))
        axis = unit(cross(r, s0))
    return now - on_sphere, axis


@dataclass
class AxisRotations:
    """The Rodrigues rotation of each row about its own unit axis (N, 3, or one
    vector broadcast) by its own angle (rad), its sine and cosine computed once
    (:meth:`of`), for rotating several sets of vectors by the same rotations."""

    axes: np.ndarray  # (N, 3) unit
    cos: np.ndarray  # (N,)
    sin: np.ndarray  # (N,)
    versine: np.ndarray  # (N,): 1 - cos

    @classmethod
    def of(cls, axes, angles) -> "AxisRotations":
        angles = np.asarray(angles, dtype=float)
        cos = np.cos(angles)
        return cls(_unit_rows(axes), cos, np.sin(angles), 1 - cos)

    def rows(self, block) -> "AxisRotations":
        """The rotations of some rows (a slice or row numbers)."""
        return AxisRotations(self.axes[block], self.cos[block], self.sin[block], self.versine[block])

    def apply(self, vectors) -> np.ndarray:
        """The rotated rows of ``vectors`` (N, 3): v cos θ + (e × v) sin θ +
        e (e·v)(1 − cos θ), added in that order, a component at a time (one
        axis for every row enters as scalars)."""
        v = np.asarray(vectors, dtype=float)
        along = rowdot(self.axes, v)
        e = components(self.axes[0] if _is_one_vector(self.axes) else self.axes)
        v_parts = components(v)
        across = cross_components(e, v_parts)
        out = np.empty(np.broadcast_shapes(v.shape, self.axes.shape))
        for i in range(3):
            out[..., i] = v_parts[i] * self.cos + across[i] * self.sin + e[i] * along * self.versine
        return out


def rotate_about_axes(vectors, axes, angles) -> np.ndarray:
    """Rodrigues rotation of each row of ``vectors`` about its own axis (N, 3) by
    its angle (rad) (:class:`AxisRotations`); about one axis for all rows,
    :func:`rotate_about_axis`."""
    return AxisRotations.of(axes, angles).apply(vectors)


def one_vector_if_same(vectors) -> np.ndarray:
    """(N, k) ``vectors`` as a broadcast of their first row when every row has
    the first row's bits (a static goniometer's axis, a beam that does not
    vary), so that the functions here that take one vector or one per row
    work on the one (:func:`_is_one_vector`): the same bits, once instead of
    N times. Otherwise ``vectors`` as they are."""
    vectors = np.asarray(vectors, dtype=float)
    if vectors.ndim != 2 or not len(vectors) or _is_one_vector(vectors):
        return vectors
    bits = np.ascontiguousarray(vectors).view(np.int64)
    same = rows_where_all(lambda column: column == column[0], bits).all()
    return np.broadcast_to(vectors[0], vectors.shape) if same else vectors


def ray_panel_xy(d_inverse, rays):
    """Panel (x, y) mm where rays from the sample cross a panel's plane, as two
    arrays; NaN where a ray runs parallel to the plane or points away from it.

    ``d_inverse``: the nine elements (row by row) of D⁻¹, D = [fast | slow |
    origin], as scalars (one panel) or one array each (a panel per ray);
    ``rays``: (x, y, z) components or (..., 3) vectors.
    """
    m, (x, y, z) = d_inverse, components(rays)
    u, v, w = (m[3 * i] * x + m[3 * i + 1] * y + m[3 * i + 2] * z for i in range(3))
    with np.errstate(divide="ignore", invalid="ignore"):
        ahead = w > 0
        return np.where(ahead, u / w, np.nan), np.where(ahead, v / w, np.nan)


def panel_intersection(d_matrix, rays) -> np.ndarray:
    """:func:`ray_panel_xy` for one panel's ``d_matrix`` (3, 3), stacked (..., 2)."""
    d_inverse = tuple(np.linalg.inv(np.asarray(d_matrix, dtype=float)).ravel())
    return np.stack(ray_panel_xy(d_inverse, rays), axis=-1)
