"""
A real stack for end-to-end tests: a dev PKI, privd (root) and the agent (as
the unprivileged vdsm user), each a C{twistd -n} process on private paths.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import ssl
import subprocess
import time
from pathlib import Path

import attr

from tests import _procs


def write_pki(directory: Path):
    from vdsm_twisted.tool.pki import create_pki

    gid = pwd.getpwnam("vdsm").pw_gid
    return create_pki(str(directory), hostname="localhost", owner_gid=gid)


@attr.s(auto_attribs=True)
class Stack:
    root: Path
    code_dir: Path
    port: int
    pki_dir: Path
    images: Path
    vmlogs: Path
    privd_socket: Path
    agent_conf: Path
    privd_conf: Path
    notify_socket: socket.socket | None = None
    agent: subprocess.Popen | None = None
    privd: subprocess.Popen | None = None

    def env(self, notify: bool) -> dict:
        extra = {}
        if notify and self.notify_socket is not None:
            extra["NOTIFY_SOCKET"] = self.notify_socket.getsockname()
        return _procs.env_for(self.code_dir, **extra)

    def start_privd(self, notify: bool = False):
        self.privd = _procs.twistd(self.code_dir, "privd", ["--config", str(self.privd_conf)],
                                   env=self.env(notify), log_path=self.root / "logs" / "privd.log")
        _procs.wait_for(lambda: self.privd_socket.exists() or self.privd.poll() is not None,
                        what="privd socket")
        assert self.privd.poll() is None, self.read_log("privd")
        return self.privd

    def start_agent(self, notify: bool = False, wait: bool = True):
        self.agent = _procs.twistd(self.code_dir, "vdsm", ["--config", str(self.agent_conf)],
                                   user="vdsm", env=self.env(notify),
                                   log_path=self.root / "logs" / "vdsm.log")
        if wait:
            self.wait_serving()
        return self.agent

    def wait_serving(self, timeout: float = 60.0):
        def up():
            if self.agent.poll() is not None:
                raise AssertionError("agent exited:\n" + self.read_log("vdsm"))
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                return False
        _procs.wait_for(up, timeout=timeout, what="the agent's port")

    def read_log(self, name: str) -> str:
        text = ""
        for suffix in (".log", ".out"):
            path = self.root / "logs" / f"{name}{suffix}"
            if path.exists():
                text += path.read_text(errors="replace")
        return text

    def tls_context(self, cert: str = "clientcert.pem", key: str = "clientkey.pem") -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki_dir / "certs" / "cacert.pem"))
        ctx.load_cert_chain(str(self.pki_dir / "certs" / cert), str(self.pki_dir / "keys" / key))
        return ctx

    def tls_socket(self, timeout: float = 10.0) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout)
        return self.tls_context().wrap_socket(raw, server_hostname="localhost")

    def cli(self, *args: str, protocol: str = "stomp", timeout: float = 60.0):
        """Run vdsm-twisted-client as a real process; returns (rc, stdout, stderr)."""
        cmd = [_procs.PYTHON, "-m", "vdsm_twisted.client.cli", "--host", "localhost",
               "--port", str(self.port), "--pki", str(self.pki_dir), "--protocol", protocol, *args]
        proc = subprocess.run(cmd, env=_procs.env_for(self.code_dir), capture_output=True,
                              timeout=timeout, text=True)
        return proc.returncode, proc.stdout, proc.stderr

    def call(self, namespace: str, verb: str, *params: str, protocol: str = "stomp"):
        rc, out, err = self.cli(namespace, verb, *params, protocol=protocol)
        assert rc == 0, f"rc={rc} stderr={err}"
        return json.loads(out)

    def client(self, protocol: str = "stomp"):
        """A Deferred client of the library (in this process, for trial tests)."""
        from vdsm_twisted.client import connect

        return connect("localhost", self.port, str(self.pki_dir), protocol=protocol, timeout=30)

    def stop_other_agents(self) -> None:
        """A standby that took over is nobody's Popen: stop the agents that
        remain, serving ones first (each stops its own standby cleanly)."""
        for _ in range(3):
            pids = _procs.processes_mentioning(self.agent_conf)
            if not pids:
                break
            for pid in [p for p, parent in pids.items() if parent not in pids]:
                _procs.stop_pid(pid)

    def serving_pid(self) -> int | None:
        """The agent that serves now (after a takeover, the former standby)."""
        try:
            return int((self.root / "run" / "agent.pid").read_text())
        except (OSError, ValueError):
            return None

    def stop(self):
        for proc in (self.agent, self.privd):
            if proc is not None:
                _procs.stop(proc)
        self.stop_other_agents()
        # VMs outlive the agent by design: the test must end its own QEMUs.
        subprocess.run(["pkill", "-KILL", "-f", f"qemu-system.*{self.root}/"], capture_output=True)
        if self.notify_socket is not None:
            self.notify_socket.close()


def make_stack(root: Path, code_dir: Path, notify: bool = False,
               pki_dir: Path | None = None, images: Path | None = None,
               standby: bool = False) -> Stack:
    """C{pki_dir}/C{images}: share another stack's CA and image root (a second
    host of the same cluster, e.g. a migration destination).  C{standby}: keep
    the warm standby agent (off by default: one more Python per stack)."""
    os.chmod(root, 0o755)
    port = _procs.free_port()
    if pki_dir is None:
        pki_dir = root / "pki"
        write_pki(pki_dir)
    run_dir = root / "run"
    run_dir.mkdir()
    vdsm = pwd.getpwnam("vdsm")
    os.chown(run_dir, vdsm.pw_uid, vdsm.pw_gid)
    (root / "hooks").mkdir(mode=0o755)
    logs = root / "logs"
    logs.mkdir()
    os.chown(logs, vdsm.pw_uid, vdsm.pw_gid)
    if images is None:
        images = root / "images"
        images.mkdir()
        os.chown(images, vdsm.pw_uid, vdsm.pw_gid)  # a storage domain the agent writes
    vmlogs = root / "vmlogs"
    vmlogs.mkdir()
    os.chown(vmlogs, vdsm.pw_uid, vdsm.pw_gid)
    os.chmod(images, 0o755)
    privd_dir = root / "privd"
    privd_dir.mkdir()
    os.chmod(privd_dir, 0o755)
    privd_socket = privd_dir / "privd.sock"
    agent_conf = root / "vdsm.conf"
    agent_conf.write_text(f"""
[addresses]
management_ip = 127.0.0.1
management_port = {port}

[tls]
pki_dir = {pki_dir}
handshake_timeout = 5

[privd]
socket = {privd_socket}
call_timeout = 5
reconnect_max_delay = 0.5

[agent]
run_dir = {run_dir}
log_level = debug
host_uuid_file = {root}/no-such-vdsm.id
standby = {"true" if standby else "false"}

[hooks]
dir = {root}/hooks
timeout = 3

[sampling]
host_stats_interval = 0.5
vm_stats_interval = 0.5

[vm]
image_roots = {images}
log_dir = {vmlogs}
destroy_grace_timeout = 2
sigterm_timeout = 2
qmp_timeout = 3
vnc_display_base = 40
""")
    privd_conf = root / "privd.conf"
    privd_conf.write_text(f"""
[privd]
socket = {privd_socket}
socket_group = vdsm
allowed_users = vdsm
log_level = debug

[network]
tap_prefixes = vnet
bridge_prefixes = vtb
""")
    for path in (agent_conf, privd_conf):
        os.chmod(path, 0o644)
    notify_socket = None
    if notify:
        notify_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_socket.bind(str(root / "notify.sock"))
        os.chmod(root / "notify.sock", 0o777)
        notify_socket.settimeout(30)
    return Stack(root=root, code_dir=code_dir, port=port, pki_dir=pki_dir, images=images,
                 vmlogs=vmlogs,
                 privd_socket=privd_socket, agent_conf=agent_conf, privd_conf=privd_conf,
                 notify_socket=notify_socket)


def read_notifications(sock: socket.socket, until: str, timeout: float = 20.0) -> list[str]:
    """Datagrams received until one contains C{until}."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except socket.timeout:
            break
        seen.append(data)
        if until in data:
            return seen
    raise AssertionError(f"no {until!r} notification; got {seen}")
