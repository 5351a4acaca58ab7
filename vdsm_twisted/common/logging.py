"""
Log level control for daemons started by twistd.

twistd owns the log destination (stdout for systemd's journal, or
C{--logfile}); this module puts one level filter in front of it so the
configured C{log_level} applies and a reload can change it.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    textFileLogObserver,
)

_PREDICATE = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)


def set_level(name: str) -> None:
    """Apply a level name (debug, info, warn, error, critical) to every logger."""
    _PREDICATE.clearLogLevels()  # resets the default ("" namespace) level too
    _PREDICATE.defaultLogLevel = LogLevel.levelWithName(name)
    _PREDICATE.setLogLevelForNamespace("", _PREDICATE.defaultLogLevel)


def current_level() -> str:
    return _PREDICATE.logLevelForNamespace("").name


def observer_for(twistd_options: Any) -> ILogObserver | None:
    """The observer twistd would use, behind our level filter; None for syslog."""
    if twistd_options is None:
        return None
    try:
        if twistd_options.get("syslog"):
            return None
        logfile = twistd_options.get("logfile")
        if not logfile:
            logfile = "-" if twistd_options.get("nodaemon") else "twistd.log"
    except AttributeError:
        return None
    if logfile == "-":
        stream = sys.stdout
    else:
        from twisted.python.logfile import LogFile

        # twistd's 1 MB rotation is too small for an agent at debug level.
        stream = LogFile.fromFullPath(logfile, rotateLength=50_000_000, maxRotatedFiles=10)
    return FilteringLogObserver(textFileLogObserver(stream), [_PREDICATE])


class LevelledService(MultiService):
    """Wraps a daemon's service to register the filtered observer with twistd."""

    def __init__(self, inner: IService, twistd_options: Any):
        super().__init__()
        self.inner = inner
        self._twistd_options = twistd_options
        inner.setServiceParent(self)

    @classmethod
    def wrap(cls, inner: IService, twistd_options: Any) -> "LevelledService":
        return cls(inner, twistd_options)

    def setServiceParent(self, parent):
        # twistd asks the application for an ILogObserver before its default.
        observer = observer_for(self._twistd_options)
        if observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, observer)
        return super().setServiceParent(parent)
