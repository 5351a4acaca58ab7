"""What code is installed: a digest of the package files as they are on disk now."""

from __future__ import annotations

import hashlib
import os


#: Where the installed packages are, when the running image is a snapshot
#: (after an upgrade fell back to the previous build): set by the upgrader.
INSTALLED_ENV = "VDSM_TWISTED_INSTALLED"


def package_dirs() -> list[str]:
    """The installed package directories of the agent and privd."""
    if os.environ.get(INSTALLED_ENV):
        return os.environ[INSTALLED_ENV].split(os.pathsep)
    return running_dirs()


def running_dirs() -> list[str]:
    """The package directories this image was imported from."""
    import privd
    import vdsm_twisted

    return [os.path.dirname(os.path.abspath(m.__file__)) for m in (vdsm_twisted, privd)]


def snapshot(dest_root: str) -> str:
    """Copy the code this image runs under C{dest_root} (an upgrade's fallback).

    An image that already runs from a snapshot (it fell back) uses that one.
    """
    import shutil

    import twisted.plugins.vdsm_twisted_plugins as plugins
    import privd
    import vdsm_twisted

    dest_root = os.path.realpath(dest_root)
    running = running_dirs()
    home = os.path.dirname(os.path.realpath(running[0]))
    if os.path.dirname(home) == dest_root:
        return home
    digest = installed_code_digest(running)
    dest = os.path.join(dest_root, digest)
    if os.path.isdir(dest):
        return dest
    tmp = f"{dest}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for module in (vdsm_twisted, privd):
        src = os.path.dirname(os.path.abspath(module.__file__))
        shutil.copytree(src, os.path.join(tmp, module.__name__), ignore=ignore)
    os.makedirs(os.path.join(tmp, "twisted", "plugins"))
    shutil.copy2(plugins.__file__, os.path.join(tmp, "twisted", "plugins"))
    os.rename(tmp, dest)
    for name in os.listdir(dest_root):  # only the current one is ever needed
        if name != digest and not name.startswith(f"{digest}.tmp."):
            shutil.rmtree(os.path.join(dest_root, name), ignore_errors=True)
    return dest


def installed_code_digest(dirs: list[str] | None = None) -> str:
    """Changes when any .py file of the agent or privd is added, removed or rewritten."""
    h = hashlib.sha256()
    for top in sorted(dirs or package_dirs()):
        for root, subdirs, files in os.walk(top):
            subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(root, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                h.update(f"{os.path.relpath(path, top)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()
