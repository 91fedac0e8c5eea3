"""Durations as operators write them (README, "Configuration")."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.durations import DurationError, format_duration, parse_duration


@pytest.mark.parametrize("text,seconds", [
    ("90s", 90),
    ("5m", 300),
    ("1h 30m", 5400),
    ("1h30m", 5400),
    ("30m 1h", 5400),
    ("2h", 7200),
    ("7d", 7 * 86400),
    ("1d 2h 3m 4s", 86400 + 7200 + 180 + 4),
    ("0s", 0),
    ("  5m  ", 300),
    ("5 m", 300),
    ("5M", 300),
    ("1.5h", 5400),
    # long forms and short forms
    ("2 hours", 7200),
    ("1 hour", 3600),
    ("3 days", 3 * 86400),
    ("1 day", 86400),
    ("10 minutes", 600),
    ("1 minute", 60),
    ("10 min", 600),
    ("10 mins", 600),
    ("5 seconds", 5),
    ("1 second", 1),
    ("5 sec", 5),
    ("5 secs", 5),
    ("2 hr", 7200),
    ("2 hrs", 7200),
    ("1 day 2 hours", 93600),
    ("2 Hours", 7200),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"),
    (1, "1s"),
    (59, "59s"),
    (60, "1m"),
    (90, "1m 30s"),
    (252, "4m 12s"),
    (300, "5m"),
    (3600, "1h"),
    (5400, "1h 30m"),
    (7200, "2h"),
    (3601, "1h 1s"),
    (86400, "1d"),
    (86400 + 7200, "1d 2h"),
    (86400 + 60, "1d 1m"),
    (7 * 86400, "7d"),
    (90061, "1d 1h 1m 1s"),
    (30 * 86400, "30d"),
    (251.6, "4m 12s"),  # whole seconds
    (-5, "0s"),  # time left never negative
])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize("text", [
    "",
    "   ",
    "5x",
    "abc",
    "5",
    "-5m",
    "m",
    "5m 3",
    "5m,3s",
    "5m-",
    "+5m",
    "1e3s",
    "5 parsecs",
    "5mm",
])
def test_parse_duration_errors(text):
    with pytest.raises(DurationError):
        parse_duration(text)


@pytest.mark.parametrize("value", [None, 5, 5.0, b"5m", ["5m"]])
def test_parse_duration_non_string_raises(value):
    with pytest.raises(DurationError):
        parse_duration(value)


def test_duration_error_is_value_error():
    assert issubclass(DurationError, ValueError)


def test_error_message_says_what_is_wrong():
    with pytest.raises(DurationError) as exc:
        parse_duration("5x")
    assert "5x" in str(exc.value)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10 * 365 * 86400))
def test_round_trip_format_then_parse(seconds):
    text = format_duration(seconds)
    assert parse_duration(text) == seconds
    # largest unit first, each unit at most once, no zero parts
    units = [part[-1] for part in text.split()]
    order = "dhms"
    assert units == sorted(units, key=order.index)
    assert len(units) == len(set(units))
    if seconds:
        assert all(not part.startswith("0") for part in text.split())


@settings(max_examples=200, deadline=None)
@given(d=st.integers(0, 400), h=st.integers(0, 23), m=st.integers(0, 59), s=st.integers(0, 59))
def test_round_trip_parse_then_format(d, h, m, s):
    parts = [f"{n}{u}" for n, u in ((d, "d"), (h, "h"), (m, "m"), (s, "s")) if n]
    text = " ".join(parts) or "0s"
    assert format_duration(parse_duration(text)) == text
