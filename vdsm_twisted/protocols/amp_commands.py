"""
The engine API over AMP: the command boxes shared by server and client.

A call carries the same method name and params as JSON-RPC and answers with
the same shape as a JSON-RPC response minus the envelope (C{{"result": ...}}
or C{{"error": {"code": ..., "message": ...}}}), so both protocols share one
definition of every method and of every error code.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.protocols import amp

#: AMP limits one value to 65535 bytes; larger JSON spans numbered keys.
CHUNK = 65535


class BigJSON(amp.Argument):
    """A JSON value of any size, split over C{name}, C{name.1}, C{name.2} ..."""

    def toBox(self, name: bytes, strings: dict, objects: dict, proto: Any) -> None:
        data = json.dumps(objects[name.decode()], separators=(",", ":"),
                          allow_nan=False).encode("utf-8")
        chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
        strings[name] = chunks[0]
        for index, chunk in enumerate(chunks[1:], start=1):
            strings[name + b"." + str(index).encode()] = chunk

    def fromBox(self, name: bytes, strings: dict, objects: dict, proto: Any) -> None:
        if name not in strings:
            if self.optional:
                objects[name.decode()] = None
                return
            raise KeyError(name)
        parts = [strings[name]]
        index = 1
        while (key := name + b"." + str(index).encode()) in strings:
            parts.append(strings[key])
            index += 1
        objects[name.decode()] = json.loads(b"".join(parts))


class Call(amp.Command):
    """Run one API method (as JSON-RPC's C{method}/C{params})."""

    arguments = [
        (b"method", amp.Unicode()),
        (b"params", BigJSON()),
        (b"flow_id", amp.Unicode(optional=True)),
    ]
    response = [(b"response", BigJSON())]


class Subscribe(amp.Command):
    """Ask for event notifications (L{Event}) on this connection."""

    arguments = [(b"subscribe", amp.Boolean())]
    response = []


class Event(amp.Command):
    """Server to client: one notification (C{|virt|VM_status|<id>}, ...)."""

    arguments = [(b"method", amp.Unicode()), (b"params", BigJSON())]
    requiresAnswer = False
