"""A deterministic simulator of DIALS-processed data from known models.

It writes an ``.expt`` in the dxtbx JSON layout (panel frames local to a
two-level detector hierarchy, a multi-axis goniometer, a scan with a
``properties`` table) and a ``.refl`` whose predictions are solved directly:
for rotation data the Ewald condition a·cosφ + b·sinφ = c in the goniometer
frame, for stills the Δψ rotation of each lattice point onto the sphere; the
rays are then intersected with the panel planes. The bundled example and the
analytic tests use it.

    python -m simulation.simulate OUTPUT_FOLDER
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

from dials_qconsistency.io.expt import experiments_from_dict
from dials_qconsistency.core.geometry import (
    ewald_rotation_angles,
    matvec,
    millimetre_to_pixel,
    panel_intersection,
    rotate_about_axes,
    rotation_matrix,
    stills_rotation,
)
from dials_qconsistency.io.staged import write_atomically
from dials_qconsistency.io.refl import ReflectionTable

SILICON_MU = 3.9596  # mm⁻¹, an illustrative value for the simulated sensor
FLAGS_PREDICTED_OBSERVED_INDEXED = 1 | 2 | 4


def _rot(axis, degrees):
    return rotation_matrix(axis, math.radians(degrees))


def panel_dict(name, fast, slow, origin, image_size=(400, 300), pixel=0.172, parallax=True):
    return {
        "name": name,
        "type": "SENSOR_PAD",
        "fast_axis": list(map(float, fast)),
        "slow_axis": list(map(float, slow)),
        "origin": list(map(float, origin)),
        "raw_image_offset": [0, 0],
        "image_size": list(image_size),
        "pixel_size": [pixel, pixel],
        "trusted_range": [-1.0, 65535.0],
        "thickness": 0.45 if parallax else 0.0,
        "material": "Si" if parallax else "",
        "mu": SILICON_MU if parallax else 0.0,
        "identifier": "",
        "mask": [],
        "gain": 1.0,
        "pedestal": 0.0,
        "px_mm_strategy": {"type": "ParallaxCorrectedPxMmStrategy" if parallax else "SimplePxMmStrategy"},
    }


def tiled_detector(distance=160.0, parallax=True):
    """Four 400x300 panels in two tilted groups under a root at ``distance`` mm.

    Local frames: the root is centred on the beam; group 0 (upper) is rotated
    2° in plane, group 1 (lower) tilted 3° about its fast axis; each panel is
    rotated 1° in its group's plane. Returns the detector dict.
    """
    width, height = 400 * 0.172, 300 * 0.172
    group_frames = [
        (_rot((0, 0, 1), 2.0) @ [1, 0, 0], _rot((0, 0, 1), 2.0) @ [0, 1, 0], [-width - 1.0, -height - 2.0, 0.0]),
        (np.array([1.0, 0, 0]), _rot((1, 0, 0), 3.0) @ [0, 1, 0], [-width - 1.0, 2.0, 1.5]),
    ]
    panels, groups = [], []
    for g, (g_fast, g_slow, g_origin) in enumerate(group_frames):
        children = []
        for p in range(2):
            turn = _rot((0, 0, 1), 1.0 if p == 0 else -1.0)
            panels.append(
                panel_dict(
                    f"g{g}p{p}", turn @ [1, 0, 0], turn @ [0, 1, 0], [p * (width + 2.0), 0.0, 0.2 * p],
                    parallax=parallax,
                )
            )
            children.append({"panel": len(panels) - 1})
        group = {k: v for k, v in panel_dict(f"group{g}", g_fast, g_slow, g_origin, (0, 0), 0.0, False).items()}
        group["children"] = children
        groups.append(group)
    root = panel_dict("root", [1, 0, 0], [0, -1, 0], [0.0, 0.0, -distance], (0, 0), 0.0, False)
    root["children"] = groups
    return {"panels": panels, "hierarchy": root}


def crystal_dict(cell=(40.0, 50.0, 60.0), orientation=np.eye(3), hall=" P 2 2"):
    a, b, c = cell
    real = np.diag([a, b, c]) @ np.asarray(orientation).T  # rows: U·a, U·b, U·c
    return {
        "__id__": "crystal",
        "real_space_a": list(real[0]),
        "real_space_b": list(real[1]),
        "real_space_c": list(real[2]),
        "space_group_hall_symbol": hall,
    }


def beam_dict(wavelength=1.0, direction=(0.0, 0.0, 1.0)):
    return {
        "__id__": "monochromatic",
        "direction": list(map(float, direction)),
        "wavelength": float(wavelength),
        "divergence": 0.0,
        "sigma_divergence": 0.0,
        "polarization_normal": [0.0, 1.0, 0.0],
        "polarization_fraction": 0.999,
        "flux": 0.0,
        "transmission": 1.0,
        "probe": "x-ray",
        "sample_to_source_distance": 0.0,
    }


def multi_axis_goniometer_dict(angles=(10.0, 0.0, -25.0), scan_axis=1):
    """Three axes, crystal to base; the scan axis in the middle gives F and S ≠ I."""
    return {
        "axes": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [math.cos(0.5), 0.0, math.sin(0.5)]],
        "angles": list(angles),
        "names": ["PHI", "OMEGA", "CHI"],
        "scan_axis": scan_axis,
    }


def scan_dict(first=1, n_images=20, start=0.0, width=0.5):
    return {
        "image_range": [first, first + n_images - 1],
        "batch_offset": 0,
        "properties": {
            "oscillation": [start + width * i for i in range(n_images)],
            "exposure_time": [0.1] * n_images,
            "epochs": [float(i) for i in range(n_images)],
        },
        "valid_image_ranges": {},
    }


def experiment_list_dict(beam, detector, crystals, identifiers, goniometer=None, scan=None):
    experiments = []
    for i, identifier in enumerate(identifiers):
        entry = {"__id__": "Experiment", "identifier": identifier, "beam": 0, "detector": 0, "crystal": i}
        if goniometer is not None:
            entry.update({"goniometer": 0, "scan": 0})
        experiments.append(entry)
    return {
        "__id__": "ExperimentList",
        "experiment": experiments,
        "imageset": [],
        "beam": [beam],
        "detector": [detector],
        "goniometer": [goniometer] if goniometer is not None else [],
        "scan": [scan] if scan is not None else [],
        "crystal": crystals,
        "profile": [],
        "scaling_model": [],
    }


def miller_indices(A, d_min):
    """All non-zero h with d > d_min (reciprocal length < 1/d_min)."""
    limits = np.ceil(np.linalg.norm(np.linalg.inv(A), axis=1) / d_min).astype(int)
    grids = np.meshgrid(*[np.arange(-m, m + 1) for m in limits], indexing="ij")
    hkl = np.stack([g.ravel() for g in grids], axis=1)
    hkl = hkl[np.any(hkl != 0, axis=1)]
    return hkl[np.linalg.norm(hkl @ A.T, axis=1) < 1.0 / d_min]


def intersect_panels(s1, panels):
    """First panel hit by each ray, and the mm position on it (-1 / NaN if none)."""
    panel = np.full(len(s1), -1, dtype=np.int64)
    xy = np.full((len(s1), 2), np.nan)
    for index, p in enumerate(panels):
        here = panel_intersection(p.d_matrix, s1)
        size = p.image_size * p.pixel_size
        with np.errstate(invalid="ignore"):
            hit = (panel < 0) & np.all((here > 1.0) & (here < size - 1.0), axis=1)
        panel[hit] = index
        xy[hit] = here[hit]
    return panel, xy


def _pixels(panels, panel, xy):
    px = np.zeros_like(xy)
    for index, p in enumerate(panels):
        rows = panel == index
        if rows.any():
            px[rows] = millimetre_to_pixel(
                xy[rows], p.pixel_size, p.origin, p.fast, p.slow, p.mu, p.thickness, p.parallax
            )
    return px


def _table(identifiers, ids, hkl, panel, s1, xyzcal_mm, xyzcal_px, xyzobs_mm, xyzobs_px, extra=None):
    n = len(ids)
    table = ReflectionTable(n, dict(enumerate(identifiers)), version=2)
    table.set_column("id", "int", ids)
    table.set_column("miller_index", "cctbx::miller::index<>", hkl)
    table.set_column("panel", "std::size_t", panel)
    table.set_column("s1", "vec3<double>", s1)
    table.set_column("xyzcal.mm", "vec3<double>", xyzcal_mm)
    table.set_column("xyzcal.px", "vec3<double>", xyzcal_px)
    table.set_column("xyzobs.mm.value", "vec3<double>", xyzobs_mm)
    table.set_column("xyzobs.mm.variance", "vec3<double>", np.full((n, 3), 1e-4))
    table.set_column("xyzobs.px.value", "vec3<double>", xyzobs_px)
    table.set_column("flags", "std::size_t", np.where(ids >= 0, FLAGS_PREDICTED_OBSERVED_INDEXED, 2))
    table.set_column("entering", "bool", np.zeros(n, dtype=bool))
    for name, (type_name, values) in (extra or {}).items():
        table.set_column(name, type_name, values)
    return table


def _with_unindexed(rng, columns, n_extra, z_of_mm):
    """Append spots with id = -1 and h = 0 (found but not indexed)."""
    panel = rng.integers(0, 4, n_extra)
    xy = np.column_stack([rng.uniform(5, 60, n_extra), rng.uniform(5, 45, n_extra)])
    z = rng.uniform(0.0, 1.0, n_extra)
    zeros = np.zeros((n_extra, 3))
    xyz_mm = np.column_stack([xy, z_of_mm(z)])
    xyz_px = np.column_stack([xy / 0.172, z])
    extra = {
        "ids": -np.ones(n_extra, dtype=np.int64),
        "hkl": np.zeros((n_extra, 3), dtype=np.int64),
        "panel": panel,
        "s1": zeros,
        "xyzcal_mm": zeros,
        "xyzcal_px": zeros,
        "xyzobs_mm": xyz_mm,
        "xyzobs_px": xyz_px,
    }
    return {k: np.concatenate([columns[k], extra[k]]) for k in columns}


def simulate_rotation(seed=1, d_min=2.5, noise_mm=0.03, noise_phi=2e-4, goniometer=None, detector=None, scan=None):
    """(expt dict, ReflectionTable) for one rotation sweep with a static model."""
    rng = np.random.default_rng(seed)
    identifiers = ["example-rotation"]
    orientation = _rot((1, 2, 3), 37.0)
    document = experiment_list_dict(
        beam_dict(0.9795, (0.002, 0.0, 1.0)),
        detector or tiled_detector(),
        [crystal_dict((40.0, 50.0, 60.0), orientation)],
        identifiers,
        goniometer or multi_axis_goniometer_dict(),
        scan or scan_dict(),
    )
    experiment = experiments_from_dict(document)[0]
    gonio, scan_model, beam = experiment.goniometer, experiment.scan, experiment.beam
    A = experiment.crystal.A

    hkl = miller_indices(A, d_min)
    r0 = hkl @ (gonio.fixed_rotation @ A).T
    phis = ewald_rotation_angles(r0, gonio.axis, gonio.setting_rotation.T @ beam.s0)
    start, stop = scan_model.oscillation_range
    rows, phi = [], []
    for column in range(2):
        candidate = phis[:, column]
        candidate = start + np.mod(candidate - start, 2 * math.pi)
        inside = np.isfinite(candidate) & (candidate >= start) & (candidate < stop)
        rows.append(np.flatnonzero(inside))
        phi.append(candidate[inside])
    rows, phi = np.concatenate(rows), np.concatenate(phi)
    hkl, r0 = hkl[rows], r0[rows]
    r_lab = matvec(gonio.setting_rotation, matvec(rotation_matrix(gonio.axis, phi), r0))
    s1 = beam.s0 + r_lab
    panels = experiment.detector.panels
    panel, xy = intersect_panels(s1, panels)
    keep = panel >= 0
    hkl, s1, phi, panel, xy = hkl[keep], s1[keep], phi[keep], panel[keep], xy[keep]
    order = np.lexsort((hkl[:, 2], hkl[:, 1], hkl[:, 0], np.round(phi, 9)))
    hkl, s1, phi, panel, xy = hkl[order], s1[order], phi[order], panel[order], xy[order]

    z = scan_model.array_index_from_angle(phi)
    px = _pixels(panels, panel, xy)
    xy_obs = xy + rng.normal(0.0, noise_mm, xy.shape)
    phi_obs = phi + rng.normal(0.0, noise_phi, phi.shape)
    columns = {
        "ids": np.zeros(len(hkl), dtype=np.int64),
        "hkl": hkl,
        "panel": panel,
        "s1": s1,
        "xyzcal_mm": np.column_stack([xy, phi]),
        "xyzcal_px": np.column_stack([px, z]),
        "xyzobs_mm": np.column_stack([xy_obs, phi_obs]),
        "xyzobs_px": np.column_stack([_pixels(panels, panel, xy_obs), scan_model.array_index_from_angle(phi_obs)]),
    }
    columns = _with_unindexed(rng, columns, 5, lambda frac: start + frac * (stop - start))
    table = _table(identifiers, **columns)
    return document, table


def simulate_stills(seed=2, n_crystals=3, d_min=2.0, tolerance=0.003, noise_mm=0.03, detector=None):
    """(expt dict, ReflectionTable) for serial stills predicted like DIALS (Δψ)."""
    rng = np.random.default_rng(seed)
    identifiers = [f"example-still-{i}" for i in range(n_crystals)]
    crystals = []
    for _ in range(n_crystals):
        axis = rng.normal(size=3)
        crystals.append(crystal_dict((50.0, 50.0, 70.0), _rot(axis, rng.uniform(0, 360)), " P 4"))
    document = experiment_list_dict(beam_dict(1.3), detector or tiled_detector(120.0), crystals, identifiers)
    experiments = experiments_from_dict(document)
    beam, panels = experiments[0].beam, experiments[0].detector.panels
    s0, k = beam.s0, np.linalg.norm(beam.s0)
    parts = []
    for index, experiment in enumerate(experiments):
        A = experiment.crystal.A
        hkl = miller_indices(A, d_min)
        r = hkl @ A.T
        excitation = np.linalg.norm(s0 + r, axis=1) - k
        near = np.abs(excitation) < tolerance
        hkl, r = hkl[near], r[near]
        # rotate each r in the (s0, r) plane onto the sphere: the DIALS stills prediction
        delpsi_all, psi_axis = stills_rotation(r, s0)
        r_on_sphere = rotate_about_axes(r, psi_axis, delpsi_all)
        s1 = s0 + r_on_sphere
        panel, xy = intersect_panels(s1, panels)
        keep = panel >= 0
        n = int(keep.sum())
        delpsi = delpsi_all[keep]
        parts.append(
            {
                "ids": np.full(n, index, dtype=np.int64),
                "hkl": hkl[keep],
                "panel": panel[keep],
                "s1": s1[keep],
                "xyzcal_mm": np.column_stack([xy[keep], np.zeros(n)]),
                "xyzcal_px": np.column_stack([_pixels(panels, panel[keep], xy[keep]), np.zeros(n)]),
                "delpsi": delpsi,
            }
        )
    columns = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    xy_obs = columns["xyzcal_mm"][:, :2] + rng.normal(0.0, noise_mm, (len(columns["ids"]), 2))
    columns["xyzobs_mm"] = np.column_stack([xy_obs, np.zeros(len(xy_obs))])
    columns["xyzobs_px"] = np.column_stack([_pixels(panels, columns["panel"], xy_obs), np.zeros(len(xy_obs))])
    delpsi = columns.pop("delpsi")
    columns = _with_unindexed(rng, columns, 4, lambda frac: 0.0 * frac)
    delpsi = np.concatenate([delpsi, np.zeros(4)])
    table = _table(identifiers, **columns, extra={"delpsical.rad": ("double", delpsi)})
    return document, table


def polychromatic_beam_dict(direction=(0.0, 0.0, 1.0), sample_to_source_mm=8300.0, wavelength_range=(0.5, 4.0)):
    """A polychromatic (neutron time-of-flight) beam, as DIALS writes it."""
    return {"__id__": "polychromatic", "direction": list(map(float, direction)), "divergence": 0.0,
            "sigma_divergence": 0.0, "polarization_normal": [0.0, 1.0, 0.0], "polarization_fraction": 0.5,
            "flux": 0.0, "transmission": 1.0, "probe": "neutron",
            "sample_to_source_distance": float(sample_to_source_mm), "wavelength_range": list(map(float, wavelength_range))}


def tof_scan_dict(n_images=1000, first_us=1000.0, last_us=20000.0):
    """A time-of-flight scan: one time (µs) per image, no oscillation."""
    return {"image_range": [1, n_images], "batch_offset": 0,
            "properties": {"time_of_flight": list(np.linspace(first_us, last_us, n_images))},
            "valid_image_ranges": {}}


def simulate_time_of_flight(seed=3, d_min=0.7, noise_mm=0.0, noise_us=0.0, sample_to_source_mm=8300.0,
                            time_scale=1.0, detector=None):
    """(expt dict, ReflectionTable) for one neutron time-of-flight Laue still
    predicted like DIALS' Laue predictor: q = S·F·A·h, λ = −2(û0·q)/|q|²,
    s0 = û0/λ, s1 = s0 + q; the time of flight t = λ·(L0 + L1)·m_n/h in
    xyzcal.mm z (µs), times ``time_scale`` (a time calibration: 1 is exact)."""
    from dials_qconsistency.core.time_of_flight import tof_us

    rng = np.random.default_rng(seed)
    crystal = crystal_dict((12, 12, 12), _rot(rng.normal(size=3), rng.uniform(0, 360)), " P 1")
    beam = polychromatic_beam_dict(sample_to_source_mm=sample_to_source_mm)
    scan = tof_scan_dict()
    goniometer = {"rotation_axis": [0.0, 1.0, 0.0], "fixed_rotation": list(np.eye(3).ravel()),
                  "setting_rotation": list(np.eye(3).ravel())}
    document = experiment_list_dict(beam, detector or tiled_detector(60.0), [crystal], ["example-tof"],
                                    goniometer=goniometer, scan=scan)
    experiment = experiments_from_dict(document)[0]
    panels, unit_s0 = experiment.detector.panels, experiment.beam.unit_s0
    A = experiment.crystal.A
    hkl = miller_indices(A, d_min)
    q = hkl @ A.T
    wavelength = -2.0 * (q @ unit_s0) / np.sum(q * q, axis=1)
    low, high = beam["wavelength_range"]
    inside = (wavelength >= low) & (wavelength <= high)
    hkl, q, wavelength = hkl[inside], q[inside], wavelength[inside]
    s0 = unit_s0[None, :] / wavelength[:, None]
    s1 = s0 + q
    panel, xy = intersect_panels(s1, panels)
    keep = panel >= 0
    hkl, q, wavelength, s0, s1, panel, xy = (v[keep] for v in (hkl, q, wavelength, s0, s1, panel, xy))
    n = len(hkl)
    lab = np.array([panels[p].origin + x * panels[p].fast + y * panels[p].slow for p, (x, y) in zip(panel, xy)])
    time = tof_us(wavelength, sample_to_source_mm + np.linalg.norm(lab, axis=1)) * time_scale
    times = np.asarray(scan["properties"]["time_of_flight"])
    frame = np.interp(time, times, np.arange(times.size, dtype=float))
    xyzcal_mm = np.column_stack([xy, time])
    xy_obs = xy + rng.normal(0.0, noise_mm, (n, 2))
    time_obs = time + rng.normal(0.0, noise_us, n)
    columns = {
        "ids": np.zeros(n, dtype=np.int64), "hkl": hkl, "panel": panel, "s1": s1,
        "xyzcal_mm": xyzcal_mm, "xyzcal_px": np.column_stack([_pixels(panels, panel, xy), frame]),
        "xyzobs_mm": np.column_stack([xy_obs, time_obs]),
        "xyzobs_px": np.column_stack([_pixels(panels, panel, xy_obs), np.interp(time_obs, times, np.arange(times.size))]),
    }
    columns = _with_unindexed(rng, columns, 4, lambda frac: 1000.0 + 19000.0 * frac)
    pad = lambda values, width=None: np.concatenate([values, np.zeros((4,) + values.shape[1:])])  # noqa: E731
    table = _table(["example-tof"], **columns, extra={"wavelength_cal": ("double", pad(wavelength)),
                                                      "s0_cal": ("vec3<double>", pad(s0))})
    table.set_column("xyzobs.mm.variance", "vec3<double>", np.tile([1e-4, 1e-4, 1.0], (n + 4, 1)))
    return document, table


def write_example(folder: str) -> list[str]:
    """Write rotation.expt/.refl and stills.expt/.refl into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    written = []
    for name, (document, table) in (("rotation", simulate_rotation()), ("stills", simulate_stills())):
        expt = os.path.join(folder, f"{name}.expt")
        refl = os.path.join(folder, f"{name}.refl")
        write_atomically(expt, (json.dumps(document, indent=1) + "\n").encode())
        table.write(refl)
        written += [expt, refl]
    return written


if __name__ == "__main__":
    for path in write_example(sys.argv[1] if len(sys.argv) > 1 else "examples"):
        print(path)
