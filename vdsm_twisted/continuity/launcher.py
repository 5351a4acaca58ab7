"""
The upgrade launcher: the first code an upgrade re-exec runs (stdlib only).

The old image execs this file *from its own snapshot* of the code it ran
(C{<run_dir>/code/<digest>/}), not from the freshly installed package, so the
launcher itself never changes underneath an upgrade.  It runs twistd with the
new code in this same process (the pid that owns every QEMU).  The new image
confirms by consuming the handoff file once it serves and has re-adopted
every VM.  If twistd returns, or nothing is confirmed within the timeout,
while the handoff is still there, the new build failed to start: the launcher
re-execs the same pid on the snapshot of the previous build, which adopts the
very same handoff.  VMs are never orphaned by a broken build.

    python launcher.py --handoff PATH --fallback DIR [--confirm-timeout S] -- TWISTD-ARGV...
"""

import os
import sys
import threading
import time

_TWISTD = ("import sys; from twisted.scripts.twistd import run; "
           "sys.argv[0] = 'twistd'; run()")


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    sys.stderr.write(f"{stamp} [vdsm-twisted launcher] {message}\n")
    sys.stderr.flush()


def _fall_back(handoff: str, fallback: str, twistd_args: list, why: str) -> None:
    """Re-exec on the previous build's snapshot; it adopts the same handoff."""
    _log(f"the new build did not start ({why}); falling back to the previous build "
         f"in {fallback}")
    env = dict(os.environ)
    env.setdefault("VDSM_TWISTED_ORIG_PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = fallback
    env["VDSM_TWISTED_HANDOFF"] = handoff
    env["VDSM_TWISTED_FELL_BACK"] = why
    os.execve(sys.executable, [sys.executable, "-c", _TWISTD, *twistd_args], env)


def main(argv: list) -> None:
    handoff, fallback, timeout = None, None, 60.0
    args = list(argv)
    while args and args[0] != "--":
        option = args.pop(0)
        if option == "--handoff":
            handoff = args.pop(0)
        elif option == "--fallback":
            fallback = args.pop(0)
        elif option == "--confirm-timeout":
            timeout = float(args.pop(0))
        else:
            raise SystemExit(f"launcher: unknown option {option}")
    twistd_args = args[1:]
    if not (handoff and fallback and twistd_args):
        raise SystemExit("launcher: --handoff, --fallback and a twistd command line are needed")

    def watchdog():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not os.path.exists(handoff):
                return  # confirmed
            time.sleep(0.1)
        _fall_back(handoff, fallback, twistd_args, f"not serving after {timeout:g}s")

    threading.Thread(target=watchdog, name="upgrade-watchdog", daemon=True).start()
    # This file's directory must not shadow anything of the new build.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(
        os.path.abspath(__file__))]
    sys.argv = ["twistd", *twistd_args]
    why = "twistd exited"
    try:
        from twisted.scripts.twistd import run

        run()
    except SystemExit as e:
        why = f"twistd exited ({e.code})"
    except BaseException as e:  # noqa: BLE001 - any failure of the new build
        why = f"{type(e).__name__}: {e}"
    if os.path.exists(handoff):
        _fall_back(handoff, fallback, twistd_args, why)


if __name__ == "__main__":
    main(sys.argv[1:])
