"""Tests that "install a new build": a private code copy the agent runs from."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from tests import _procs


class PrivateBuild:
    """Mixin for trial TestCases: the stack runs from C{self.code}, a private
    copy that L{install_new_build} rewrites as a package upgrade would."""

    def code_for_stack(self) -> Path:
        if getattr(self, "code", None) is None:
            self.code = _procs.code_copy(Path(tempfile.mkdtemp(prefix="vt-code-")))
            self.addCleanup(shutil.rmtree, self.code, True)
        return self.code

    def install_new_build(self, breaking: bool = False, crashing: bool = False) -> None:
        """C{breaking}: it cannot even be imported (preflight catches it);
        C{crashing}: it imports fine but fails while starting (preflight cannot)."""
        target = self.code / "vdsm_twisted" / ("tap.py" if crashing else "_version.py")
        text = target.read_text()
        if breaking:
            text += "\nraise ImportError('this build is broken')\n"
        elif crashing:
            text += ("\n\ndef makeService(options):\n"
                     "    raise RuntimeError('this build crashes at start-up')\n")
        else:
            text += f"\n# rebuilt {time.time()}\n"
        target.write_text(text)
        # A new mtime even within the same clock tick.
        os.utime(target, ns=(time.time_ns(), time.time_ns() + 1000))
