"""A service that runs one step every C{interval} seconds, with a changeable period."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import task
from twisted.logger import Logger


class PeriodicService(Service):
    """Calls L{step} every C{interval} seconds while running (samplers).

    The period can change at run time (a SIGHUP reload): the loop restarts on
    the new one.  A step that raises stops nothing but is logged by the loop.
    """

    log = Logger()

    def __init__(self, interval: float, clock=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.interval = interval
        self.clock = clock
        self._loop: task.LoopingCall | None = None

    def step(self):
        raise NotImplementedError

    def _start_loop(self, now: bool) -> None:
        self._loop = task.LoopingCall(self.step)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=now).addErrback(
            lambda f: self.log.failure("{name} stopped", f, name=type(self).__name__))

    def startService(self) -> None:
        super().startService()
        self._start_loop(now=True)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def set_interval(self, interval: float) -> None:
        if interval == self.interval:
            return
        self.interval = interval
        if self._loop is not None and self._loop.running:
            self._loop.stop()
            self._start_loop(now=False)
