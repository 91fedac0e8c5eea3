"""Durations as operators write them: ``90s``, ``5m``, ``1h 30m``, ``7d``.

Parsing accepts several units per string (largest first or not) and the long
unit names; printing always uses the short units, largest first (``4m 12s``),
so what Sluice prints can be pasted back into a config or a command.
"""

from __future__ import annotations

import re

_UNITS: dict[str, int] = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}

_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*")


class DurationError(ValueError):
    """A duration string that cannot be read; the message says why."""


def parse_duration(text: str) -> float:
    """Return the number of seconds ``text`` stands for.

    Raises DurationError for an empty string, an unknown unit, a number
    without a unit, or any other stray character.
    """
    if not isinstance(text, str):
        raise DurationError(f"expected a duration string like '5m', got {text!r}")
    s = text.strip()
    if not s:
        raise DurationError("empty duration; write it like '90s', '5m', '1h 30m' or '7d'")
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if not m or m.end() == pos:
            raise DurationError(
                f"cannot read duration {text!r}; write it like '90s', '5m', '1h 30m' or '7d'"
            )
        unit = m.group(2).lower()
        if unit not in _UNITS:
            raise DurationError(f"unknown unit {m.group(2)!r} in duration {text!r}")
        total += float(m.group(1)) * _UNITS[unit]
        pos = m.end()
    return total


def parse_positive_duration(text: str) -> float:
    """``parse_duration`` for lifetimes and intervals: zero is refused too."""
    seconds = parse_duration(text)
    if seconds <= 0:
        raise DurationError("must be longer than 0s")
    return seconds


def format_duration(seconds: float) -> str:
    """Print ``seconds`` as ``1d 2h 3m 4s`` (whole seconds, zero parts left out)."""
    remaining = max(0, int(round(seconds)))
    if remaining == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts)
