"""
A client for the agent's engine API (and for VDSM itself, over STOMP).

    d = connect("host1.example.com", pki_dir="/etc/pki/vdsm")
    d.addCallback(lambda client: client.call("Host.getCapabilities"))

Calls fail with L{vdsm_twisted.api.errors.ApiError} (the server's answer),
L{Disconnected} (the connection dropped mid-call: retry if it is safe) or
L{CallTimeout}.  The connection is re-established in the background;
methods marked idempotent in the API schema are re-sent after a reconnect.
"""

from __future__ import annotations

from twisted.internet import defer, endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint

from vdsm_twisted.client._base import CallTimeout, Client, ConnectFailed, Disconnected
from vdsm_twisted.client._tls import PkiError, client_tls_options

__all__ = ["connect", "connect_endpoint", "Client", "Disconnected", "CallTimeout",
           "ConnectFailed", "PkiError", "PROTOCOLS"]

PROTOCOLS = ("stomp", "amp")


def _reactor(reactor):
    if reactor is None:
        from twisted.internet import reactor
    return reactor


def connect_endpoint(endpoint: IStreamClientEndpoint, protocol: str = "stomp",
                     reactor=None, timeout: float = 30.0, retry_policy=None) -> Deferred:
    """
    Like L{connect} over any endpoint (tests use plain TCP).  Fires with a
    L{Client} once the first connection is ready, or fails with
    L{ConnectFailed}.
    """
    reactor = _reactor(reactor)
    if protocol == "stomp":
        from vdsm_twisted.client import _stomp
        make = _stomp.protocol_maker(reactor)
    elif protocol == "amp":
        from vdsm_twisted.client import _amp
        make = _amp.protocol_maker()
    else:
        raise ValueError(f"unknown protocol {protocol!r} (one of {', '.join(PROTOCOLS)})")
    client = Client(endpoint, make, reactor, timeout=timeout, retry_policy=retry_policy)
    return client.start()


def connect(host: str = "localhost", port: int = 54321, pki_dir: str = "/etc/pki/vdsm",
            protocol: str = "stomp", reactor=None, timeout: float = 30.0,
            verify_hostname: bool = True) -> Deferred:
    """
    Connect to an agent over mutual TLS; fires with a L{Client}, or fails
    with L{ConnectFailed} or L{PkiError} (the certificates are unreadable).
    """
    reactor = _reactor(reactor)
    try:
        options = client_tls_options(pki_dir, host, verify_hostname=verify_hostname)
    except PkiError:
        return defer.fail()
    tcp = endpoints.HostnameEndpoint(reactor, host, port, timeout=max(1, int(timeout)))
    return connect_endpoint(endpoints.wrapClientTLS(options, tcp), protocol=protocol,
                            reactor=reactor, timeout=timeout)
