"""
Binds the API table (L{vdsm_twisted.api.schema}) to implementations.

An implementation is an object providing L{IApiNamespace}: it names its
namespace and has one method per verb.  L{Api.call} is the only entry point
the protocols use: it validates, gates on recovery, runs the verb and turns
any failure into an L{ApiError}.
"""

from __future__ import annotations

from typing import Any, Iterable

import attr
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from vdsm_twisted.api import errors
from vdsm_twisted.api.schema import METHODS, Method


class IApiNamespace(Interface):
    """Implements the verbs of one API namespace (C{Host}, C{VM}, ...)."""

    namespace = Attribute("The namespace name, as in the schema.")


@attr.frozen
class CallContext:
    """Who is calling, for logs and for verbs that need the connection."""

    protocol: str  # "stomp" or "amp"
    peer: str
    flow_id: str | None = None


class Api:
    """The dispatcher every protocol calls into."""

    log = Logger()

    def __init__(self, namespaces: Iterable[Any], methods: Iterable[Method] = METHODS):
        self._declared = {method.name: method for method in methods}
        self._impls: list = []
        self.methods: dict[str, Method] = {}
        self._handlers: dict[str, Any] = {}
        self.add(namespaces)
        #: True while VMs are being re-attached; VM calls answer code 99.
        self.recovering = False
        #: Calls running now (an upgrade drains them before it execs).
        self.in_flight = 0
        self._idle_waiters: list[tuple[int, defer.Deferred]] = []

    def add(self, namespaces: Iterable[Any]) -> None:
        """Serve more namespace objects (the VM side joins once it is loaded)."""
        self._impls += list(namespaces)
        impls: dict[str, list] = {}
        for ns in self._impls:
            impls.setdefault(ns.namespace, []).append(ns)
        for method in self._declared.values():
            # Several objects may serve one namespace; the first with the verb wins.
            handler = next((getattr(impl, method.verb) for impl in impls.get(method.namespace, ())
                            if hasattr(impl, method.verb)), None)
            if handler is None:
                continue  # declared for a later driver; unknown until implemented
            self.methods[method.name] = method
            self._handlers[method.name] = handler

    def call(self, name: Any, params: Any, context: CallContext) -> defer.Deferred:
        """Run one call; the Deferred fires with its result or an L{ApiError}."""
        return defer.maybeDeferred(self._call, name, params, context)

    def _call(self, name, params, context):
        if not isinstance(name, str):
            raise errors.InvalidRequest("method must be a string")
        method = self.methods.get(name)
        if method is None:
            if self.recovering and name in self._declared:
                # Its implementation is still loading (start-up): come back soon.
                self._declared[name].bind_params(params)
                raise errors.RecoveryInProgress()
            raise errors.MethodNotFound(f"Method not found: {name}")
        kwargs = method.bind_params(params)
        if self.recovering and not method.during_recovery:
            raise errors.RecoveryInProgress()
        self.log.debug("{proto} {peer} flow={flow} calls {method}",
                       proto=context.protocol, peer=context.peer,
                       flow=context.flow_id, method=name)
        self.in_flight += 1
        d = defer.maybeDeferred(self._handlers[name], **kwargs)
        d.addErrback(self._as_api_error, name, context)
        d.addBoth(self._call_done)
        return d

    def _call_done(self, result):
        self.in_flight -= 1
        ready = [(allowed, d) for allowed, d in self._idle_waiters if self.in_flight <= allowed]
        self._idle_waiters = [w for w in self._idle_waiters if w not in ready]
        for _, waiter in ready:
            waiter.callback(None)
        return result

    def idle(self, allowed: int = 0) -> defer.Deferred:
        """Fires once at most C{allowed} calls run (the caller's own, say)."""
        if self.in_flight <= allowed:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle_waiters.append((allowed, d))
        return d

    def _as_api_error(self, failure, name, context):
        if failure.check(errors.ApiError):
            return failure
        self.log.failure("{method} failed (flow={flow})", failure,
                         method=name, flow=context.flow_id)
        raise errors.GeneralError(
            f"General Exception: {failure.type.__name__}: {failure.getErrorMessage()}")
