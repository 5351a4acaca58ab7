"""
Fakes for testing code that uses L{vdsm_twisted.client}, without an agent.

    client = FakeClient({"Host.ping2": True, "VM.getStats": errors.NoSuchVM("gone")})
    ... code under test calls client.call(...) ...
    assert client.calls[0].method == "Host.ping2"
"""

from __future__ import annotations

from typing import Any, Callable

import attr
from twisted.internet import defer

from vdsm_twisted.api import errors
from vdsm_twisted.client._base import Disconnected


@attr.frozen
class RecordedCall:
    method: str
    params: Any
    timeout: float | None
    flow_id: str | None


class FakeClient:
    """
    Answers calls from a table: C{method -> value}, an exception instance
    to fail with, a Deferred, or a callable C{params -> any of those}.
    Unknown methods fail with L{errors.MethodNotFound}, as the agent does.
    """

    def __init__(self, results: dict[str, Any] | None = None):
        self.results = dict(results or {})
        self.calls: list[RecordedCall] = []
        self.event_callbacks: list[Callable[[str, Any], object]] = []
        self.closed = False

    def call(self, method: str, params: dict | list | None = None,
             timeout: float | None = None, flow_id: str | None = None) -> defer.Deferred:
        self.calls.append(RecordedCall(method, params, timeout, flow_id))
        if self.closed:
            return defer.fail(Disconnected("the client is closed"))
        if method not in self.results:
            return defer.fail(errors.MethodNotFound(f"Method not found: {method}"))
        value = self.results[method]
        if callable(value) and not isinstance(value, defer.Deferred):
            value = value(params)
        if isinstance(value, BaseException):
            return defer.fail(value)
        return defer.maybeDeferred(lambda: value)

    def subscribe_events(self, callback: Callable[[str, Any], object]) -> defer.Deferred:
        self.event_callbacks.append(callback)
        return defer.succeed(None)

    def emit(self, method: str, params: Any) -> None:
        """Deliver one event to the subscribers, as the server would."""
        for callback in list(self.event_callbacks):
            callback(method, params)

    def close(self) -> defer.Deferred:
        self.closed = True
        return defer.succeed(None)


class FakeConnect:
    """
    A stand-in for L{vdsm_twisted.client.connect}: records its arguments
    and fires with C{client}, or fails with C{error}.
    """

    def __init__(self, client: FakeClient | None = None, error: BaseException | None = None):
        self.client = client if client is not None or error is not None else FakeClient()
        self.error = error
        self.kwargs: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> defer.Deferred:
        self.kwargs.append(kwargs)
        if self.error is not None:
            return defer.fail(self.error)
        return defer.succeed(self.client)
