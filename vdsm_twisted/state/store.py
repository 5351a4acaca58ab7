"""
Atomic, versioned state files in the run directory (tmpfs).

Each driver keeps its small state (seed 001: child pids, fds, sockets, active
flags) in one JSON document per object, written whole as tmp + fsync +
rename so a reader sees the old or the new file, never half of one.  Every
document carries a magic naming the agent that wrote it (pid, boot id,
process start time) and a format version, so a loader can tell its own state
(after a re-exec: same pid and start time), a crashed predecessor's (same
boot), and stale or foreign files (another boot, another format).

Writes run on a single dedicated thread, in order, off the reactor.
"""

from __future__ import annotations

import json
import os
from typing import Any

import attr
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from vdsm_twisted.children.process import boot_id, start_time

FORMAT_VERSION = 1
MAGIC = "vdsm-twisted-state"

log = Logger()


class StateError(Exception):
    """A state file is unreadable, truncated, foreign or of another format."""


@attr.frozen
class Writer:
    """Who wrote a document: the agent process identity."""

    pid: int
    start_time: int
    boot_id: str

    @classmethod
    def current(cls) -> "Writer":
        pid = os.getpid()
        return cls(pid=pid, start_time=start_time(pid) or 0, boot_id=boot_id())


@attr.frozen
class Loaded:
    """A state document and how it relates to the running agent."""

    kind: str
    key: str
    data: dict
    writer: Writer

    @property
    def same_boot(self) -> bool:
        return self.writer.boot_id == boot_id()

    @property
    def same_process(self) -> bool:
        """Written by this very process image lineage (an upgrade re-exec)."""
        return self.same_boot and self.writer.pid == os.getpid() \
            and self.writer.start_time == start_time(os.getpid())


def encode(kind: str, key: str, data: dict, writer: Writer | None = None) -> bytes:
    writer = writer or Writer.current()
    return json.dumps({
        "magic": MAGIC, "version": FORMAT_VERSION, "kind": kind, "key": key,
        "writer": attr.asdict(writer), "data": data,
    }, sort_keys=True, separators=(",", ":")).encode()


def decode(raw: bytes, kind: str | None = None) -> Loaded:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise StateError(f"not JSON (truncated or corrupt): {e}") from None
    if not isinstance(doc, dict) or doc.get("magic") != MAGIC:
        raise StateError("foreign file: no vdsm-twisted magic")
    if doc.get("version") != FORMAT_VERSION:
        raise StateError(f"state format {doc.get('version')!r}, this agent reads {FORMAT_VERSION}")
    if kind is not None and doc.get("kind") != kind:
        raise StateError(f"kind {doc.get('kind')!r}, expected {kind!r}")
    try:
        writer = Writer(**doc["writer"])
        if not isinstance(doc["data"], dict) or not isinstance(doc["key"], str):
            raise TypeError("data must be an object")
    except (KeyError, TypeError) as e:
        raise StateError(f"malformed state document: {e}") from None
    return Loaded(kind=doc["kind"], key=doc["key"], data=doc["data"], writer=writer)


def write_atomic(path: str, payload: bytes, mode: int = 0o600) -> None:
    """tmp + fsync + rename + fsync(dir): the file is old or new, never partial."""
    directory = os.path.dirname(path) or "."
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class StateStore:
    """One directory of state documents, C{<dir>/<kind>/<key>.json}."""

    def __init__(self, directory: str, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.directory = directory
        self._pool = ThreadPool(minthreads=0, maxthreads=1, name="state-writer")
        self._started = False
        #: path -> the bytes on disk as far as we know (written or loaded by us):
        #: a save of the same bytes is skipped, which keeps an upgrade's exec
        #: window from rewriting (and fsyncing) every unchanged VM document.
        self._on_disk: dict[str, bytes] = {}

    def _path(self, kind: str, key: str) -> str:
        if not key or "/" in key or key.startswith(".") or "/" in kind:
            raise ValueError(f"bad state key {kind}/{key}")
        return os.path.join(self.directory, kind, f"{key}.json")

    def start(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        if not self._started:
            self._pool.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self._pool.stop()
            self._started = False

    def save(self, kind: str, key: str, data: dict) -> defer.Deferred:
        """Write one document in the background; writes land in call order."""
        payload = encode(kind, key, data)
        path = self._path(kind, key)
        return threads.deferToThreadPool(self._reactor, self._pool, self._save_sync, path, payload)

    def save_now(self, kind: str, key: str, data: dict) -> bool:
        """Blocking write, for the moment just before an exec (after L{stop}:
        no background write is pending).  False when the file already holds
        exactly this document."""
        path, payload = self._path(kind, key), encode(kind, key, data)
        if self._on_disk.get(path) == payload:
            return False
        self._save_sync(path, payload)
        return True

    def _save_sync(self, path: str, payload: bytes) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self._on_disk.pop(path, None)
        write_atomic(path, payload)
        self._on_disk[path] = payload

    def remove(self, kind: str, key: str) -> defer.Deferred:
        path = self._path(kind, key)
        self._on_disk.pop(path, None)
        return threads.deferToThreadPool(self._reactor, self._pool, self._remove_sync, path)

    def _remove_sync(self, path: str) -> None:
        self._on_disk.pop(path, None)
        _unlink_quietly(path)

    def load_all(self, kind: str) -> tuple[list[Loaded], list[tuple[str, StateError]]]:
        """Every readable document of C{kind}, and the files that were refused."""
        good, bad = [], []
        directory = os.path.join(self.directory, kind)
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return good, bad
        for name in names:
            path = os.path.join(directory, name)
            if not name.endswith(".json"):
                # A write interrupted by a crash (not one of ours in progress).
                if ".json.tmp." in name and not name.endswith(f".tmp.{os.getpid()}"):
                    _unlink_quietly(path)
                continue
            try:
                with open(path, "rb") as f:
                    raw = f.read(1 << 22)
                loaded = decode(raw, kind)
                if loaded.key != name[:-5]:
                    raise StateError(f"key {loaded.key!r} does not match the file name")
                good.append(loaded)
                self._on_disk[path] = raw
            except (OSError, StateError) as e:
                err = e if isinstance(e, StateError) else StateError(str(e))
                log.warn("state file {path} refused: {error}", path=path, error=str(err))
                bad.append((path, err))
        return good, bad


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
