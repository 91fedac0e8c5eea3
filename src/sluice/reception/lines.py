"""Lines longer than RFC 5322 allows, folded at reception.

RFC 5322 (section 2.1.1) caps a line at 998 octets before its CRLF, and
some receivers refuse longer ones. Sluice keeps the mail and fixes the
lines, as Postfix does before it sends (``smtp_line_length_limit = 998``):
a longer line is broken by inserting CRLF and a space every 998 octets. In
the header section that is an ordinary fold; in a body it adds one space,
the least damage to MIME-formatted mail. It happens once, when a message is
received, so what is stored, signed, logged and delivered is the same.
A break never splits a UTF-8 character.
"""

from __future__ import annotations

import re

MAX_LINE = 998  # octets, not counting the CRLF

_LONG = re.compile(rb"[^\r\n]{%d,}" % (MAX_LINE + 1))


def _cut(line: bytes) -> int:
    """Where to break ``line`` (longer than MAX_LINE): at most MAX_LINE octets
    in, stepping back over UTF-8 continuation bytes so a character stays whole."""
    at = MAX_LINE
    for _ in range(3):
        if not 0x80 <= line[at] < 0xC0:
            break
        at -= 1
    return at


def _fold(match: re.Match[bytes]) -> bytes:
    line = match.group(0)
    parts = []
    while len(line) > MAX_LINE:
        at = _cut(line)
        parts.append(line[:at])
        line = b" " + line[at:]
    parts.append(line)
    return b"\r\n".join(parts)


def fold_long_lines(body: bytes) -> bytes:
    """``body`` with every line over 998 octets broken (CRLF + space); the
    same object when no line is that long (the common case costs one scan)."""
    if len(body) <= MAX_LINE or _LONG.search(body) is None:
        return body
    return _LONG.sub(_fold, body)
