"""
STOMP 1.2, the engine's main transport (PROTOCOL.md): frames and the server.
"""

from vdsm_twisted.protocols.stomp.frame import (
    HEARTBEAT, Frame, FrameError, FrameParser, encode_frame,
)
from vdsm_twisted.protocols.stomp.server import StompBroker, StompServerProtocol

__all__ = [
    "HEARTBEAT", "Frame", "FrameError", "FrameParser", "encode_frame",
    "StompBroker", "StompServerProtocol",
]
