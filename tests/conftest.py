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
def code_dir(tmp_path_factory):
    """A world-readable copy of the code, the PYTHONPATH of spawned daemons."""
    return _procs.code_copy(tmp_path_factory.mktemp("code"))


@pytest.fixture(scope="session")
def vdsm_user():
    """The unprivileged user the agent runs as (created by .ci/run)."""
    try:
        return pwd.getpwnam("vdsm")
    except KeyError:
        pytest.fail("user 'vdsm' is missing: run .ci/run or tools/bootstrap.sh first")


@pytest.fixture
def private_dir(tmp_path):
    """A private run directory that the vdsm user can enter."""
    os.chmod(tmp_path, 0o755)
    for parent in tmp_path.parents:
        if str(parent) in ("/", "/tmp"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o011)
    return tmp_path
