"""
A process that spawns a ticking child, re-execs itself (same pid) keeping the
child's pidfd and pipe, adopts them, then kills the child: the primitives of
the upgrade re-exec, in isolation.

    python -m tests._reexec_child LOG            (first image)
    python -m tests._reexec_child LOG STATE      (after the exec)
"""

import json
import os
import signal
import sys

from twisted.internet import reactor

from vdsm_twisted.children.process import Child, spawn

TICKER = "import time, sys\nfor i in range(100000):\n    print(i, flush=True); time.sleep(0.005)\n"


def first(log: str) -> None:
    child = spawn(reactor, [sys.executable, "-c", TICKER], log_path=log, name="ticker")

    def exec_now():
        state = child.to_state()
        for fd in child.kept_fds():
            os.set_inheritable(fd, True)
        # The child keeps writing into the pipe while this process execs.
        os.execv(sys.executable, [sys.executable, "-m", "tests._reexec_child", log,
                                  json.dumps(state)])

    reactor.callLater(0.3, exec_now)
    reactor.run()


def second(log: str, state: str) -> None:
    child = Child.adopt(reactor, json.loads(state), inherited=True)

    def done(status):
        print(json.dumps({"pid": os.getpid(), "code": status.code, "signal": status.signal}))
        reactor.stop()

    child.exited.addCallback(done)
    reactor.callLater(0.3, child.send_signal, signal.SIGKILL)
    reactor.run()


if __name__ == "__main__":
    if len(sys.argv) == 2:
        first(sys.argv[1])
    else:
        second(sys.argv[1], sys.argv[2])
