"""
The handoff: what an agent image leaves for the image it C{execv}s into.

Written just before the exec (the reactor is about to vanish, so it is a
blocking write) and read once by the new image, which accepts it only if it
was written by this very process (same pid, boot and start time: an exec
changes none of them) and in a format it knows.  It names every fd kept open
across the exec (listening sockets, each child's pidfd and output pipe) and
every other fd that was inheritable, so the new image can close what it does
not claim.
"""

from __future__ import annotations

import os

from twisted.logger import Logger

from vdsm_twisted.state.store import StateError, decode, encode, write_atomic

#: Environment variable naming the handoff file for the next image.
ENV = "VDSM_TWISTED_HANDOFF"
KIND = "handoff"

log = Logger()


def inheritable_fds() -> list[int]:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            if os.get_inheritable(fd):
                fds.append(fd)
        except OSError:
            pass
    return sorted(fds)


def write(path: str, listening: list[dict], children: dict[str, dict], extra: dict,
          keep: list[int] = ()) -> None:
    """Mark the kept fds inheritable and record them (and the strays) in C{path}.

    C{keep}: further fds the next image claims by themselves (named in C{extra}).
    """
    kept = [entry["fd"] for entry in listening] + list(keep)
    for state in children.values():
        kept += [fd for fd in (state.get("pidfd"), state.get("output_fd")) if fd is not None]
    for fd in kept:
        os.set_inheritable(fd, True)
    data = {"listening": listening, "children": children, "kept_fds": sorted(kept),
            "stray_fds": [fd for fd in inheritable_fds() if fd not in kept], **extra}
    write_atomic(path, encode(KIND, "agent", data))


def take(path: str | None) -> dict | None:
    """Read the handoff; None (with a log line) when absent or not ours.

    The file stays until L{confirm}: while it exists the upgrade launcher
    considers the new image not yet started, and may fall back.
    """
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 22)
    except FileNotFoundError:
        log.warn("handoff {path} is missing: starting fresh (crash recovery path)", path=path)
        return None
    try:
        loaded = decode(raw, KIND)
        if not loaded.same_process:
            raise StateError(f"written by pid {loaded.writer.pid} (start "
                             f"{loaded.writer.start_time}, boot {loaded.writer.boot_id}), "
                             "not by this process")
    except StateError as e:
        log.error("handoff {path} refused: {error}", path=path, error=str(e))
        confirm(path)
        return None
    return loaded.data


def confirm(path: str) -> None:
    """The new image serves: the handoff is spent."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def close_unclaimed(handoff: dict, claimed: set[int]) -> list[int]:
    """Close inherited fds nobody claimed and restore CLOEXEC on the claimed ones."""
    closed = []
    for fd in handoff.get("kept_fds", []) + handoff.get("stray_fds", []):
        if fd in claimed:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
            continue
        try:
            os.close(fd)
            closed.append(fd)
        except OSError:
            pass
    return closed
