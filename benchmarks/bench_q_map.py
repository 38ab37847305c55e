"""Benchmark dials.q_map against pyFAI on the same detector geometry.

    pip install pyFAI          # once, beside the package
    python benchmarks/bench_q_map.py [--repeat 3] [--json results.json]

Two detectors: one 16-Mpixel panel (4148 x 4362 pixels of 75 um, tilted by
0.6 and -0.4 degrees, 200 mm) and a 64-panel tiled detector (8 x 8 modules of
512 x 256 pixels of 75 um, each turned and tilted a little, 8.4 Mpixel). Each
panel is converted to a pyFAI Geometry (dist, poni1, poni2, rot1..3 fitted so
that pyFAI's pixel centres, ``calc_pos_zyx``, land on the DIALS ones to 1e-12 m)
and pyFAI's ``Geometry.qArray`` (|q| = 4 pi sin(theta)/lambda in nm^-1, so
divided here by 20 pi to give Angstrom^-1 without 2 pi) is timed. The
cross-check of dials.q_map's |q| (target 1e-6 relative) is against pyFAI's
``qFunction`` at float64 pixel indices: ``qArray`` feeds that same function
float32 indices, whose rounding alone reaches ~1e-4 relative near the beam
(reported too).

Every measurement runs in a fresh subprocess, so its peak resident memory
(``VmHWM``) is its own; times are the best of ``--repeat`` runs. Measured:

* ``q vectors``   the full q vectors (float32 maps, filled block by block)
* ``|q|``         |q| only, float64 — the like-for-like comparison with pyFAI
* ``pyFAI |q|``   ``Geometry.qArray`` on a fresh Geometry (no cache), float64
* ``dials.q_map`` the whole command: q, |q|, d, 2theta, azimuth to HDF5 (float32)

Targets (issue 6): |q| no slower than pyFAI; the q vectors of 16 Mpixel in <= 1 s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from dials_qconsistency.core import geometry  # noqa: E402
from dials_qconsistency.io.expt import experiments_from_dict  # noqa: E402
from simulation.simulate import beam_dict, crystal_dict, experiment_list_dict, panel_dict  # noqa: E402

WAVELENGTH = 0.98  # Angstrom
PIXEL = 0.075  # mm


def _rot(axis, degrees):
    return geometry.rotation_matrix(axis, math.radians(degrees))


def detector_dict(name):
    """The benchmark detectors in the dxtbx JSON layout (flat: no hierarchy)."""
    if name == "16M":
        tilt = _rot((0, 1, 0), 0.6) @ _rot((1, 0, 0), -0.4)
        fast, slow = tilt @ [1.0, 0, 0], tilt @ [0, -1.0, 0]
        origin = np.array([0, 0, -200.0]) - 2000.5 * PIXEL * fast - 2100.25 * PIXEL * slow
        panels = [panel_dict("16M", fast, slow, origin, (4148, 4362), PIXEL, parallax=False)]
    else:
        panels = []
        width, height = 512 * PIXEL, 256 * PIXEL
        for row in range(8):
            for column in range(8):
                k = 8 * row + column
                turn = _rot((0, 0, 1), 0.3 * ((k % 5) - 2)) @ _rot((1, 0, 0), 0.2 * ((k % 3) - 1))
                fast, slow = turn @ [1.0, 0, 0], turn @ [0, -1.0, 0]
                corner = [(column - 4) * (width + 1.0), (4 - row) * (height + 1.0), -150.0 - 0.1 * (k % 4)]
                panels.append(panel_dict(f"M{k:02d}", fast, slow, corner, (512, 256), PIXEL, parallax=False))
    return {"panels": panels}


def experiments_document(name):
    cell = (78.9, 78.9, 37.1)
    return experiment_list_dict(
        beam_dict(WAVELENGTH), detector_dict(name), [crystal_dict(cell, _rot((1, 1, 0), 20.0))], [f"bench-{name}"]
    )


def dials_panels(name):
    return experiments_from_dict(experiments_document(name))[0].detector.panels


# --- DIALS panel -> pyFAI Geometry -------------------------------------------------------

# pyFAI's lab frame has z along the beam (downstream); DIALS' beam runs along -z.
# A 180 degree turn about x takes DIALS lab vectors to pyFAI's (and keeps
# fast x slow pointing downstream in both).
DIALS_TO_PYFAI = np.diag([1.0, -1.0, -1.0])


def pyfai_geometry(panel):
    """A pyFAI Geometry whose pixel centres are the panel's (fitted, checked to 1e-12 m)."""
    from pyFAI.detectors import Detector
    from pyFAI.geometry import Geometry
    from scipy.optimize import least_squares

    nx, ny = (int(v) for v in panel.image_size)
    detector = Detector(pixel1=PIXEL * 1e-3, pixel2=PIXEL * 1e-3, max_shape=(ny, nx))
    d1 = np.array([0.0, 0.0, ny - 1.0, ny - 1.0, ny / 2])  # slow pixel indices (pyFAI: centres)
    d2 = np.array([0.0, nx - 1.0, 0.0, nx - 1.0, nx / 3])  # fast
    lab = geometry.lab_coordinates(
        panel.origin, panel.fast, panel.slow, np.column_stack([(d2 + 0.5) * PIXEL, (d1 + 0.5) * PIXEL])
    )
    target = (lab @ DIALS_TO_PYFAI.T) * 1e-3  # metres, pyFAI frame (x, y, z)
    trial = Geometry(detector=detector, wavelength=WAVELENGTH * 1e-10)

    def residual(param):
        z, y, x = trial.calc_pos_zyx(d1=d1, d2=d2, param=param)
        return (np.column_stack([x, y, z]) - target).ravel()

    normal = DIALS_TO_PYFAI @ np.cross(panel.fast, panel.slow)
    distance = float((DIALS_TO_PYFAI @ panel.origin) @ normal) * 1e-3
    guess = [distance, -target[0, 1], -target[0, 0], 0.0, 0.0, 0.0]
    fit = least_squares(residual, guess, xtol=1e-15, ftol=1e-15, gtol=1e-15)
    worst = float(np.abs(residual(fit.x)).max())
    if worst > 1e-12:
        raise RuntimeError(f"pyFAI geometry for {panel.name} does not fit: {worst:.2e} m")
    dist, poni1, poni2, rot1, rot2, rot3 = fit.x
    return Geometry(dist=dist, poni1=poni1, poni2=poni2, rot1=rot1, rot2=rot2, rot3=rot3,
                    detector=detector, wavelength=WAVELENGTH * 1e-10)


# --- measurements (each in its own process) ----------------------------------------------


def _map(panels, names, dtype, workers=2, keep=False):
    from dials_qconsistency.core.pixel_map import MapSetting, panel_blocks

    setting = MapSetting(np.array([0.0, 0.0, -1.0 / WAVELENGTH]))
    kept = []
    for panel in panels:
        nx, ny = (int(v) for v in panel.image_size)
        out = {n: np.empty((ny, nx) + ((3,) if n == "q" else ()), dtype) for n in names}
        for start, stop, arrays in panel_blocks(panel, setting, names, 1, None, dtype, workers):
            for name, values in arrays.items():
                out[name][start:stop] = values
        if keep:
            kept.append(out)
    return kept


def measure(case, name, repeat):
    panels = dials_panels(name)
    pixels = sum(int(p.image_size[0]) * int(p.image_size[1]) for p in panels)
    if case == "pyfai":
        geometries = [(pyfai_geometry(p), (int(p.image_size[1]), int(p.image_size[0]))) for p in panels]

        def once():
            for g, shape in geometries:
                g.reset()  # drop pyFAI's cached arrays: compute from scratch
                g.qArray(shape)
    elif case == "q_map":
        folder = tempfile.mkdtemp()
        expt = os.path.join(folder, "bench.expt")
        with open(expt, "w") as handle:
            json.dump(experiments_document(name), handle)

        def once():
            from dials_qconsistency.command_line import q_map

            q_map.run([expt, f"output.hdf5={folder}/q_map.h5", f"output.log={folder}/q_map.log", "mp.nthreads=2"])
    else:
        names, dtype = {"q": (["q"], np.float32), "q_norm": (["q_norm"], np.float64)}[case]

        def once():
            _map(panels, names, dtype)

    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    peak_mb = peak_rss_mb()
    return {"case": case, "detector": name, "pixels": pixels, "seconds": min(times), "peak_rss_mb": peak_mb}


def peak_rss_mb():
    """This process's peak resident memory (VmHWM; ru_maxrss survives exec on Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cross_check(name):
    """Largest relative differences between dials.q_map's |q| and pyFAI's, over every pixel.

    ``qArray`` builds its pixel indices as float32 (``numpy.fromfunction(...,
    dtype=float32)``), so its positions carry float32 rounding: near the direct
    beam, where |q| is tiny, that shows as a relative error of ~1e-4. The same
    pyFAI function (``qFunction``) at float64 indices is pyFAI's exact answer.
    """
    panels = dials_panels(name)
    exact = rounded = 0.0
    for panel, maps in zip(panels, _map(panels, ["q_norm"], np.float64, keep=True)):
        g = pyfai_geometry(panel)
        shape = (int(panel.image_size[1]), int(panel.image_size[0]))
        d1, d2 = np.meshgrid(np.arange(shape[0], dtype=float), np.arange(shape[1], dtype=float), indexing="ij")
        q_float64 = g.qFunction(d1, d2) / (20 * math.pi)
        q_array = g.qArray(shape) / (20 * math.pi)
        exact = max(exact, float(np.max(np.abs(maps["q_norm"] - q_float64) / q_float64)))
        rounded = max(rounded, float(np.max(np.abs(maps["q_norm"] - q_array) / q_array)))
    return {"detector": name, "max_relative_difference": exact, "max_relative_difference_qArray": rounded}


def child(args):
    if args.child == "crosscheck":
        print(json.dumps(cross_check(args.detector)))
    else:
        print(json.dumps(measure(args.child, args.detector, args.repeat)))


def run_child(case, detector, repeat):
    done = subprocess.run(
        [sys.executable, __file__, "--child", case, "--detector", detector, "--repeat", str(repeat)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_rss_mb():
    """Peak RSS of a process that only imports what the measurements import."""
    code = (
        "import numpy, h5py, scipy.optimize, pyFAI.geometry, dials_qconsistency.command_line.q_map;"
        "print(next(int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
    )
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--detector", default="16M", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import platform

    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"Python {platform.python_version()}, numpy {np.__version__}",
               "baseline_rss_mb": baseline_rss_mb(), "runs": [], "cross_checks": []}
    import pyFAI

    results["pyFAI"] = pyFAI.version
    print(f"machine: {results['machine']}; pyFAI {pyFAI.version}")
    print(f"peak RSS of a process that only imports numpy, h5py, scipy, pyFAI and dials_qconsistency: "
          f"{results['baseline_rss_mb']:.0f} MB\n")
    print(f"{'detector':10s} {'what':28s} {'seconds':>8s} {'Mpixel/s':>9s} {'peak RSS MB':>12s}")
    labels = {"q": "dials.q_map q vectors (f32)", "q_norm": "dials.q_map |q| (f64)",
              "pyfai": "pyFAI qArray |q| (f64)", "q_map": "dials.q_map command -> HDF5"}
    for detector in ("16M", "64"):
        for case in ("q", "q_norm", "pyfai", "q_map"):
            run = run_child(case, detector, args.repeat)
            results["runs"].append(run)
            print(f"{detector:10s} {labels[case]:28s} {run['seconds']:8.3f} "
                  f"{run['pixels'] / run['seconds'] / 1e6:9.1f} {run['peak_rss_mb']:12.0f}")
        check = run_child("crosscheck", detector, 1)
        results["cross_checks"].append(check)
        print(f"{detector:10s} |q| vs pyFAI: max relative difference {check['max_relative_difference']:.1e} "
              f"(float64 qFunction), {check['max_relative_difference_qArray']:.1e} (qArray, float32 pixel indices)")
    by = {(r["detector"], r["case"]): r["seconds"] for r in results["runs"]}
    print("\ntargets:")
    for detector in ("16M", "64"):
        ratio = by[(detector, "pyfai")] / by[(detector, "q_norm")]
        print(f"  {detector}: |q| {ratio:.1f}x faster than pyFAI ({'met' if ratio >= 1 else 'NOT met'})")
    q16 = by[("16M", "q")]
    print(f"  16M q vectors in {q16:.3f} s ({'met' if q16 <= 1.0 else 'NOT met'}: <= 1 s)")
    worst = max(c["max_relative_difference"] for c in results["cross_checks"])
    print(f"  |q| agrees with pyFAI to {worst:.1e} relative ({'met' if worst <= 1e-6 else 'NOT met'}: <= 1e-6)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
