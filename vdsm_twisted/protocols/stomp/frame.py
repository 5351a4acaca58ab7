"""
STOMP 1.2 frames: the record, the encoder and an incremental parser.

The parser keeps a cursor into its buffer so that data arriving one byte at
a time costs linear time, and it refuses anything larger than a configured
size before buffering it, so one client cannot make the daemon hold an
unbounded amount of memory.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import attr

#: A heartbeat: a bare end-of-line between frames.
HEARTBEAT = b"\n"

CLIENT_COMMANDS = frozenset({
    "CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK",
    "BEGIN", "COMMIT", "ABORT", "DISCONNECT",
})
SERVER_COMMANDS = frozenset({"CONNECTED", "MESSAGE", "RECEIPT", "ERROR"})
ALL_COMMANDS = CLIENT_COMMANDS | SERVER_COMMANDS

# STOMP 1.2: header values of CONNECT and CONNECTED are not escaped, so that
# 1.0 peers can still read them.
_RAW_HEADER_COMMANDS = frozenset({"CONNECT", "CONNECTED"})

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", ":": "\\c"}
_UNESCAPES = {"\\": "\\", "n": "\n", "r": "\r", "c": ":"}


class FrameError(Exception):
    """The peer sent something that is not a STOMP 1.2 frame we accept."""

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


def _headers(value: Iterable | Mapping) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple((str(name), str(val)) for name, val in items)


@attr.frozen
class Frame:
    command: str
    headers: tuple[tuple[str, str], ...] = attr.ib(default=(), converter=_headers)
    body: bytes = b""

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of C{name}: STOMP 1.2 says repeats are ignored."""
        for key, value in self.headers:
            if key == name:
                return value
        return default


def _escape(text: str) -> str:
    if not any(c in text for c in _ESCAPES):
        return text
    return "".join(_ESCAPES.get(c, c) for c in text)


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    out = []
    chars = iter(text)
    for c in chars:
        if c != "\\":
            out.append(c)
            continue
        nxt = next(chars, "")
        if nxt not in _UNESCAPES:
            raise FrameError(f"invalid escape sequence \\{nxt} in header")
        out.append(_UNESCAPES[nxt])
    return "".join(out)


def encode_frame(frame: Frame) -> bytes:
    """Serialize C{frame}; adds C{content-length} for a body unless set."""
    raw = frame.command in _RAW_HEADER_COMMANDS
    lines = [frame.command]
    has_length = False
    for name, value in frame.headers:
        if name == "content-length":
            has_length = True
        if raw:
            lines.append(f"{name}:{value}")
        else:
            lines.append(f"{_escape(name)}:{_escape(value)}")
    if frame.body and not has_length:
        lines.append(f"content-length:{len(frame.body)}")
    head = "\n".join(lines).encode("utf-8")
    return head + b"\n\n" + frame.body + b"\x00"


# Parser states.
_COMMAND, _HEADERS, _BODY = range(3)


class FrameParser:
    """
    Turns a byte stream into L{Frame}s.

    C{max_frame_size} bounds a frame (command, headers, body and NUL); a
    frame that is, or is about to become, larger raises L{FrameError}.
    """

    def __init__(self, max_frame_size: int, commands: frozenset[str] = ALL_COMMANDS):
        self.max_frame_size = max_frame_size
        self.commands = commands
        self._buf = bytearray()
        self._reset(0)

    def _reset(self, start: int) -> None:
        self._start = start      # where the current frame begins
        self._line_start = start  # where the line being read begins
        self._scan = start       # nothing before this needs to be looked at again
        self._state = _COMMAND
        self._command: str | None = None
        self._header_list: list[tuple[str, str]] = []
        self._body_start = 0
        self._length: int | None = None

    @property
    def has_partial_frame(self) -> bool:
        """True if a frame has begun but not ended (heartbeats do not count)."""
        return bool(bytes(self._buf[self._start:]).strip(b"\r\n"))

    def feed(self, data: bytes) -> list[Frame]:
        """Add C{data}; returns the frames it completed, in order."""
        self._buf += data
        frames = []
        while True:
            frame = self._step()
            if frame is None:
                break
            frames.append(frame)
        if self._start:
            # Drop consumed bytes once per call (not per byte).
            del self._buf[:self._start]
            shift = self._start
            self._start = 0
            self._scan -= shift
            self._line_start -= shift
            if self._state == _BODY:
                self._body_start -= shift
        self._check_size()
        return frames

    def _check_size(self) -> None:
        if len(self._buf) - self._start > self.max_frame_size:
            raise FrameError(f"frame exceeds {self.max_frame_size} bytes")

    def _line(self) -> str | None:
        """The next complete line (without EOL), or None; advances the cursor."""
        end = self._buf.find(b"\n", self._scan)
        if end < 0:
            self._scan = len(self._buf)
            self._check_size()
            return None
        raw = self._buf[self._line_start:end]
        self._line_start = self._scan = end + 1
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("command or header is not valid UTF-8") from None

    def _step(self) -> Frame | None:
        if self._state == _COMMAND:
            while True:
                line = self._line()
                if line is None:
                    return None
                if line:
                    break
                # An EOL between frames is a heartbeat.
                self._start = self._scan
            if line not in self.commands:
                raise FrameError(f"unknown command {line[:64]!r}")
            self._command = line
            self._state = _HEADERS
        if self._state == _HEADERS:
            raw = self._command in _RAW_HEADER_COMMANDS
            while True:
                line = self._line()
                if line is None:
                    return None
                if not line:
                    break
                name, sep, value = line.partition(":")
                if not sep:
                    raise FrameError(f"header line without ':': {line[:64]!r}")
                if not raw:
                    name, value = _unescape(name), _unescape(value)
                self._header_list.append((name, value))
            self._body_start = self._scan
            self._length = self._content_length()
            if self._length is not None and \
                    self._body_start - self._start + self._length + 1 > self.max_frame_size:
                raise FrameError(f"frame exceeds {self.max_frame_size} bytes")
            self._state = _BODY
        # _BODY
        if self._length is not None:
            end = self._body_start + self._length
            if len(self._buf) <= end:
                self._check_size()
                return None
            if self._buf[end] != 0:
                raise FrameError("frame body is not followed by NUL after content-length bytes")
        else:
            end = self._buf.find(b"\x00", self._scan)
            if end < 0:
                self._scan = len(self._buf)
                self._check_size()
                return None
        if end + 1 - self._start > self.max_frame_size:
            raise FrameError(f"frame exceeds {self.max_frame_size} bytes")
        frame = Frame(self._command, tuple(self._header_list), bytes(self._buf[self._body_start:end]))
        self._reset(end + 1)
        return frame

    def _content_length(self) -> int | None:
        for name, value in self._header_list:
            if name == "content-length":
                if not (value.isascii() and value.isdigit()):
                    raise FrameError(f"invalid content-length {value[:32]!r}")
                return int(value)
        return None
