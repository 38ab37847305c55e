"""Fitting primitives of the diagnosis: the best rotation or mirror (Kabsch),
axis and angle, an isotropic scale, a panel frame from spots (direct linear
fit), a reindexing operator, and a rotation refined on the spots themselves.
Lab frame, Å⁻¹ and mm.
"""

from __future__ import annotations

import math

import numpy as np

from dials_qconsistency.core import geometry

MIN_PANEL_ROWS = 8


LAB_AXES = {"X": np.array([1.0, 0, 0]), "Y": np.array([0, 1.0, 0]), "Z": np.array([0, 0, 1.0])}


def kabsch(p, q, proper=True) -> np.ndarray:
    """Orthogonal M minimising Σ|M·p - q|²: det +1 (proper) or -1 (improper)."""
    u, _, vt = np.linalg.svd(np.asarray(p).T @ np.asarray(q))
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    return vt.T @ np.diag([1.0, 1.0, d if proper else -d]) @ u.T


def axis_angle(rotation) -> tuple[np.ndarray, float]:
    """Unit axis and angle (degrees, 0..180) of a proper rotation matrix."""
    r = np.asarray(rotation)
    w = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    cos_angle = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    sin_angle = np.linalg.norm(w) / 2.0
    angle = math.degrees(math.atan2(sin_angle, cos_angle))
    if sin_angle > 1e-6:
        return w / np.linalg.norm(w), angle
    if cos_angle > 0:
        return np.array([0.0, 0.0, 1.0]), angle
    outer = (r + np.eye(3)) / 2.0  # = a·aᵀ for a half turn
    column = outer[:, int(np.argmax(np.diag(outer)))]
    return column / np.linalg.norm(column), 180.0


def scale_fit(p, q) -> float:
    """s minimising Σ|s·p - q|²."""
    return float(np.sum(p * q) / np.sum(p * p))


def vector_rms(vectors) -> float:
    return float(np.sqrt(np.mean(np.sum(np.asarray(vectors) ** 2, axis=-1))))


def lab_axis_name(axis, tolerance_deg=1.0) -> str | None:
    for name, lab in LAB_AXES.items():
        if math.degrees(math.acos(min(1.0, abs(float(axis @ lab))))) < tolerance_deg:
            return name
    return None


def same_rotation(a, b, tolerance_deg=0.05) -> bool:
    return axis_angle(a @ b.T)[1] < tolerance_deg


def reindexing_operator(A, rotation_in_A_frame) -> np.ndarray | None:
    """Integer K with A·K = M·A (M a rotation or mirror in the frame of A): h_true = K·h_table."""
    k = np.linalg.inv(A) @ rotation_in_A_frame @ A
    rounded = np.round(k)
    if np.abs(k - rounded).max() < 0.02 and abs(abs(np.linalg.det(rounded)) - 1) < 1e-6 and not np.allclose(rounded, np.eye(3)):
        return rounded.astype(int)
    return None


def hkl_expression(k) -> str:
    """'k,h,-l'-style text for h' = K·h (h, k, l of the table)."""
    letters = "hkl"
    terms = []
    for row in np.asarray(k, dtype=int):
        text = ""
        for coefficient, letter in zip(row, letters):
            if coefficient == 0:
                continue
            sign = "-" if coefficient < 0 else ("+" if text else "")
            magnitude = "" if abs(coefficient) == 1 else str(abs(coefficient))
            text += f"{sign}{magnitude}{letter}"
        terms.append(text or "0")
    return ",".join(terms)


def fit_panel(xy_mm, rays) -> np.ndarray | None:
    """The panel frame D = [fast | slow | origin] with D·(x, y, 1) ∥ ray (direct linear fit).

    Points are normalised first (Hartley); |fast| and |slow| average to 1 so
    that D is in mm. Returns None for too few or degenerate points.
    """
    xy = np.asarray(xy_mm, dtype=float)
    if len(xy) < MIN_PANEL_ROWS:
        return None
    centre = xy.mean(axis=0)
    spread = np.sqrt(np.mean(np.sum((xy - centre) ** 2, axis=1))) or 1.0
    t = np.array([[1 / spread, 0, -centre[0] / spread], [0, 1 / spread, -centre[1] / spread], [0, 0, 1.0]])
    u = np.column_stack([xy, np.ones(len(xy))]) @ t.T
    r = geometry.unit(rays)
    zero = np.zeros_like(u)
    rows = np.concatenate(
        [
            np.hstack([zero, r[:, 2:3] * u, -r[:, 1:2] * u]),
            np.hstack([-r[:, 2:3] * u, zero, r[:, 0:1] * u]),
            np.hstack([r[:, 1:2] * u, -r[:, 0:1] * u, zero]),
        ]
    )
    _, singular, vt = np.linalg.svd(rows, full_matrices=False)
    if singular[-2] < 1e-9 * singular[0]:
        return None
    d = vt[-1].reshape(3, 3) @ t
    d /= 0.5 * (np.linalg.norm(d[:, 0]) + np.linalg.norm(d[:, 1]))
    if np.mean(geometry.rowdot(geometry.matvec(d, np.column_stack([xy, np.ones(len(xy))])), r)) < 0:
        d = -d
    return d


#: Relative singular value below which a turn does not move the spots (see refine_map).
SPOT_BLIND = 1e-6


def refine_map(matrix, spot_residuals, iterations=8):
    """Gauss-Newton on a small rotation ω: M = M0·R(ω) minimising |spot_residuals(M)|².

    Kabsch fits lattice points; spots constrain a rotation differently (a turn
    in the scattering plane moves Δψ, not the spot), so the map is refined on
    the spots themselves.

    A turn the spots cannot see (about the rotation axis, where Δφ takes it up)
    is left as Kabsch has it: such directions of the Jacobian (singular values
    below ``SPOT_BLIND`` of the largest) take no step. A step is kept only
    if it lowers the residual, so the map ends no worse than it starts.
    """
    m = np.asarray(matrix, dtype=float)
    step = 1e-7
    f0 = spot_residuals(m)
    cost = float(f0 @ f0)
    for _ in range(iterations):
        jacobian = np.column_stack(
            [(spot_residuals(m @ geometry.rotation_matrix(axis, step)) - f0) / step for axis in np.eye(3)]
        )
        omega = np.linalg.lstsq(jacobian, -f0, rcond=SPOT_BLIND)[0]
        angle = float(np.linalg.norm(omega))
        if angle < 1e-13:
            break
        trial = m @ geometry.rotation_matrix(omega / angle, angle)
        f1 = spot_residuals(trial)
        if not float(f1 @ f1) < cost:
            break
        m, f0, cost = trial, f1, float(f1 @ f1)
    return m



def fit_rotation_axis(q_start, q_pixel, axes, phi, iterations=8, search_rows=20000) -> dict:
    """The rotation axis about which the scan carries the lattice points at
    φ = 0 (``q_start``, N×3, Å⁻¹, lab) by each row's ``phi`` (rad) onto
    ``q_pixel``: a turn T of the model's lab axes (``axes``, N×3 or one vector
    broadcast) fitted in q by Gauss-Newton on the two small turns
    perpendicular to the axis (a turn about the axis itself changes nothing),
    from the model's axis and its reverse (it reaches axes 90° away from
    either), on an even sample of
    ``search_rows`` (two parameters: plenty). Returns the turn, the mean axis
    before and after, the angle between them (degrees) and the RMS |Δq| it
    leaves over every row."""
    q_start, q_pixel = np.asarray(q_start, dtype=float), np.asarray(q_pixel, dtype=float)
    axes = np.broadcast_to(geometry.unit(np.asarray(axes, dtype=float)), q_start.shape)
    cos, sin = np.cos(phi), np.sin(phi)

    def solve(rows, turn, steps):
        q0, qp, model = q_start[rows], q_pixel[rows], axes[rows]
        c, s, v = cos[rows], sin[rows], 1.0 - cos[rows]

        def residual(turn):
            a = model @ turn.T
            along = geometry.rowdot(a, q0)
            return (q0 * c[:, None] + np.cross(a, q0) * s[:, None] + a * (along * v)[:, None] - qp), a, along

        r, a, along = residual(turn)
        cost = float(np.sum(r * r))
        for _ in range(steps):
            mean = geometry.unit(a.mean(axis=0))
            u1 = geometry.unit(np.cross(mean, [1.0, 0, 0] if abs(mean[0]) < 0.9 else [0, 1.0, 0]))
            basis = (u1, np.cross(mean, u1))
            jacobian = []
            for u in basis:
                d = np.cross(u, a)  # how each axis moves for a small turn about u
                jacobian.append(np.cross(d, q0) * s[:, None]
                                + (d * along[:, None] + a * geometry.rowdot(d, q0)[:, None]) * v[:, None])
            normal = np.array([[np.sum(j * k) for k in jacobian] for j in jacobian])
            if not np.all(np.isfinite(normal)) or abs(np.linalg.det(normal)) < 1e-300:
                break
            omega = np.linalg.solve(normal, [-np.sum(j * r) for j in jacobian])
            angle = float(np.hypot(*omega))
            if angle < 1e-13:
                break
            trial = geometry.rotation_matrix((omega[0] * basis[0] + omega[1] * basis[1]) / angle, angle) @ turn
            r1, a1, along1 = residual(trial)
            if not float(np.sum(r1 * r1)) < cost:
                break
            turn, r, a, along, cost = trial, r1, a1, along1, float(np.sum(r1 * r1))
        return turn, cost

    mean = geometry.unit(axes.mean(axis=0))
    starts = [np.eye(3), geometry.rotation_matrix(geometry.unit(np.cross(mean, [1.0, 0, 0] if abs(mean[0]) < 0.9
                                                                            else [0, 1.0, 0])), math.pi)]
    sample = np.unique(np.linspace(0, len(q_start) - 1, min(len(q_start), search_rows)).astype(np.int64))
    best = min((solve(sample, start, 4) for start in starts), key=lambda found: found[1])[0]
    turn = solve(sample, best, iterations)[0]  # two parameters: the sample fixes them
    cost = solve(slice(None), turn, 0)[1]
    fitted = geometry.unit((axes @ turn.T).mean(axis=0))
    return {"turn": turn.tolist(), "model_axis": mean.tolist(), "fitted_axis": fitted.tolist(),
            "angle_deg": math.degrees(math.acos(float(np.clip(mean @ fitted, -1.0, 1.0)))),
            "rms_delta_q_after": math.sqrt(cost / max(len(q_start), 1))}


def time_of_flight_fit(wavelength, path_mm, delta_t) -> dict:
    """Two explanations of the time-of-flight residual Δt (µs) by least squares,
    each with a time offset: a flight-path error δ (every neutron flies δ more:
    Δt = δ·λ·m_n/h, whatever its path) and a wavelength scale s (every time
    scaled: Δt = (s − 1)·λ·L·m_n/h with L its own path). λ in Å, L in mm.
    The paths differ by the detector distances only, so the two are told apart
    where the times are exact (calculated positions), hardly by observations."""
    from dials_qconsistency.core.time_of_flight import US_PER_ANGSTROM_MM

    wavelength, path, delta_t = (np.asarray(v, dtype=float) for v in (wavelength, path_mm, delta_t))
    out = {"rms_before": float(np.sqrt(np.mean(delta_t ** 2)))}
    for name, regressor in (("flight_path", wavelength), ("wavelength_scale", wavelength * path)):
        design = np.column_stack([regressor * US_PER_ANGSTROM_MM, np.ones_like(regressor)])
        (coefficient, offset), *_ = np.linalg.lstsq(design, delta_t, rcond=None)
        out[name] = {"coefficient": float(coefficient), "offset_us": float(offset),
                     "rms_after": float(np.sqrt(np.mean((delta_t - design @ (coefficient, offset)) ** 2)))}
    out["flight_path"]["flight_path_mm"] = out["flight_path"]["coefficient"]
    out["wavelength_scale"]["scale"] = 1.0 + out["wavelength_scale"]["coefficient"]
    return out
