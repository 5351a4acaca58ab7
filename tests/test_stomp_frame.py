"""STOMP 1.2 frame encoding and incremental parsing."""

import time

import pytest

from vdsm_twisted.protocols.stomp.frame import (
    HEARTBEAT, Frame, FrameError, FrameParser, encode_frame,
)


def parse(data: bytes, max_size: int = 1 << 20) -> list:
    return FrameParser(max_size).feed(data)


# -- Frame


def test_header_first_occurrence_wins():
    frame = Frame("SEND", (("a", "1"), ("b", "2"), ("a", "3")))
    assert frame.header("a") == "1"
    assert frame.header("b") == "2"
    assert frame.header("c") is None
    assert frame.header("c", "x") == "x"


def test_frame_headers_normalized_to_tuple():
    frame = Frame("SEND", [["a", "1"]])
    assert frame.headers == (("a", "1"),)
    assert Frame("SEND", {"x": "y"}).headers == (("x", "y"),)


# -- encoding


def test_encode_without_body():
    assert encode_frame(Frame("RECEIPT", (("receipt-id", "r1"),))) == \
        b"RECEIPT\nreceipt-id:r1\n\n\x00"


def test_encode_adds_content_length_last():
    frame = Frame("SEND", (("destination", "q"),), b"hello")
    assert encode_frame(frame) == b"SEND\ndestination:q\ncontent-length:5\n\nhello\x00"


def test_encode_keeps_caller_content_length():
    frame = Frame("SEND", (("content-length", "5"), ("destination", "q")), b"hello")
    assert encode_frame(frame) == b"SEND\ncontent-length:5\ndestination:q\n\nhello\x00"


def test_encode_escapes_headers():
    frame = Frame("MESSAGE", (("a:b", "x\\y\nz\r:"),))
    assert encode_frame(frame) == b"MESSAGE\na\\cb:x\\\\y\\nz\\r\\c\n\n\x00"


def test_encode_connect_frames_not_escaped():
    assert encode_frame(Frame("CONNECTED", (("server", "a:b"),))) == \
        b"CONNECTED\nserver:a:b\n\n\x00"
    assert encode_frame(Frame("CONNECT", (("login", "a:b"),))) == \
        b"CONNECT\nlogin:a:b\n\n\x00"


def test_heartbeat_constant():
    assert HEARTBEAT == b"\n"


def test_roundtrip_with_escapes_and_binary_body():
    frame = Frame("SEND", (("destination", "a\nb:c\\d"), ("x", "")), b"\x00\x01body\x00")
    [parsed] = parse(encode_frame(frame))
    assert parsed.command == "SEND"
    assert parsed.header("destination") == "a\nb:c\\d"
    assert parsed.header("x") == ""
    assert parsed.body == b"\x00\x01body\x00"


# -- parsing


def test_parse_body_to_nul_and_heartbeats_skipped():
    data = b"\n\r\n\nSEND\ndestination:q\n\nabc\x00\n\nSUBSCRIBE\nid:1\n\n\x00\n"
    frames = parse(data)
    assert frames == [
        Frame("SEND", (("destination", "q"),), b"abc"),
        Frame("SUBSCRIBE", (("id", "1"),), b""),
    ]


def test_parse_crlf_lines():
    frames = parse(b"SEND\r\ndestination:q\r\nreply-to:r\r\n\r\nbody\x00")
    assert frames == [Frame("SEND", (("destination", "q"), ("reply-to", "r")), b"body")]


def test_parse_header_values_keep_colons_and_spaces():
    [frame] = parse(b"SEND\nx: a:b \n\n\x00")
    assert frame.header("x") == " a:b "


def test_parse_connect_headers_not_unescaped():
    [frame] = parse(b"CONNECT\nlogin:a\\nb\n\n\x00")
    assert frame.header("login") == "a\\nb"


def test_parse_content_length_body_may_hold_nul():
    [frame] = parse(b"SEND\ncontent-length:3\n\na\x00b\x00")
    assert frame.body == b"a\x00b"


def test_parse_incremental_one_byte_at_a_time():
    frames_in = [
        Frame("SEND", (("destination", "q"), ("k", "v:\n"), ("content-length", "8")), b'{"a": 1}'),
        Frame("SEND", (("destination", "q"), ("content-length", "2")), b"\x00\x00"),
        Frame("DISCONNECT", (("receipt", "77"),)),
    ]
    data = b"\n".join(encode_frame(f) for f in frames_in) + b"\n"
    parser = FrameParser(1000)
    got = []
    for i in range(len(data)):
        got.extend(parser.feed(data[i:i + 1]))
        if i < len(data) - 2:
            assert parser.has_partial_frame or data[i:i + 1] in (b"\x00", b"\n")
    assert got == frames_in
    assert not parser.has_partial_frame


def test_parse_not_quadratic():
    # 1 MB delivered one byte at a time: a parser re-scanning its buffer on
    # every byte would take minutes here.
    body = b"x" * (1 << 20)
    data = encode_frame(Frame("SEND", (("destination", "q"),), body))
    for strip_length in (False, True):
        if strip_length:  # body terminated by NUL only
            data = b"SEND\ndestination:q\n\n" + body + b"\x00"
        parser = FrameParser(2 << 20)
        start = time.monotonic()
        got = []
        feed = parser.feed
        for i in range(len(data)):
            got.extend(feed(data[i:i + 1]))
        assert time.monotonic() - start < 10
        assert len(got) == 1 and got[0].body == body


def test_has_partial_frame():
    parser = FrameParser(100)
    assert not parser.has_partial_frame
    assert parser.feed(b"\n\r\n") == []
    assert not parser.has_partial_frame
    parser.feed(b"SE")
    assert parser.has_partial_frame


@pytest.mark.parametrize("data, reason", [
    (b"FOO\n\n\x00", "unknown command"),
    (b"SEND\nnocolon\n\n\x00", "without ':'"),
    (b"SEND\nx:a\\tb\n\n\x00", "invalid escape"),
    (b"SEND\nx:a\\\n\n\x00", "invalid escape"),
    (b"SEND\ncontent-length:-1\n\n\x00", "invalid content-length"),
    (b"SEND\ncontent-length:abc\n\n\x00", "invalid content-length"),
    (b"SEND\ncontent-length:+3\n\nabc\x00", "invalid content-length"),
    (b"SEND\ncontent-length:2\n\nabc\x00", "not followed by NUL"),
    (b"SEND\nx:\xff\xfe\n\n\x00", "UTF-8"),
    (b"\xffSEND\n\n\x00", "UTF-8"),
])
def test_parse_errors(data, reason):
    with pytest.raises(FrameError) as info:
        parse(data)
    assert reason in info.value.message


def test_server_commands_refused_when_restricted():
    parser = FrameParser(100, frozenset({"SEND"}))
    with pytest.raises(FrameError, match="unknown command"):
        parser.feed(b"MESSAGE\n\n\x00")


def test_frame_of_exactly_max_size_accepted():
    data = b"SEND\n\nabc\x00"
    assert len(parse(data, max_size=len(data))) == 1
    with pytest.raises(FrameError, match=f"frame exceeds {len(data) - 1} bytes"):
        parse(data, max_size=len(data) - 1)


def test_oversized_content_length_refused_before_body_arrives():
    parser = FrameParser(100)
    with pytest.raises(FrameError, match="exceeds 100 bytes"):
        parser.feed(b"SEND\ncontent-length:1000\n\n")


def test_oversized_partial_frame_refused_while_buffering():
    parser = FrameParser(100)
    parser.feed(b"SEND\n\n" + b"x" * 90)
    with pytest.raises(FrameError, match="exceeds 100 bytes"):
        parser.feed(b"x" * 20)


def test_oversized_header_block_refused():
    parser = FrameParser(100)
    with pytest.raises(FrameError, match="exceeds 100 bytes"):
        parser.feed(b"SEND\nx:" + b"y" * 200)


def test_many_small_frames_do_not_count_toward_size():
    data = encode_frame(Frame("SEND", (("destination", "q"),), b"x" * 50)) * 100
    assert len(parse(data, max_size=100)) == 100
