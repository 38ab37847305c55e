"""dials.q_map: q, |q|, d, 2θ, azimuth (and fractional hkl) at every pixel of every panel."""

from __future__ import annotations

import logging
import os
import re
import resource
import sys

import libtbx.phil
import numpy as np

from dials_qconsistency import __version__
from dials_qconsistency.io import backends
from dials_qconsistency.errors import QConsistencyError
from dials_qconsistency.io.staged import StagedOutputs
from dials_qconsistency.io.map_files import WRITERS
from dials_qconsistency.batch.parallel import available_cpus
from dials_qconsistency.core.scan_varying import image_setting
from dials_qconsistency.core.time_of_flight import laue_setting
from dials_qconsistency.core.pixel_map import (
    QUANTITIES,
    MapSetting,
    panel_blocks,
    pixel_centres,
)

from .program import (
    blas_on_one_thread,
    check_output_paths,
    log_header,
    logged_run,
    parse_command_line,
    run_console,
    run_program,
)

logger = logging.getLogger("dials.q_map")

help_message = """
Compute, at the centre of every pixel of every panel, the scattering vector
q = k_out - k_in (DIALS laboratory frame, 1/Angstrom, no 2pi) from the beam and
detector models, with |q|, the d-spacing, 2theta and the azimuth about the beam
and, on request, fractional Miller indices h = (S.R(phi).F.A)^-1 . q of the
crystal model at one image (A^-1 . q for stills).

Pixel centres go through each panel's own px -> mm mapping (parallax included),
the same functions that give dials.q_consistency its q_pixel. The maps are
computed and written a block of rows at a time, so memory stays near one block.

Examples::

  dials.q_map imported.expt

  dials.q_map refined.expt miller_indices=True image=50 output.npz=q_map.npz

  dials.q_map refined.expt panels=0,1 subsample=4 precision=float64

The HDF5 file has a group experiment_<i>/panel_<j> per panel with the datasets
q (ny, nx, 3), q_norm, d_spacing, two_theta, azimuth [, miller_index (ny, nx, 3)]
and the sampled pixel-centre coordinates x_px (nx) and y_px (ny); every dataset
carries its units as an attribute. The .npz holds the same arrays under the same
names (experiment_0/panel_0/q ...) and the attributes as JSON under 'metadata'.
"""

phil_scope = libtbx.phil.parse(
    """
image = None
  .type = int
  .help = "Rotation data: the image (its number in the scan) at whose centre"
          "phi the Miller indices, and a scan-varying beam, are evaluated;"
          "default the first image of each scan. Time-of-flight data: the"
          "image (time-of-flight bin) whose time gives each pixel its"
          "wavelength over its flight path. A still has one setting: image= with"
          "stills in the list is an error (choose them with experiments=)."
wavelength = None
  .type = float(value_min=0)
  .help = "Polychromatic (Laue, time-of-flight) beams: the wavelength (Angstrom)"
          "of the maps. Without it (or image= for time-of-flight data) only"
          "two_theta and azimuth are written, which do not depend on it."
experiments = None
  .type = ints(value_min=0)
  .help = "Only these experiments (0-based); default all."
panels = None
  .type = ints(value_min=0)
  .help = "Only these panels (0-based); default all."
subsample = 1
  .type = int(value_min=1)
  .help = "Every n-th pixel along both panel axes (pixel centres 0.5, n+0.5, ...)."
miller_indices = False
  .type = bool
  .help = "Also write fractional Miller indices (needs a crystal model)."
precision = *float32 float64
  .type = choice
  .help = "Floating-point type of the maps written."
mp {
  nthreads = Auto
    .type = int(value_min=1)
    .help = "Threads computing row blocks (Auto: the CPUs this process may"
            "use), as dials.q_consistency's mp.nthreads."
}
rows_per_block = Auto
  .type = int(value_min=1)
  .help = "Rows computed and written at a time (Auto: about 131072 pixels):"
          "memory is a few blocks per thread."
  .expert_level = 1
output {
  hdf5 = q_map.h5
    .type = path
    .help = "The maps as HDF5 (h5py); None for none."
  npz = None
    .type = path
    .help = "The maps as a NumPy .npz archive; None for none."
  log = dials.q_map.log
    .type = path
}
backend = *auto native standalone
  .type = choice
  .help = "native: DIALS' option parser and dxtbx models (pixels -> mm through"
          "dxtbx's own mapping); standalone: this package's .expt reader; auto:"
          "native when DIALS and dxtbx can be imported. Both give the same numbers."
debug = False
  .type = bool
  .help = "Show a traceback for unexpected errors."
"""
)

usage = "dials.q_map [options] models.expt [key=value ...]"


def output_paths(params) -> dict[str, str]:
    return {f"output.{name}": getattr(params.output, name) for name in ("hdf5", "npz", "log") if getattr(params.output, name)}


def selected(indices, count, what, path):
    """The chosen indices (all by default), each checked against ``count`` and named once."""
    if indices is None:
        return list(range(count))
    for index in indices:
        if index >= count:
            raise QConsistencyError(f"{what}={index} does not exist (there are {count})", path)
        if indices.count(index) > 1:
            raise QConsistencyError(f"{what}= names {index} twice ({what}={','.join(map(str, indices))})", path)
    return list(indices)


def map_plan(experiments, params, path):
    """[(experiment index, MapSetting, image, φ, [panel indices])] after checking every choice."""
    if not len(experiments):
        raise QConsistencyError("the experiment list is empty: there is nothing to map", path)
    plan = []
    every = [n for n in QUANTITIES if n != "miller_index" or params.miller_indices]
    for index in selected(params.experiments, len(experiments), "experiments", path):
        experiment = experiments[index]
        for model in ("beam", "detector"):
            if getattr(experiment, model) is None:
                raise QConsistencyError(f"experiment {index} has no {model}", path)
        if params.miller_indices and experiment.crystal is None:
            raise QConsistencyError(f"experiment {index} has no crystal, so miller_indices=True cannot be met", path)
        panels = selected(params.panels, len(experiment.detector.panels), "panels", path)
        if params.wavelength is not None and not experiment.is_laue:
            raise QConsistencyError(f"experiment {index}: wavelength= is for polychromatic beams; this beam has its "
                                    "own wavelength", path)
        if experiment.is_laue:
            setting, image, names = polychromatic_map_setting(experiment, params, index, every, path)
            plan.append((index, setting, image, None, panels, names))
            continue
        try:
            M, s0, phi = image_setting(experiment, params.image)
        except ValueError as error:
            raise QConsistencyError(f"experiment {index}: {error}", path) from None
        image = None
        if phi is not None:
            image = experiment.scan.image_range[0] if params.image is None else params.image
        elif params.image is not None:
            raise QConsistencyError(f"experiment {index}: image= is for rotation and time-of-flight data; a still "
                                    "has one setting (give experiments= to choose a still)", path)
        plan.append((index, MapSetting(s0, M if params.miller_indices else None), image, phi, panels, every))
    return plan


def polychromatic_map_setting(experiment, params, index, every, path):
    """(MapSetting, image, quantities) of a polychromatic experiment: at
    ``wavelength=``, at the time of ``image=`` (time-of-flight scans: each
    pixel's own wavelength), or without either only 2θ and the azimuth."""
    beam, scan = experiment.beam, experiment.scan
    M = laue_setting(experiment) if params.miller_indices else None  # DIALS' Laue predictor: r = S·F·A·h
    if params.wavelength is not None and params.image is not None:
        raise QConsistencyError(f"experiment {index}: give wavelength= or image= for a polychromatic beam, not both",
                                path)
    if params.wavelength is not None:
        return MapSetting(beam.unit_s0 / params.wavelength, M), None, every
    if params.image is not None:
        if scan is None or scan.time_of_flight is None:
            raise QConsistencyError(f"experiment {index}: image= needs a time-of-flight scan; give wavelength=", path)
        first, last = scan.image_range
        if not first <= params.image <= last:
            raise QConsistencyError(f"experiment {index}: image {params.image} is outside the scan (images {first} "
                                    f"to {last})", path)
        if not beam.sample_to_source_distance:
            raise QConsistencyError(f"experiment {index}: image= needs the beam's sample_to_source_distance (it is 0); "
                                    "give wavelength=", path)
        # the image's centre, as for rotation data: frame (image - first) + 0.5 on DIALS' frame -> time scale
        times = scan.time_of_flight
        time = float(np.interp(params.image - first + 0.5, np.arange(times.size), times))
        return MapSetting(beam.unit_s0, M, time, beam.sample_to_source_distance), params.image, every
    if params.miller_indices:
        raise QConsistencyError(f"experiment {index}: a polychromatic beam has no one wavelength; give wavelength= "
                                "or image= for Miller indices", path)
    return MapSetting(beam.unit_s0, wavelength_known=False), None, ["two_theta", "azimuth"]


def os_error_words(error: OSError) -> str:
    """The system's words for a failed write: libhdf5 wraps them in a long
    message naming its temporary file ("... error message = 'File too large' ...")."""
    found = re.search(r"error message = '([^']*)'", str(error))
    return found.group(1) if found else error.strerror or str(error)


def map_bytes(experiments, plan, params) -> dict:
    """The bytes of the maps each output file holds ({"hdf5": ..., "npz": ...,
    "panel": ...}; the arrays, the files' own overhead is small beside them): a
    panel with the same maps as one before it (:func:`same_maps_key`) adds its
    Miller indices alone to the HDF5 file, which links the rest; "panel" is the
    largest panel's, which the .npz writer also holds in scratch files beside
    it until the panel is copied into the zip."""
    per_value = np.dtype(params.precision).itemsize
    sizes, seen = {"hdf5": 0, "npz": 0, "panel": 0}, set()
    for index, setting, _, _, panels, names in plan:
        for panel_index in panels:
            nx, ny = experiments[index].detector.panels[panel_index].image_size
            pixels = -(-int(nx) // params.subsample) * -(-int(ny) // params.subsample)
            every = pixels * per_value * sum(QUANTITIES[name][1] for name in names)
            key = same_maps_key(experiments[index], panel_index, setting)
            sizes["npz"] += every
            sizes["panel"] = max(sizes["panel"], every)
            own = pixels * per_value * sum(QUANTITIES[name][1] for name in names if name in PER_CRYSTAL)
            sizes["hdf5"] += own if key in seen else every
            seen.add(key)
    return sizes


def check_room(params, sizes: dict) -> None:
    """Refuse, before any file is made, maps (``sizes``: :func:`map_bytes`)
    larger than the file-size limit (``ulimit -f``) or than the room left on
    the outputs' file system: a write that fails half-way costs the time
    spent, and libhdf5 1.10 can crash cleaning up after one."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    needed = {}  # file system -> (bytes, a folder on it, the paths)
    for kind in ("hdf5", "npz"):
        path, size = getattr(params.output, kind), sizes[kind]
        if not path:
            continue
        if soft != resource.RLIM_INFINITY and size > soft:
            large, limit = _bytes(size), _bytes(soft)
            if large == limit:  # told apart
                large, limit = f"{size:,} bytes", f"{soft:,} bytes"
            raise QConsistencyError(f"cannot be written: the maps take about {large}, more than the file-size limit "
                                    f"(ulimit -f) of {limit}; map less with experiments=, panels= or subsample=", path)
        folder = os.path.dirname(os.path.abspath(path))
        total, _, paths = needed.get(os.stat(folder).st_dev, (0, folder, []))
        scratch = sizes["panel"] if kind == "npz" else 0  # its scratch files, beside it
        needed[os.stat(folder).st_dev] = (total + size + scratch, folder, paths + [path])
    for total, folder, paths in needed.values():
        status = os.statvfs(folder)
        free = status.f_bavail * status.f_frsize
        if total > free:
            raise QConsistencyError(f"cannot be written: the maps need about {_bytes(total)} of disk and {folder} "
                                    f"has {_bytes(free)} free; map less with experiments=, panels= or subsample=",
                                    " and ".join(paths))


def _bytes(count: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count / 1e3:.1f} kB"


#: The hidden temporary files of dials.q_map's outputs (named in libhdf5's errors).
TEMPORARY_PREFIX = ".tmp-q_map-"


@blas_on_one_thread
def run(args=None, phil=phil_scope):
    """Run the program; return 0 on success. Raises QConsistencyError on bad input.

    Every choice is checked before a file is created; the map files are staged
    and renamed into place only when complete.
    """
    args = sys.argv[1:] if args is None else list(args)
    arguments = parse_command_line(args, phil, usage, help_message, accept_reflections=False)
    if arguments is None:
        return 0
    params = arguments.params
    if len(arguments.experiments) != 1:
        raise QConsistencyError(f"give one experiment list (got {len(arguments.experiments)}); {usage}")
    expt_path = arguments.experiments[0]
    if not (params.output.hdf5 or params.output.npz):
        raise QConsistencyError("nothing to write: set output.hdf5 or output.npz")
    if params.output.hdf5:
        try:
            import h5py  # noqa: F401
        except ImportError:
            raise QConsistencyError("output.hdf5 needs h5py (pip install h5py); or use output.npz") from None
    check_output_paths(output_paths(params), [expt_path])
    experiments = backends.get(arguments.backend).read_experiments(expt_path)
    plan = map_plan(experiments, params, expt_path)
    check_room(params, map_bytes(experiments, plan, params))

    staged = StagedOutputs(prefix=TEMPORARY_PREFIX)
    with logged_run(logger, params.output.log, arguments, staged):
        log_header(logger, "dials.q_map", __version__, arguments)
        logger.info(f"Read {len(experiments)} experiment(s) from {expt_path}")
        write_maps(params, experiments, plan, expt_path, staged)
    return 0


def write_maps(params, experiments, plan, expt_path, staged):
    """Compute every selected panel in row blocks and stream it to the writers,
    into ``staged`` (a ``StagedOutputs``, committed here)."""
    dtype = np.dtype(params.precision)
    workers = params.mp.nthreads if isinstance(params.mp.nthreads, int) else available_cpus()
    attributes = {
        "program": "dials.q_map",
        "version": __version__,
        "experiments": os.path.abspath(expt_path),
        "frame": "DIALS laboratory frame (imgCIF); lengths in mm",
        "q_convention": "q = s1 - s0 = k_out - k_in, |s0| = 1/wavelength, no 2pi",
        "pixel_centres": "(i + 0.5) px along each panel axis, every subsample-th pixel",
    }
    targets = [getattr(params.output, kind) for kind in ("hdf5", "npz") if getattr(params.output, kind)]
    mapped = {}  # same_maps_key -> (the group of its panel's maps, their extent for the log)
    with staged:
        writers = []
        try:
            for kind in ("hdf5", "npz"):
                path = getattr(params.output, kind)
                if path:
                    writers.append(WRITERS[kind](staged.reserve(path), attributes))
            for index, setting, image, phi, panels, names in plan:
                experiment = experiments[index]
                group = f"experiment_{index}"
                for writer in writers:
                    writer.set_group_attributes(group, experiment_attributes(experiment, setting, image, phi))
                logger.info(f"Experiment {index}" + setting_words(experiment, setting, image, phi, names) + ":")
                for panel_index in panels:
                    panel = experiment.detector.panels[panel_index]
                    key = same_maps_key(experiment, panel_index, setting)
                    path, same_as = f"{group}/panel_{panel_index}", mapped.get(key)
                    extent = write_panel(writers, path, panel, setting, names, params, dtype, workers, same_as)
                    mapped.setdefault(key, (path, extent))
                    logger.info(panel_line(panel_index, panel, extent)
                                + (f" (the same maps as {same_as[0]})" if same_as else ""))
            for writer in writers:
                writer.close()
        except BaseException as error:
            for writer in writers:
                writer.abort()
            if isinstance(error, OSError):  # h5py and zipfile report a full disk so
                raise QConsistencyError(f"cannot be written ({os_error_words(error)})", " and ".join(targets)) from None
            raise
        staged.commit()
    for kind in ("hdf5", "npz"):
        if getattr(params.output, kind):
            logger.info(f"Saved the maps to {getattr(params.output, kind)}")


def setting_words(experiment, setting, image, phi, names) -> str:
    """The log's words for the beam and image a map is made for."""
    if setting.time_of_flight_us is not None:
        return (f", image {image} (time of flight {setting.time_of_flight_us:.1f} us: each pixel at the wavelength "
                "of that time over its flight path)")
    if not setting.wavelength_known:
        return ": a polychromatic beam and no wavelength= or image=, so two_theta and azimuth only"
    words = f", image {image} (phi {np.degrees(phi):.3f} deg)" if image is not None else ""
    return words + f", wavelength {1.0 / setting.wavenumber:.5f} A"


def experiment_attributes(experiment, setting, image, phi) -> dict:
    one_wavelength = setting.time_of_flight_us is None and setting.wavelength_known
    return {
        "identifier": experiment.identifier,
        "wavelength": 1.0 / setting.wavenumber if one_wavelength else None,
        "time_of_flight_us": setting.time_of_flight_us,
        "s0": setting.s0 if one_wavelength else None,
        "unit_s0": setting.s0 / setting.wavenumber,
        "image": image,
        "phi_degrees": None if phi is None else float(np.degrees(phi)),
        "setting_matrix": setting.setting,
        "setting_matrix_meaning": None if setting.setting is None else "r_lab = M . h (1/Angstrom)",
    }


#: The maps that depend on the crystal: the others are the same for every
#: experiment with the same panel and beam (:func:`same_maps_key`).
PER_CRYSTAL = {"miller_index"}


def same_maps_key(experiment, panel_index, setting):
    """What a panel's maps other than the Miller indices depend on: the panel
    (of a detector model experiments share, compared as the same model), the
    beam's s0 and time-of-flight bin."""
    return (id(experiment.detector), panel_index, np.asarray(setting.s0, dtype=float).tobytes(),
            setting.time_of_flight_us, setting.source_mm, setting.wavelength_known)


def write_panel(writers, group, panel, setting, names, params, dtype, workers, same_as=None):
    """One panel, block by block; returns (quantity, min, max) of |q| (or 2θ
    when the map has no |q|) for the log. ``same_as``: (group, extent) of a
    panel already written with the same maps but the Miller indices
    (:func:`same_maps_key`): writers that can (HDF5) link those maps to it
    rather than hold a copy, and only what they still need is computed."""
    x = pixel_centres(panel.image_size[0], params.subsample)
    y = pixel_centres(panel.image_size[1], params.subsample)
    links = {} if same_as is None else {name: same_as[0] for name in names if name not in PER_CRYSTAL}
    if links and all(writer.links for writer in writers):
        computed = [name for name in names if name not in links]
    else:
        computed = names
    datasets = {}
    for name in names:
        units, per_pixel, description = QUANTITIES[name]
        shape = (y.size, x.size) + ((per_pixel,) if per_pixel > 1 else ())
        datasets[name] = (shape, dtype, units, description)
    attributes = {
        "name": panel.name,
        "origin": panel.origin,
        "fast_axis": panel.fast,
        "slow_axis": panel.slow,
        "pixel_size": panel.pixel_size,
        "image_size": panel.image_size,
        "subsample": params.subsample,
        "parallax_corrected": bool(panel.parallax),
        "mu": panel.mu,
        "thickness": panel.thickness,
    }
    for writer in writers:
        writer.begin_panel(group, attributes, datasets, {"x_px": x, "y_px": y}, links)
    low, high = np.inf, -np.inf
    rows = params.rows_per_block if isinstance(params.rows_per_block, int) else None
    shown = "q_norm" if "q_norm" in names else "two_theta"
    if computed:
        for start, stop, arrays in panel_blocks(panel, setting, computed, params.subsample, rows, dtype, workers):
            if shown in arrays:
                values = arrays[shown]
                low, high = min(low, float(np.nanmin(values))), max(high, float(np.nanmax(values)))
            for writer in writers:
                writer.write_rows(start, stop, arrays)
    for writer in writers:
        writer.end_panel()
    return same_as[1] if same_as else (shown, low, high)


def panel_line(index, panel, extent) -> str:
    shown, low, high = extent
    size = f"{int(panel.image_size[0])} x {int(panel.image_size[1])} px"
    if shown == "two_theta":
        return f"  panel {index} ({panel.name or 'unnamed'}, {size}): 2theta {low:.3f} to {high:.3f} deg"
    with np.errstate(divide="ignore"):
        d_max, d_min = 1.0 / low, 1.0 / high
    return f"  panel {index} ({panel.name or 'unnamed'}, {size}): |q| {low:.5f} to {high:.5f} 1/A, d {d_min:.3f} to {d_max:.2f} A"


def main(args=None):
    """Console entry point: one-line errors and exit status 1 on bad input."""
    return run_program("dials.q_map", run, sys.argv[1:] if args is None else list(args))


def console():
    """The installed command: :func:`main`, then the process ends (:func:`program.run_console`)."""
    run_console(main)


if __name__ == "__main__":
    console()
