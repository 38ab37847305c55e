"""Many inputs in one run: glob patterns, pairing .expt with .refl, output names.

SSX pipelines write thousands of pairs (``indexed_0001.expt`` and
``indexed_0001.refl`` ...). Patterns are expanded here as well as by the shell
(so that a quoted glob beats the shell's argument-length limit); each pattern's
matches are sorted. Pairs are made by name (the same path without extension)
or by order.
"""

from __future__ import annotations

import glob
import os

from dials_qconsistency.errors import QConsistencyError

GLOB_CHARACTERS = "*?["


def is_pattern(arg: str) -> bool:
    return any(c in arg for c in GLOB_CHARACTERS) and not os.path.exists(arg)


def expand(arg: str) -> list[str]:
    """The files a glob pattern matches, sorted; an error when none does."""
    matches = sorted(glob.glob(arg))
    if not matches:
        raise QConsistencyError("no file matches this pattern", arg)
    return matches


def _stem(path: str) -> str:
    return os.path.splitext(os.path.normpath(path))[0]


def partner_note(experiments: str, reflections: str) -> str:
    """What a file's error adds about its pair: the experiment list it was read
    with, and whether by the order given (their names do not pair)."""
    how = "" if _stem(experiments) == _stem(reflections) else " by the order given"
    return f" (paired{how} with {experiments})"


def pair_files(experiments: list[str], reflections: list[str], pairing: str = "auto") -> list[tuple[str, str]]:
    """[(expt, refl)]: by name (same path without extension), by order, or
    ``auto``: by name when every file has its partner, else by order when the
    counts agree."""
    if not experiments or not reflections:
        raise QConsistencyError(
            f"give experiment lists (.expt) and reflection tables (.refl) to pair (got {len(experiments)} and {len(reflections)})"
        )
    if pairing in ("auto", "name"):
        by_stem = {}
        for path in experiments:
            by_stem.setdefault(_stem(path), []).append(path)
        pairs = [(by_stem.get(_stem(refl), [None])[0], refl) for refl in reflections]
        complete = all(expt for expt, _ in pairs) and len(experiments) == len(reflections)
        if complete and all(len(v) == 1 for v in by_stem.values()):
            return pairs
        if pairing == "name":
            missing = next((refl for expt, refl in pairs if expt is None), None)
            if missing:
                raise QConsistencyError("has no experiment list of the same name (input.pairing=name)", missing)
            raise QConsistencyError(
                f"pairing by name needs one .expt per .refl (got {len(experiments)} and {len(reflections)})"
            )
    if len(experiments) != len(reflections):
        raise QConsistencyError(
            f"cannot pair {len(experiments)} experiment lists with {len(reflections)} reflection tables "
            "(neither by name nor by order)"
        )
    return list(zip(experiments, reflections))


def output_table_names(reflections: list[str], template: str) -> list[str]:
    """One output table per input: ``<name>_<template file name>`` in the template's folder.

    ``<name>`` is the input's path relative to the inputs' common folder, with
    folder separators turned into ``_`` (``run1/indexed.refl`` and
    ``run2/indexed.refl`` give ``run1_indexed_q_consistency.refl`` and
    ``run2_indexed_q_consistency.refl``).
    """
    folder, suffix = os.path.split(template)
    absolute = [os.path.abspath(p) for p in reflections]
    common = os.path.commonpath([os.path.dirname(p) for p in absolute])
    names = []
    for path in absolute:
        relative = os.path.splitext(os.path.relpath(path, common))[0].replace(os.sep, "_")
        names.append(os.path.join(folder, f"{relative}_{suffix}"))
    return names
