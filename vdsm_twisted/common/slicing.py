"""
Long synchronous work in slices, so the reactor serves in between.

Start-up has two such jobs: importing the VM side (tens of ms) and re-attaching
every VM (about a millisecond of parsing and bookkeeping each, so 100 VMs would
hold the reactor for 100 ms or more).  Done in one go they delay every TLS
handshake and Host call waiting in the meantime; done a slice per reactor turn
they interleave with them.  (Not a thread: this work holds the GIL.)
"""

from __future__ import annotations

import time
from typing import Any, Iterator

from twisted.internet import defer


def run_sliced(reactor: Any, steps: Iterator[Any], budget: float = 0.005) -> defer.Deferred:
    """Advance C{steps} (each C{next()} does one piece of work) for at most
    C{budget} seconds per reactor turn; fires with None once exhausted, or
    with the failure of the step that raised.  A budget of 0 is one step per
    turn.  The first slice runs on the next turn, never synchronously.
    """
    done: defer.Deferred = defer.Deferred()

    def turn():
        deadline = time.monotonic() + budget
        try:
            while True:
                next(steps)
                if time.monotonic() >= deadline:
                    break
        except StopIteration:
            done.callback(None)
            return
        except BaseException:  # noqa: BLE001 - handed to the caller
            done.errback()
            return
        reactor.callLater(0, turn)

    reactor.callLater(0, turn)
    return done
