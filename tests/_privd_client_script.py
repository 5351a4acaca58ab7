"""
The agent's privd client in a separate, unprivileged process (the tests run it
as the real C{vdsm} user, and as C{nobody}).

Usage: python -m tests._privd_client_script SOCKET '[{"op": ...}, ...]'

Runs the actions in order and prints one JSON line per step, stopping at the
first error: ping; ensure_bridge / delete_bridge (name); create_tap (name, bridge): create a tap owned by this
process's uid, write one Ethernet frame to its fd, then read frames from the
fd until one carries C{expect} (sent by the test); wait (a line on stdin);
delete_tap (name).
"""

from __future__ import annotations

import json
import os
import select
import sys
import time

from twisted.internet import defer, task, threads

from vdsm_twisted.privdclient import PrivdClient, PrivdError


def emit(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def frame(payload: bytes) -> bytes:
    dst, src = bytes.fromhex("02aabbccdd01"), bytes.fromhex("02aabbccdd02")
    return (dst + src + b"\x88\xb5" + payload).ljust(60, b"\0")


def read_until(fd: int, marker: bytes, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            data = os.read(fd, 65536)
            if marker in data:
                return True
    return False


@defer.inlineCallbacks
def main(reactor, sock: str, actions_json: str):
    client = PrivdClient(sock, call_timeout=10.0, max_delay=1.0, reactor=reactor)
    client.startService()
    try:
        for action in json.loads(actions_json):
            op = action["op"]
            try:
                if op == "ping":
                    result = yield client.ping()
                    emit(op=op, ok=True, result=result)
                elif op == "create_tap":
                    tap = yield client.create_tap(action["name"], os.getuid(), bridge=action.get("bridge"))
                    emit(op=op, ok=True, name=tap.name, fd_is_open=os.fstat(tap.fd) is not None)
                    written = os.write(tap.fd, frame(b"from-client"))
                    emit(op="written", ok=True, bytes=written)
                    got = yield threads.deferToThread(read_until, tap.fd, action["expect"].encode(), 10.0)
                    emit(op="read", ok=got)
                    tap.close()
                elif op == "ensure_bridge":
                    created = yield client.ensure_bridge(action["name"])
                    emit(op=op, ok=True, created=created)
                elif op == "delete_bridge":
                    yield client.delete_bridge(action["name"])
                    emit(op=op, ok=True)
                elif op == "wait":
                    yield threads.deferToThread(sys.stdin.readline)
                elif op == "delete_tap":
                    yield client.delete_tap(action["name"])
                    emit(op=op, ok=True)
                else:
                    raise ValueError(f"unknown op {op!r}")
            except PrivdError as e:
                emit(op=op, ok=False, error=type(e).__name__, message=str(e))
                return
    finally:
        yield client.stopService()


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
