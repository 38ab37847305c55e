"""Synthetic DIALS-like pairs of any size for the benchmarks.

    python benchmarks/synthetic_data.py OUTPUT_FOLDER N_REFLECTIONS [N_FILES]
    python benchmarks/synthetic_data.py OUTPUT_FOLDER --stills N_EXPERIMENTS

A rotation sweep (360 images of 0.5 degrees on the simulator's four tilted,
parallax-corrected panels) is simulated once with exact predictions; its rows
are repeated to reach the size asked for, and each file gets the columns an
integrated table carries (integration results, variances, bounding boxes,
partiality, background, profile correlation...), about 330 bytes a row, the
density of a real ``integrated.refl`` without shoeboxes. Every row is a valid
prediction of the model, so dials.q_consistency computes them all.

``--stills`` writes one serial-crystallography batch instead: a stills table
with N experiments, the predictions of 50 simulated crystals repeated under
new identifiers (each experiment its own crystal model), as dials.ssx_index
writes thousands of lattices into one pair.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dials_qconsistency.io.refl import ReflectionTable  # noqa: E402
from simulation.simulate import scan_dict, simulate_rotation, simulate_stills  # noqa: E402


def base_sweep():
    """(expt document, {column: (type, values)}) of one simulated sweep."""
    document, table = simulate_rotation(seed=7, d_min=1.6, scan=scan_dict(n_images=360, width=0.5))
    indexed = table.get("id") >= 0
    columns = {name: (table.column_type(name), np.asarray(table.get(name))[indexed]) for name in table.keys()}
    return document, columns


def realistic_columns(columns, n, rng):
    """The sweep's rows repeated to ``n``, with the columns of an integrated table added."""
    base_n = len(columns["id"][1])
    take = np.arange(n) % base_n
    out = {name: (kind, values[take]) for name, (kind, values) in columns.items()}
    intensity = rng.gamma(1.5, 400.0, n)
    z = out["xyzcal.px"][1][:, 2]
    x, y = out["xyzcal.px"][1][:, 0], out["xyzcal.px"][1][:, 1]
    bbox = np.column_stack([x - 4, x + 5, y - 4, y + 5, np.floor(z) - 1, np.floor(z) + 2]).astype(np.int32)
    extra = {
        "intensity.sum.value": ("double", intensity),
        "intensity.sum.variance": ("double", intensity + rng.uniform(10, 50, n)),
        "intensity.prf.value": ("double", intensity * rng.normal(1.0, 0.02, n)),
        "intensity.prf.variance": ("double", intensity + rng.uniform(5, 40, n)),
        "background.mean": ("double", rng.uniform(0.5, 3.0, n)),
        "background.sum.value": ("double", rng.uniform(20, 80, n)),
        "background.sum.variance": ("double", rng.uniform(20, 80, n)),
        "xyzobs.px.variance": ("vec3<double>", rng.uniform(0.01, 0.1, (n, 3))),
        "bbox": ("int6", bbox),
        "d": ("double", rng.uniform(1.6, 30.0, n)),
        "partiality": ("double", rng.uniform(0.5, 1.0, n)),
        "partial_id": ("std::size_t", np.arange(n, dtype=np.uint64)),
        "lp": ("double", rng.uniform(0.5, 1.5, n)),
        "qe": ("double", np.ones(n)),
        "zeta": ("double", rng.uniform(-1, 1, n)),
        "profile.correlation": ("double", rng.uniform(0.5, 1.0, n)),
        "num_pixels.foreground": ("int", rng.integers(20, 80, n).astype(np.int32)),
        "num_pixels.background": ("int", rng.integers(100, 400, n).astype(np.int32)),
    }
    out.update(extra)
    return out


def write_pairs(folder, n_reflections, n_files=1, seed=0):
    """Write ``n_files`` pairs sweep_XXX.expt/.refl sharing ``n_reflections`` rows; returns them."""
    os.makedirs(folder, exist_ok=True)
    document, columns = base_sweep()
    rng = np.random.default_rng(seed)
    pairs = []
    sizes = [n_reflections // n_files + (1 if i < n_reflections % n_files else 0) for i in range(n_files)]
    for index, n in enumerate(sizes):
        stem = os.path.join(folder, f"sweep_{index:03d}")
        identifier = f"bench-sweep-{index}"
        document["experiment"][0]["identifier"] = identifier
        with open(stem + ".expt", "w") as handle:
            json.dump(document, handle)
        table = ReflectionTable(n, {0: identifier}, version=2)
        for name, (kind, values) in realistic_columns(columns, n, rng).items():
            table.set_column(name, kind, values)
        table.write(stem + ".refl")
        pairs.append((stem + ".expt", stem + ".refl"))
    return pairs


def write_stills(folder, n_experiments, seed=0):
    """Write stills.expt/.refl with ``n_experiments`` experiments; returns the pair."""
    os.makedirs(folder, exist_ok=True)
    base, table = simulate_stills(seed=seed, n_crystals=50, d_min=3.0)  # ~320 spots a lattice
    ids = np.asarray(table.get("id"))
    indexed = ids >= 0
    per_crystal = [np.flatnonzero(indexed & (ids == i)) for i in range(50)]
    document = dict(base, experiment=[], crystal=[])
    rows = []
    for index in range(n_experiments):
        crystal = index % 50
        experiment = dict(base["experiment"][crystal], identifier=f"bench-still-{index}", crystal=index)
        document["experiment"].append(experiment)
        document["crystal"].append(base["crystal"][crystal])
        rows.append(per_crystal[crystal])
    take = np.concatenate(rows)
    new_ids = np.repeat(np.arange(n_experiments), [r.size for r in rows])
    stem = os.path.join(folder, "stills")
    with open(stem + ".expt", "w") as handle:
        json.dump(document, handle)
    out = ReflectionTable(take.size, {i: f"bench-still-{i}" for i in range(n_experiments)}, version=2)
    for name in table.keys():
        values = new_ids if name == "id" else np.asarray(table.get(name))[take]
        out.set_column(name, table.column_type(name), values)
    out.write(stem + ".refl")
    return stem + ".expt", stem + ".refl"


if __name__ == "__main__":
    if sys.argv[2] == "--stills":
        expt, refl = write_stills(sys.argv[1], int(float(sys.argv[3])))
        print(expt, refl, f"{os.path.getsize(refl) / 1e6:.0f} MB")
        sys.exit()
    folder, n = sys.argv[1], int(float(sys.argv[2]))
    files = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    for expt, refl in write_pairs(folder, n, files):
        print(expt, refl, f"{os.path.getsize(refl) / 1e6:.0f} MB")
