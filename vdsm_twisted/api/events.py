"""
Event notifications to subscribed clients (C{|virt|VM_status|<vmId>}, ...).

Producers (drivers, tasks) call L{EventBus.publish}; each protocol registers
one sink that forwards to its subscribed connections (STOMP: the event queue;
AMP: connections that sent C{Subscribe}).  A failing sink is logged and does
not stop the others.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.logger import Logger

Sink = Callable[[str, dict], None]


def vdsm_time_ms(monotonic: Callable[[], float] = time.monotonic) -> int:
    """VDSM's notify_time/statusTime: 2**31 - 1 + monotonic milliseconds."""
    return 2 ** 31 - 1 + int(monotonic() * 1000)


class EventBus:
    log = Logger()

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._sinks: list[Sink] = []
        self._clock = clock

    def add_sink(self, sink: Sink) -> Callable[[], None]:
        """Register C{sink(method, params)}; returns a function removing it."""
        self._sinks.append(sink)
        return lambda: self._sinks.remove(sink) if sink in self._sinks else None

    def publish(self, method: str, params: dict[str, Any]) -> None:
        params = dict(params)
        params.setdefault("notify_time", vdsm_time_ms(self._clock))
        for sink in list(self._sinks):
            try:
                sink(method, params)
            except Exception:
                self.log.failure("event sink failed for {method}", method=method)
