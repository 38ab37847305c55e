"""dials-qconsistency: a DIALS command-line plugin (dials.q_consistency)."""

import os
import subprocess
import sys

from setuptools import find_packages, setup


def cctbx_requirement():
    """cctbx-base from PyPI only where no cctbx is installed already.

    Inside a conda DIALS environment libtbx is importable (from conda's cctbx);
    installing the PyPI wheel over it would break DIALS, so it is not required.
    pip builds in an isolated environment that hides the target's packages, so
    the check runs the target interpreter itself in isolated mode (-I ignores
    the PYTHONPATH with which pip hides them). DIALS_QCONSISTENCY_NO_CCTBX=1
    forces the same; the "standalone" extra asks for cctbx-base explicitly.
    """
    if os.environ.get("DIALS_QCONSISTENCY_NO_CCTBX"):
        return []
    check = subprocess.run(
        [sys.executable, "-I", "-c", "import libtbx.phil"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return [] if check.returncode == 0 else ["cctbx-base"]


setup(
    name="dials-qconsistency",
    version="0.1.0",
    description="Reciprocal-space self-consistency check of DIALS models (dials.q_consistency)",
    long_description=open("README.rst").read() if os.path.exists("README.rst") else "",
    long_description_content_type="text/x-rst",
    license="BSD-3-Clause",
    # phil/ (the refinement strategies the reports point to) is installed as dials_qconsistency/phil
    packages=find_packages(include=["dials_qconsistency", "dials_qconsistency.*"]) + ["dials_qconsistency.phil"],
    package_dir={"dials_qconsistency.phil": "phil"},
    package_data={"dials_qconsistency.report": ["templates/*.html"], "dials_qconsistency.phil": ["*.phil"]},
    python_requires=">=3.9",
    install_requires=["numpy", "matplotlib", "msgpack", "h5py", "plotly", "jinja2", "threadpoolctl"] + cctbx_requirement(),
    extras_require={
        "test": ["pytest", "hypothesis", "mpi4py", "selenium"],
        "mpi": ["mpi4py"],
        "standalone": ["cctbx-base"],
        "benchmark": ["pyFAI", "scipy", "mpi4py"],
    },
    entry_points={
        "console_scripts": [
            "dials.q_consistency = dials_qconsistency.command_line.q_consistency:console",
            "dials.q_map = dials_qconsistency.command_line.q_map:console",
        ]
    },
)
