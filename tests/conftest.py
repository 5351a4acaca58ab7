"""
Shared fixtures for tests that start real processes.

Daemons under test run from a private copy of the source tree (readable by the
unprivileged C{vdsm} user, wherever the checkout lives) with this very Python.
"""

import os
import pwd
import shutil
import sys

import pytest

from tests import _procs


@pytest.fixture(scope="session")
def code_dir():
    """A world-readable copy of the code, the PYTHONPATH of spawned daemons."""
    return _procs.shared_code_dir()


@pytest.fixture(scope="session")
def vdsm_user():
    """The unprivileged user the agent runs as (created by .ci/run)."""
    try:
        return pwd.getpwnam("vdsm")
    except KeyError:
        pytest.fail("user 'vdsm' is missing: run .ci/run or tools/bootstrap.sh first")


@pytest.fixture
def private_dir():
    """A private run directory that the vdsm user can enter (outside pytest's
    own 0700 temp tree), removed afterwards."""
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="vdsm-twisted-test-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _private_cwd(tmp_path_factory):
    """trial's mktemp() writes under the cwd: keep that out of the checkout."""
    old = os.getcwd()
    # pytest makes its base 0700; the vdsm user must reach the fixtures' dirs.
    os.chmod(tmp_path_factory.getbasetemp(), 0o755)
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


def pytest_configure(config):
    """Temp dirs the unprivileged vdsm user can traverse (pytest's own
    /tmp/pytest-of-root is 0700), removed at the end unless asked to keep."""
    import tempfile

    if config.option.basetemp is None:
        base = tempfile.mkdtemp(prefix="vdsm-twisted-pytest-")
        os.chmod(base, 0o755)
        config.option.basetemp = base
        config._vdsm_twisted_basetemp = base


def pytest_unconfigure(config):
    base = getattr(config, "_vdsm_twisted_basetemp", None)
    if base:
        shutil.rmtree(base, ignore_errors=True)
