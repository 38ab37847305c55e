"""Time of flight and wavelength for polychromatic (Laue) data.

A neutron of wavelength λ flies the path L = L0 + L1 (source to sample, the
beam's ``sample_to_source_distance``; sample to spot) in t = λ·L·m_n/h, as
dxtbx's ``tof_helpers`` compute it. Units here: λ in Å, lengths in mm, t in µs.
The constants are scipy.constants' (CODATA 2022, which the DIALS tof_helpers
use through scipy); the table's own ``xyzcal.mm`` times agree with them.
"""

from __future__ import annotations

import numpy as np

NEUTRON_MASS_KG = 1.67492750056e-27
PLANCK_J_S = 6.62607015e-34

#: µs of flight per Å of wavelength per mm of path.
US_PER_ANGSTROM_MM = NEUTRON_MASS_KG / PLANCK_J_S * 1e-10 * 1e-3 * 1e6


def tof_us(wavelength, path_mm):
    """Time of flight (µs) of wavelength (Å) over a path (mm)."""
    return np.asarray(wavelength) * np.asarray(path_mm) * US_PER_ANGSTROM_MM


def wavelength_from_tof(time_us, path_mm):
    """Wavelength (Å) of a time of flight (µs) over a path (mm)."""
    return np.asarray(time_us) / (np.asarray(path_mm) * US_PER_ANGSTROM_MM)


def laue_setting(experiment) -> np.ndarray:
    """r_lab = M·h for a polychromatic experiment, as DIALS' Laue predictor
    forms it: M = S·F·A (the goniometer static), A without a goniometer."""
    gonio, A = experiment.goniometer, experiment.crystal.A
    return A if gonio is None else gonio.setting_rotation @ gonio.fixed_rotation @ A


def polychromatic_rows(experiments, experiment_of_row) -> np.ndarray:
    """Per row: does its experiment have a polychromatic beam (False for id -1)?"""
    return np.array([e.is_laue for e in experiments] + [False])[np.asarray(experiment_of_row)]


def row_wavelengths(s0):
    """λ = 1/|s0| (Å) of each row's beam vector (N, 3)."""
    s0 = np.asarray(s0, dtype=float)
    return 1.0 / np.sqrt(np.sum(s0 * s0, axis=-1))


def bragg_wavelength_ratio(q, s0):
    """λ_b/λ for each row: the wavelength at which q (N, 3) meets the Ewald
    sphere of its beam direction, λ_b = −2 (û0·q)/|q|², over the wavelength of
    s0 (N, 3), λ = 1/|s0|: −2 (s0·q)/|q|²."""
    q, s0 = np.asarray(q, dtype=float), np.asarray(s0, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return -2.0 * np.einsum("ij,ij->i", s0, q) / np.einsum("ij,ij->i", q, q)
