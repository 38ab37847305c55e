"""Installing into an environment that already has cctbx must not ask for cctbx-base.

pip builds the wheel in an isolated environment that hides the target's
packages, so the check in setup.py must look at the target interpreter itself.
This builds the real wheel twice in a fresh venv, with pip's default isolation:
without libtbx it requires cctbx-base; with a libtbx package on the venv's own
path (as conda's cctbx provides) it does not.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile

from conftest import REPO_ROOT


def wheel_metadata(python, out_dir):
    """(Requires-Dist lines, entry_points.txt) of the wheel pip builds here."""
    subprocess.run(
        [python, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out_dir, REPO_ROOT],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = glob.glob(os.path.join(out_dir, "*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
        entry_points = archive.read(metadata.replace("METADATA", "entry_points.txt")).decode()
    return [line.split(": ", 1)[1] for line in lines if line.startswith("Requires-Dist: ")], entry_points


def test_cctbx_base_only_where_no_cctbx_is_installed(tmp_path):
    env = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env)
    python = str(env / "bin" / "python")

    plain, entry_points = wheel_metadata(python, str(tmp_path / "plain"))
    assert "cctbx-base" in plain  # a fresh environment gets it
    assert "dials.q_consistency = dials_qconsistency.command_line.q_consistency:console" in entry_points
    assert "dials.q_map = dials_qconsistency.command_line.q_map:console" in entry_points
    assert "h5py" in plain

    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    stub = os.path.join(purelib, "libtbx")
    os.makedirs(stub)
    for name in ("__init__.py", "phil.py"):
        open(os.path.join(stub, name), "w").close()
    with_cctbx, _ = wheel_metadata(python, str(tmp_path / "with_cctbx"))
    assert "cctbx-base" not in with_cctbx  # the environment's own cctbx is left alone
    assert 'cctbx-base; extra == "standalone"' in with_cctbx  # still there on request
    assert [r for r in plain if r != "cctbx-base"] == with_cctbx
    assert sys.executable != python and sysconfig.get_paths()["purelib"] != purelib  # the test's env is untouched
