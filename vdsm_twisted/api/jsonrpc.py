"""
JSON-RPC 2.0 over any message transport (STOMP here).

L{JsonRpcServer.handle} takes one message body and gives the body to send
back (or None when there is nothing to answer: notifications only).  As
VDSM does, a one-element batch is answered with a bare response object,
which VDSM's clients accept; larger batches get an array (JSON-RPC 2.0).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer

from vdsm_twisted.api import errors
from vdsm_twisted.api.registry import Api, CallContext


def _response(req_id: Any, result: Any = None, error: errors.ApiError | None = None) -> dict:
    if error is not None:
        return {"jsonrpc": "2.0", "id": req_id, "error": error.to_dict()}
    # A verb that returns nothing answers true (VDSM).
    return {"jsonrpc": "2.0", "id": req_id, "result": True if result is None else result}


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def notification(method: str, params: dict) -> bytes:
    """An event: a request without an id (PROTOCOL.md "Events")."""
    return encode({"jsonrpc": "2.0", "method": method, "params": params})


class JsonRpcServer:
    def __init__(self, api: Api, max_batch_size: int = 100):
        self.api = api
        self.max_batch_size = max_batch_size

    def handle(self, body: bytes, context: CallContext) -> defer.Deferred:
        """Answer one message; fires with the response bytes or None."""
        try:
            message = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return defer.succeed(encode(_response(None, error=errors.ParseError(f"Parse error: {e}"))))
        if isinstance(message, list):
            if not message:
                return defer.succeed(encode(_response(None, error=errors.InvalidRequest("empty batch"))))
            if len(message) > self.max_batch_size:
                return defer.succeed(encode(_response(None, error=errors.InvalidRequest(
                    f"batch of {len(message)} requests exceeds {self.max_batch_size}"))))
            d = defer.gatherResults([self._one(item, context) for item in message])
            d.addCallback(self._batch_done)
            return d
        d = self._one(message, context)
        d.addCallback(lambda response: None if response is None else _safe_encode(response))
        return d

    @staticmethod
    def _batch_done(responses):
        parts = [_safe_encode(r) for r in responses if r is not None]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return b"[" + b",".join(parts) + b"]"

    def _one(self, request: Any, context: CallContext) -> defer.Deferred:
        """One request object → a response dict, or None for a notification."""
        if not isinstance(request, dict):
            return defer.succeed(_response(None, error=errors.InvalidRequest("request must be an object")))
        req_id = request.get("id")
        is_notification = "id" not in request
        if request.get("jsonrpc") != "2.0" or not isinstance(request.get("method"), str) \
                or not isinstance(req_id, (str, int, type(None))) or isinstance(req_id, bool):
            return defer.succeed(_response(
                req_id if isinstance(req_id, (str, int)) else None,
                error=errors.InvalidRequest("not a JSON-RPC 2.0 request")))
        d = self.api.call(request["method"], request.get("params"), context)

        def ok(result):
            return None if is_notification else _response(req_id, result)

        def failed(failure):
            if is_notification:
                return None
            failure.trap(errors.ApiError)
            return _response(req_id, error=failure.value)

        d.addCallbacks(ok, failed)
        return d


def _safe_encode(response: dict) -> bytes:
    """Encode a response; a result JSON cannot carry becomes an internal error."""
    try:
        return encode(response)
    except (TypeError, ValueError) as e:
        return encode(_response(response.get("id"), error=errors.InternalError(
            f"result not serializable: {e}")))
