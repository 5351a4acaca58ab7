"""Helpers for tests that run a real privd (twistd privd) and real interfaces."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

from twisted.protocols import amp

from tests import _procs


def unique(prefix: str = "vt") -> str:
    """An interface name nobody else uses (within the test config's prefixes)."""
    return prefix + secrets.token_hex(5)


def link_exists(name: str) -> bool:
    return os.path.lexists(f"/sys/class/net/{name}")


def ip_link(name: str) -> str:
    out = subprocess.run(["ip", "-o", "link", "show", "dev", name], capture_output=True, text=True)
    return out.stdout


def remove_links(*names: str) -> None:
    """Cleanup that works whatever privd did: taps first, then bridges."""
    for name in names:
        if link_exists(name):
            subprocess.run(["ip", "link", "del", "dev", name], capture_output=True)


def write_config(directory: Path, make_dir: bool = True, **overrides: str) -> tuple[Path, Path]:
    """A privd config in C{directory}; returns (config path, socket path)."""
    sock = directory / "privd" / "privd.sock"
    values = {
        ("privd", "socket"): str(sock),
        ("privd", "socket_group"): "vdsm",
        ("privd", "socket_mode"): "0666",  # let nobody reach the SO_PEERCRED check
        ("privd", "allowed_users"): "vdsm",
        ("privd", "max_box_size"): "4096",
        ("network", "tap_prefixes"): "vt",
        ("network", "bridge_prefixes"): "vt",
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        values[(section, name)] = value
    lines = []
    for section in sorted({s for s, _ in values}):
        lines.append(f"[{section}]")
        lines += [f"{n} = {v}" for (s, n), v in values.items() if s == section]
    # An existing directory is left as is: 0755 lets nobody reach the socket.
    if make_dir:
        sock.parent.mkdir(mode=0o755, exist_ok=True)
    path = directory / "privd.conf"
    path.write_text("\n".join(lines) + "\n")
    return path, sock


def can_connect(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class Privd:
    """One real privd process under twistd."""

    def __init__(self, code_dir: Path, directory: Path, config: Path, sock: Path):
        self.code_dir, self.directory, self.config, self.sock = code_dir, directory, config, sock
        self.log_path = directory / "privd.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Privd":
        self.proc = _procs.twistd(self.code_dir, "privd", ["--config", str(self.config)],
                                  log_path=self.log_path, cwd=str(self.directory))
        _procs.wait_for(lambda: self.proc.poll() is not None or can_connect(self.sock),
                        what="privd to listen")
        if self.proc.poll() is not None:
            raise AssertionError(f"privd exited: {self.output()}")
        return self

    def output(self) -> str:
        text = ""
        for path in (self.log_path, self.log_path.with_suffix(".out")):
            if path.exists():
                text += path.read_text(errors="replace")
        return text

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, 18)  # SIGCONT, in case a test stopped it
            _procs.stop(self.proc)


def run_client_script(code_dir: Path, sock: Path, user: str, *actions: dict,
                      timeout: float = 30.0) -> list[dict]:
    """Run tests/_privd_client_script.py as C{user}; returns its JSON lines."""
    proc = subprocess.run(
        [_procs.PYTHON, "-m", "tests._privd_client_script", str(sock), json.dumps(list(actions))],
        env=_procs.env_for(code_dir), cwd="/", capture_output=True, timeout=timeout,
        **_procs.user_kwargs(user))
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines() if line.startswith("{")]
    if proc.returncode != 0 and not lines:
        raise AssertionError(f"client script failed: {proc.stderr.decode()}")
    return lines


class RawAmp:
    """A bare AMP peer on a plain socket, to send what a real client never would."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(5.0)
        self.sock.connect(str(path))
        self._buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes, fds: list[int] = ()) -> None:
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def ask(self, command: bytes, tag: bytes = b"1", fds: list[int] = (), **args: bytes) -> amp.AmpBox:
        box = amp.AmpBox({b"_command": command, b"_ask": tag,
                          **{k.encode(): v for k, v in args.items()}})
        self.send(box.serialize(), fds)
        return self.read_box()

    def read_box(self) -> amp.AmpBox:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            boxes = amp.parseString(self._buffer) if self._buffer.endswith(b"\x00\x00") else []
            if boxes:
                self._buffer = b""
                return boxes[0]
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("privd closed the connection")
            self._buffer += data
        raise TimeoutError("no answer from privd")

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True
