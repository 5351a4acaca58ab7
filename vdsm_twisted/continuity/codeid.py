"""What code is installed: a digest of the package files as they are on disk now."""

from __future__ import annotations

import hashlib
import os


def _package_dirs() -> list[str]:
    import privd
    import vdsm_twisted

    return [os.path.dirname(os.path.abspath(m.__file__)) for m in (vdsm_twisted, privd)]


def installed_code_digest(dirs: list[str] | None = None) -> str:
    """Changes when any .py file of the agent or privd is added, removed or rewritten."""
    h = hashlib.sha256()
    for top in sorted(dirs or _package_dirs()):
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
