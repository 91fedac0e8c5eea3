"""Folding of lines over 998 octets (RFC 5322 section 2.1.1)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sluice.reception.lines import MAX_LINE, fold_long_lines


def lines_of(body: bytes) -> list[bytes]:
    return body.split(b"\r\n")


def test_short_lines_are_left_alone_and_not_copied():
    body = b"Subject: x\r\n\r\n" + b"a" * MAX_LINE + b"\r\n"
    assert fold_long_lines(body) is body


def test_long_body_line_is_broken_with_crlf_space():
    body = b"Subject: x\r\n\r\n" + b"a" * 2500 + b"\r\nend\r\n"
    out = lines_of(fold_long_lines(body))
    assert out[:2] == [b"Subject: x", b""]
    assert [len(x) for x in out[2:5]] == [998, 998, 2500 - 998 - 997 + 1]
    assert out[3].startswith(b" ") and out[4].startswith(b" ")
    assert out[5:] == [b"end", b""]
    # nothing lost: removing the inserted breaks gives the line back
    assert b"".join([out[2], out[3][1:], out[4][1:]]) == b"a" * 2500


def test_long_header_becomes_a_fold():
    value = b"x" * 1500
    out = lines_of(fold_long_lines(b"X-Long: " + value + b"\r\n\r\nbody\r\n"))
    assert out[0] == b"X-Long: " + value[:990]
    assert out[1] == b" " + value[990:]
    assert out[2:] == [b"", b"body", b""]


def test_a_utf8_character_is_never_split():
    body = ("\u00e9" * 1200).encode() + b"\r\n"  # 2400 octets of 2-octet characters
    out = lines_of(fold_long_lines(body))
    for line in out:
        line.decode("utf-8")  # every piece is whole UTF-8
        assert len(line) <= MAX_LINE


@given(st.binary(max_size=5000))
def test_no_line_is_ever_longer_than_998_and_only_breaks_are_added(data):
    body = data.replace(b"\r", b"").replace(b"\n", b"\r\n").replace(b"\r\n ", b"\r\nx")
    out = fold_long_lines(body)
    assert all(len(line.rstrip(b"\r")) <= MAX_LINE for line in out.split(b"\n"))
    assert out.replace(b"\r\n ", b"") == body
