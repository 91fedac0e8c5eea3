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

MAX_LINE = 998  # octets, not counting the CRLF


def _cut(line: bytes) -> int:
    """Where to break ``line`` (longer than MAX_LINE): at most MAX_LINE octets
    in, stepping back over UTF-8 continuation bytes so a character stays whole."""
    at = MAX_LINE
    for _ in range(3):
        if not 0x80 <= line[at] < 0xC0:
            break
        at -= 1
    return at


def _fold(line: bytes) -> bytes:
    """One line (without its line break) in pieces of at most MAX_LINE octets."""
    parts = []
    while len(line) > MAX_LINE:
        at = _cut(line)
        parts.append(line[:at])
        line = b" " + line[at:]
    parts.append(line)
    return b"\r\n".join(parts)


def _may_have_long_line(body: bytes) -> bool:
    """Whether some 999 octets in a row hold no line feed: a quick look that
    jumps from line feed to line feed a window at a time (a few microseconds
    for 10 KB) instead of splitting every line."""
    window = MAX_LINE + 1
    pos, end = 0, len(body)
    rfind = body.rfind
    while pos + window <= end:
        nl = rfind(b"\n", pos, pos + window)
        if nl < 0:
            return True
        pos = nl + 1
    return False


def fold_long_lines(body: bytes) -> bytes:
    """``body`` with every line over 998 octets broken (CRLF + space); the
    same object when no line is that long."""
    if not _may_have_long_line(body):
        return body
    lines = body.split(b"\n")
    out = []
    for line in lines:
        if len(line) > MAX_LINE:
            cr = line.endswith(b"\r")
            text = line[:-1] if cr else line
            if len(text) > MAX_LINE:
                line = _fold(text) + (b"\r" if cr else b"")
        out.append(line)
    folded = b"\n".join(out)
    return body if folded == body else folded
