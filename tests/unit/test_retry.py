"""Retry schedule and expiry."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.config import QueueSettings
from sluice.queues.scheduled import expires_at, next_due, retry_delay

DEFAULTS = QueueSettings()  # 20m, 8h, 7d
MIN = 60.0
HOUR = 3600.0
DAY = 86400.0


def test_default_queue_settings():
    assert DEFAULTS.retry_interval == 20 * MIN
    assert DEFAULTS.max_retry_interval == 8 * HOUR
    assert DEFAULTS.max_age == 7 * DAY


# attempts -> un-jittered delay for the defaults: 20m, 40m, 80m, 160m, 320m, then 8h cap
EXPECTED_BASE = [
    (1, 20 * MIN),
    (2, 40 * MIN),
    (3, 80 * MIN),
    (4, 160 * MIN),
    (5, 320 * MIN),
    (6, 8 * HOUR),   # 640m capped at 480m
    (7, 8 * HOUR),
    (10, 8 * HOUR),
    (50, 8 * HOUR),
    (1000, 8 * HOUR),
]


@pytest.mark.parametrize("attempts,base", EXPECTED_BASE)
def test_retry_delay_doubles_and_caps_within_jitter(attempts, base):
    rng = random.Random(1234)
    for _ in range(200):
        d = retry_delay(attempts, DEFAULTS, rng)
        assert 0.9 * base <= d <= 1.1 * base


@pytest.mark.parametrize("attempts,base", EXPECTED_BASE)
def test_retry_delay_is_base_times_seeded_jitter(attempts, base):
    seed = 42 + attempts
    expected_factor = random.Random(seed).uniform(0.9, 1.1)
    assert retry_delay(attempts, DEFAULTS, random.Random(seed)) == pytest.approx(base * expected_factor)


def test_retry_delay_same_seed_same_delay():
    a = [retry_delay(n, DEFAULTS, random.Random(7)) for n in range(1, 10)]
    b = [retry_delay(n, DEFAULTS, random.Random(7)) for n in range(1, 10)]
    assert a == b


def test_jitter_actually_varies_and_spans_both_sides():
    rng = random.Random(99)
    delays = [retry_delay(1, DEFAULTS, rng) for _ in range(500)]
    base = 20 * MIN
    assert len(set(delays)) > 400
    assert min(delays) < 0.95 * base
    assert max(delays) > 1.05 * base
    assert all(0.9 * base <= d <= 1.1 * base for d in delays)


def test_attempts_zero_treated_as_first_retry():
    rng = random.Random(3)
    d = retry_delay(0, DEFAULTS, rng)
    assert 0.9 * 20 * MIN <= d <= 1.1 * 20 * MIN


def test_custom_settings():
    qs = QueueSettings(retry_interval=10, max_retry_interval=100, max_age=1000)
    rng = random.Random(5)
    for attempts, base in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (6, 100)]:
        d = retry_delay(attempts, qs, rng)
        assert 0.9 * base <= d <= 1.1 * base, (attempts, d)


def test_retry_interval_larger_than_cap_is_capped():
    qs = QueueSettings(retry_interval=2 * HOUR, max_retry_interval=1 * HOUR, max_age=DAY)
    d = retry_delay(1, qs, random.Random(0))
    assert 0.9 * HOUR <= d <= 1.1 * HOUR


def test_retry_delay_without_rng_uses_module_random():
    d = retry_delay(1, DEFAULTS)
    assert 0.9 * 20 * MIN <= d <= 1.1 * 20 * MIN


# ---- expiry ------------------------------------------------------------------

def test_expires_at():
    assert expires_at(1000.0, DEFAULTS) == 1000.0 + 7 * DAY
    assert expires_at(0.0, QueueSettings(max_age=DAY)) == DAY


def test_next_due_is_now_plus_delay_before_expiry():
    created = 1_700_000_000.0
    now = created + 60
    seed = 11
    delay = retry_delay(1, DEFAULTS, random.Random(seed))
    assert next_due(now, created, 1, DEFAULTS, random.Random(seed)) == pytest.approx(now + delay)


def test_next_due_never_after_expiry():
    created = 1_700_000_000.0
    now = created + 7 * DAY - 10 * MIN  # 10 minutes before expiry, next retry would be ~8h
    due = next_due(now, created, 20, DEFAULTS, random.Random(1))
    assert due == created + 7 * DAY


def test_next_due_when_already_expired_is_expiry():
    created = 1_700_000_000.0
    now = created + 8 * DAY
    due = next_due(now, created, 3, DEFAULTS, random.Random(1))
    assert due == created + 7 * DAY
    assert due <= now


def test_next_due_respects_per_domain_max_age():
    qs = QueueSettings(max_age=DAY)
    created = 0.0
    now = DAY - 5 * MIN
    assert next_due(now, created, 1, qs, random.Random(2)) == DAY


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    attempts=st.integers(1, 200),
    retry=st.floats(1, 7200),
    cap=st.floats(1, 86400),
    max_age=st.floats(1, 30 * 86400),
    created=st.floats(0, 2e9),
    elapsed=st.floats(0, 40 * 86400),
)
def test_next_due_properties(seed, attempts, retry, cap, max_age, created, elapsed):
    qs = QueueSettings(retry_interval=retry, max_retry_interval=cap, max_age=max_age)
    now = created + elapsed
    base = min(retry * 2 ** (attempts - 1), cap)
    d = retry_delay(attempts, qs, random.Random(seed))
    assert 0.9 * base * (1 - 1e-12) <= d <= 1.1 * base * (1 + 1e-12)
    due = next_due(now, created, attempts, qs, random.Random(seed))
    assert due <= created + max_age
    assert due <= now + d
    assert due == pytest.approx(min(now + d, created + max_age))
