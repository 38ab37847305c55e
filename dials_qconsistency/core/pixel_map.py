"""Per-pixel maps of q for dials.q_map (pure numpy, a panel at a time in row blocks).

Every pixel centre (x + 0.5, y + 0.5) px goes through the panel's own px -> mm
mapping (parallax included), to the lab frame, and to q = k_out − k_in in Å⁻¹
without 2π, with the same functions that give dials.q_consistency its q_pixel.
From q: |q|, the d-spacing 1/|q| (Å), 2θ and the azimuth (degrees) and, with a
crystal, fractional Miller indices h = M⁻¹·q for the model at one image.

The azimuth is measured about the beam, from the lab x axis projected onto the
plane normal to the beam, towards ``unit(−s0) × x`` (lab y for a beam along
−z): the usual angle about the direct beam seen from the sample.
"""

from __future__ import annotations

import collections
import concurrent.futures
from dataclasses import dataclass

import numpy as np

from dials_qconsistency.core import geometry
from dials_qconsistency.core.blocks import row_blocks
from dials_qconsistency.core.time_of_flight import wavelength_from_tof

#: name -> (units, values per pixel, description); the order of the output datasets.
QUANTITIES = {
    "q": ("1/Angstrom", 3, "k_out - k_in in the DIALS laboratory frame (imgCIF), no 2pi"),
    "q_norm": ("1/Angstrom", 1, "|q| = 2 sin(theta) / lambda"),
    "d_spacing": ("Angstrom", 1, "1 / |q|"),
    "two_theta": ("degree", 1, "scattering angle 2 theta"),
    "azimuth": ("degree", 1, "angle about the beam from lab x (projected), right-handed about -s0"),
    "miller_index": ("1 (fractional)", 3, "h = M^-1 q for the crystal model at the chosen image"),
}


@dataclass
class MapSetting:
    """The beam and (optionally) crystal setting a map is computed for.

    ``s0`` (Å⁻¹) in the lab frame; ``setting`` M with r_lab = M·h, or None.
    """

    s0: np.ndarray
    setting: np.ndarray | None = None
    #: A time-of-flight bin (µs) instead of one wavelength: each pixel's wavelength
    #: is that of this time over its path, ``source_mm`` (L0) + the pixel's distance.
    time_of_flight_us: float | None = None
    source_mm: float | None = None
    #: False for a polychromatic beam given no wavelength: ``s0`` is then only its
    #: direction, good for 2θ and the azimuth alone.
    wavelength_known: bool = True

    @property
    def wavenumber(self) -> float:
        return float(np.linalg.norm(self.s0))

    def wavenumbers(self, lab):
        """|s0| (Å⁻¹) at lab positions (components, mm): one value, or one per
        pixel for a time-of-flight bin."""
        if self.time_of_flight_us is None:
            return self.wavenumber
        distance = np.sqrt(lab[0] * lab[0] + lab[1] * lab[1] + lab[2] * lab[2])
        return 1.0 / wavelength_from_tof(self.time_of_flight_us, self.source_mm + distance)

    def azimuth_basis(self):
        """Unit vectors (e_x, e_y) spanning the plane normal to the beam."""
        towards_source = geometry.unit(-np.asarray(self.s0, dtype=float))
        reference = np.array([1.0, 0.0, 0.0])
        if abs(towards_source @ reference) > 0.9:  # a beam along x: measure from y
            reference = np.array([0.0, 1.0, 0.0])
        e_x = geometry.unit(reference - (reference @ towards_source) * towards_source)
        return e_x, np.cross(towards_source, e_x)


def pixel_centres(size: int, subsample: int = 1) -> np.ndarray:
    """Pixel-centre coordinates (px) along one panel axis, every ``subsample``-th pixel."""
    return np.arange(0, int(size), int(subsample), dtype=float) + 0.5


def pixel_q(panel, s0, x_px, y_px):
    """q components (qx, qy, qz), Å⁻¹, at panel pixel coordinates (sub-pixel allowed).

    ``x_px`` and ``y_px`` broadcast: points (N,) and (N,), or a grid as a row
    (1, nx) and a column (ny, 1).
    """
    return geometry.q_from_lab_components(*pixel_lab(panel, x_px, y_px), s0)


def pixel_lab(panel, x_px, y_px):
    """Lab position components (mm) at panel pixel coordinates, through the
    panel's own px -> mm mapping (parallax included)."""
    if panel.pixel_to_millimetre is not None:  # the native backend: dxtbx's own mapping of (N, 2) points
        x, y = np.broadcast_arrays(np.asarray(x_px, dtype=float), np.asarray(y_px, dtype=float))
        xy_mm = panel.pixel_to_millimetre(np.stack([x.ravel(), y.ravel()], axis=1))
        x_mm, y_mm = xy_mm[:, 0].reshape(x.shape), xy_mm[:, 1].reshape(x.shape)
    else:
        x_mm, y_mm = geometry.pixel_to_millimetre_xy(
            x_px, y_px, panel.pixel_size, panel.origin, panel.fast, panel.slow, panel.mu, panel.thickness, panel.parallax
        )
    return geometry.panel_points_to_lab(panel.origin, panel.fast, panel.slow, x_mm, y_mm)


def block_quantities(panel, setting: MapSetting, x_px, y_px, names, dtype=np.float32) -> dict:
    """The requested quantities for a grid (rows ``y_px`` × columns ``x_px``), each (ny, nx[, 3])."""
    x = np.asarray(x_px, dtype=float)[None, :]
    y = np.asarray(y_px, dtype=float)[:, None]
    return quantities_at(panel, setting, x, y, names, dtype)


def quantities_at(panel, setting: MapSetting, x_px, y_px, names, dtype=np.float64) -> dict:
    """The requested quantities at pixel coordinates that broadcast (points or a grid)."""
    shape = np.broadcast_shapes(np.shape(x_px), np.shape(y_px))
    lab = pixel_lab(panel, x_px, y_px)
    wavenumber = setting.wavenumbers(lab)
    s0 = setting.s0 if setting.time_of_flight_us is None else tuple(
        c * wavenumber for c in geometry.unit(np.asarray(setting.s0, dtype=float)))
    qx, qy, qz = (np.broadcast_to(c, shape) for c in geometry.q_from_lab_components(*lab, s0))
    out = {}
    if "q" in names:
        out["q"] = _stack(dtype, qx, qy, qz)
    norm = np.sqrt(qx * qx + qy * qy + qz * qz)
    if "q_norm" in names:
        out["q_norm"] = norm.astype(dtype, copy=False)
    if "d_spacing" in names:
        with np.errstate(divide="ignore"):
            out["d_spacing"] = (1.0 / norm).astype(dtype, copy=False)
    if "two_theta" in names:
        sin_theta = np.minimum(norm / (2.0 * wavenumber), 1.0)
        out["two_theta"] = np.degrees(2.0 * np.arcsin(sin_theta)).astype(dtype, copy=False)
    if "azimuth" in names:
        e_x, e_y = setting.azimuth_basis()
        along_x = qx * e_x[0] + qy * e_x[1] + qz * e_x[2]
        along_y = qx * e_y[0] + qy * e_y[1] + qz * e_y[2]
        out["azimuth"] = np.degrees(np.arctan2(along_y, along_x)).astype(dtype, copy=False)
    if "miller_index" in names:
        inverse = np.linalg.inv(setting.setting)
        out["miller_index"] = _stack(
            dtype, *(inverse[i, 0] * qx + inverse[i, 1] * qy + inverse[i, 2] * qz for i in range(3))
        )
    return out


def _stack(dtype, *parts) -> np.ndarray:
    out = np.empty(parts[0].shape + (len(parts),), dtype=dtype)
    for i, part in enumerate(parts):
        out[..., i] = part
    return out


#: Pixels in a block by default: about 1 MB per float64 temporary, some twenty of
#: them per block in flight, so a worker needs tens of MB whatever the panel.
BLOCK_PIXELS = 1 << 17


def default_rows_per_block(n_columns: int) -> int:
    return max(1, BLOCK_PIXELS // max(1, int(n_columns)))


def panel_blocks(panel, setting, names, subsample=1, rows_per_block=None, dtype=np.float32, workers=1):
    """Yield ``(start, stop, quantities)`` for the sampled rows of one panel, in order.

    ``rows_per_block`` None: about :data:`BLOCK_PIXELS` pixels a block.
    Blocks are computed by ``workers`` threads (numpy releases the GIL) with at
    most two blocks per worker in flight, so memory stays near a few blocks.
    """
    x = pixel_centres(panel.image_size[0], subsample)
    y = pixel_centres(panel.image_size[1], subsample)
    blocks = row_blocks(y.size, rows_per_block or default_rows_per_block(x.size))

    def compute(block):
        return block.start, block.stop, block_quantities(panel, setting, x, y[block], names, dtype)

    if workers <= 1:
        for block in blocks:
            yield compute(block)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        for block in blocks:
            pending.append(pool.submit(compute, block))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
