"""ExperimentListFactory.from_json_file: dxtbx-like models with dxtbx's getter
conventions (tuples of floats, mat3 as 9 numbers row-major, radians with
deg=False, scan points by index, lab-frame panel vectors), carrying what the
standalone reader read from the same file."""

import json

import numpy as np

from dials_qconsistency.experiments import read_experiments
from dials_qconsistency.geometry import pixel_to_millimetre


class _Model:
    def __init__(self, points=None, point_getter=None, **getters):
        for name, value in getters.items():
            setattr(self, name, (lambda v: (lambda *args, **kwargs: v))(value))
        points = [] if points is None else list(points)
        self.num_scan_points = len(points)
        if point_getter:
            setattr(self, point_getter, lambda i: points[i])


def _mat3(matrix):
    return tuple(float(v) for v in np.ravel(matrix))


class _Panel(_Model):
    def __init__(self, panel):
        strategy = "ParallaxCorrectedPxMmStrategy" if panel.parallax else "SimplePxMmStrategy"
        super().__init__(
            get_name=panel.name, get_origin=tuple(panel.origin), get_fast_axis=tuple(panel.fast),
            get_slow_axis=tuple(panel.slow), get_pixel_size=tuple(panel.pixel_size),
            get_image_size=tuple(int(v) for v in panel.image_size), get_thickness=panel.thickness,
            get_mu=panel.mu, get_px_mm_strategy=type(strategy, (), {})(),
        )
        self._panel = panel

    def pixel_to_millimeter(self, xy):
        p = self._panel
        return pixel_to_millimetre(np.asarray(xy), p.pixel_size, p.origin, p.fast, p.slow, p.mu, p.thickness, p.parallax)


class _Detector(list):
    def __init__(self, panels, as_dict):
        super().__init__(panels)
        self._dict = as_dict

    def to_dict(self):
        return self._dict


class _Experiment:
    def __init__(self, experiment, detector_dict):
        self.identifier = experiment.identifier
        b = experiment.beam
        self.beam = _Model(b.s0_at_scan_points if b.s0_at_scan_points is not None else None, "get_s0_at_scan_point",
                           get_s0=tuple(b.s0), get_wavelength=b.wavelength)
        self.detector = _Detector([_Panel(p) for p in experiment.detector.panels], detector_dict)
        self.goniometer = self.scan = None
        g = experiment.goniometer
        if g is not None:
            points = None if g.setting_rotation_at_scan_points is None else [_mat3(m) for m in g.setting_rotation_at_scan_points]
            self.goniometer = _Model(points, "get_setting_rotation_at_scan_point",
                                     get_rotation_axis_datum=tuple(g.axis), get_fixed_rotation=_mat3(g.fixed_rotation),
                                     get_setting_rotation=_mat3(g.setting_rotation))
        if experiment.scan is not None:
            self.scan = _Model(get_image_range=experiment.scan.image_range, get_oscillation=experiment.scan.oscillation)
        c = experiment.crystal
        self.crystal = None
        if c is not None:
            points = None if c.A_at_scan_points is None else [_mat3(m) for m in c.A_at_scan_points]
            self.crystal = _Model(points, "get_A_at_scan_point", get_A=_mat3(c.A))


class ExperimentListFactory:
    @staticmethod
    def from_json_file(path, check_format=True):
        experiments = read_experiments(str(path))
        with open(path) as handle:
            document = json.load(handle)
        detectors = document.get("detector", [])
        return [
            _Experiment(e, detectors[raw["detector"]] if "detector" in raw else {})
            for e, raw in zip(experiments, document["experiment"])
        ]
