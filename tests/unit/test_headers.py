"""Reading the tenant/campaign headers of a received message."""

from __future__ import annotations

from collections import Counter

import pytest

from sluice.config import settings_from_dict
from sluice.message import Meta
from sluice.reception.intake import Intake, header_values

NAMES = ["X-Tenant", "X-Campaign"]


def msg(*header_lines: str, body: str = "Hello.\r\n", eol: str = "\r\n") -> bytes:
    return (eol.join(header_lines) + eol + eol + body.replace("\r\n", eol)).encode("utf-8")


@pytest.mark.parametrize("eol", ["\r\n", "\n"], ids=["crlf", "lf"])
def test_both_headers(eol):
    body = msg("From: a@b.c", "X-Tenant: acme", "X-Campaign: spring", "Subject: hi", eol=eol)
    assert header_values(body, NAMES) == {"X-Tenant": "acme", "X-Campaign": "spring"}


@pytest.mark.parametrize("eol", ["\r\n", "\n"], ids=["crlf", "lf"])
@pytest.mark.parametrize("line", ["x-tenant: acme", "X-TENANT: acme", "x-TeNaNt: acme",
                                  "X-Tenant:acme", "X-Tenant:    acme   "])
def test_header_names_case_insensitive_and_value_trimmed(eol, line):
    body = msg("Subject: hi", line, eol=eol)
    assert header_values(body, NAMES) == {"X-Tenant": "acme"}


def test_keys_are_the_names_asked_for():
    body = msg("X-TENANT: acme")
    assert header_values(body, ["x-tenant"]) == {"x-tenant": "acme"}
    assert header_values(body, ["X-Tenant"]) == {"X-Tenant": "acme"}


def test_value_case_kept():
    body = msg("X-Campaign: Back To School")
    assert header_values(body, NAMES) == {"X-Campaign": "Back To School"}


@pytest.mark.parametrize("eol", ["\r\n", "\n"], ids=["crlf", "lf"])
def test_absent_headers_not_in_result(eol):
    body = msg("From: a@b.c", "Subject: X-Tenant: no", eol=eol)
    assert header_values(body, NAMES) == {}


@pytest.mark.parametrize("eol", ["\r\n", "\n"], ids=["crlf", "lf"])
def test_folded_header_unfolded(eol):
    body = msg("X-Campaign: back", " to", "\tschool", "X-Tenant: acme", eol=eol)
    assert header_values(body, NAMES) == {"X-Campaign": "back to school", "X-Tenant": "acme"}


def test_folded_value_starting_on_next_line():
    body = msg("X-Tenant:", "   acme", "Subject: s")
    values = header_values(body, NAMES)
    assert list(values) == ["X-Tenant"]
    # leading white space of the unfolded value is removed later by normalize_label
    assert values["X-Tenant"].strip() == "acme"
    assert intake().meta_for(body, "example.com") == Meta(tenant="acme")


def test_fold_of_other_header_is_not_appended():
    body = msg("X-Tenant: acme", "Subject: long", " X-Campaign: folded-subject", "To: x@y.z")
    assert header_values(body, NAMES) == {"X-Tenant": "acme"}


@pytest.mark.parametrize("eol", ["\r\n", "\n"], ids=["crlf", "lf"])
def test_first_occurrence_wins(eol):
    body = msg("X-Tenant: first", "X-Campaign: one", "x-tenant: second", "X-Campaign: two",
               eol=eol)
    assert header_values(body, NAMES) == {"X-Tenant": "first", "X-Campaign": "one"}


def test_first_occurrence_wins_even_when_folded():
    body = msg("X-Tenant: fir", " st", "X-Tenant: second", " more")
    assert header_values(body, NAMES) == {"X-Tenant": "fir st"}


def test_empty_first_occurrence_still_wins():
    body = msg("X-Tenant:", "Subject: s", "X-Tenant: later")
    assert header_values(body, NAMES) == {"X-Tenant": ""}


@pytest.mark.parametrize("eol", ["\r\n", "\n"], ids=["crlf", "lf"])
def test_stops_at_blank_line(eol):
    body = msg("From: a@b.c", "X-Tenant: acme",
               body="X-Campaign: in-body\r\nX-Tenant: in-body\r\n", eol=eol)
    assert header_values(body, NAMES) == {"X-Tenant": "acme"}


def test_continuation_line_in_body_not_appended():
    body = msg("X-Tenant: acme", body=" continued?\r\n")
    assert header_values(body, NAMES) == {"X-Tenant": "acme"}


def test_headers_only_no_body():
    body = b"X-Tenant: acme\r\nX-Campaign: c\r\n"
    assert header_values(body, NAMES) == {"X-Tenant": "acme", "X-Campaign": "c"}


def test_utf8_value_decoded():
    body = msg("X-Campaign: Frühling ☀")
    assert header_values(body, NAMES) == {"X-Campaign": "Frühling ☀"}


def test_bad_utf8_value_replaced_not_raised():
    body = b"X-Tenant: a\xffb\r\n\r\nbody"
    assert header_values(body, NAMES) == {"X-Tenant": "a\ufffdb"}


def test_line_without_colon_ignored():
    body = msg("garbage line", "X-Tenant: acme")
    assert header_values(body, NAMES) == {"X-Tenant": "acme"}


def test_empty_message():
    assert header_values(b"", NAMES) == {}


# ---- suspected bugs --------------------------------------------------------------------

def test_lf_headers_with_crlf_blank_line_later_in_body():
    """Bare-LF header block ends at the first empty line, whatever comes later.

    BUG (src/sluice/reception/intake.py `header_values`): it looks for
    b"\\r\\n\\r\\n" first and only falls back to b"\\n\\n" when there is none,
    so a CRLF blank line further down the body moves the end of the header
    block past the real one and body lines are read as headers.
    """
    body = b"X-Tenant: acme\nSubject: s\n\nX-Campaign: in-body\r\n\r\nmore\r\n"
    assert header_values(body, NAMES) == {"X-Tenant": "acme"}


@pytest.mark.parametrize("body", [b"\r\nX-Campaign: in-body\r\n", b"\nX-Campaign: in-body\n"],
                         ids=["crlf", "lf"])
def test_empty_header_section(body):
    """A message starting with the blank line has no headers at all.

    BUG (same function): b"\\r\\n" + body contains no b"\\r\\n\\r\\n", so the
    whole body is taken as the header block.
    """
    assert header_values(body, NAMES) == {}


# ---- Intake.meta_for: headers -> Meta ------------------------------------------------

def intake(**raw) -> Intake:
    return Intake(settings_from_dict(raw), spool=None, bounces=None, suspensions=None,
                  nodeid="n", stats=Counter(), on_received=lambda queued: None)


@pytest.mark.parametrize("lines,expected", [
    ([], Meta()),
    (["X-Tenant: acme"], Meta(tenant="acme")),
    (["X-Campaign: spring"], Meta(campaign="spring")),
    (["X-Tenant: acme", "X-Campaign: spring"], Meta(tenant="acme", campaign="spring")),
    (["X-Tenant:", "X-Campaign:    "], Meta()),  # empty = not set
    (["X-Tenant:  ACME Corp  "], Meta(tenant="ACME Corp")),
    (["x-campaign: Back to School"], Meta(campaign="Back to School")),
])
def test_meta_for_defaults(lines, expected):
    body = msg("From: a@b.c", *lines)
    assert intake().meta_for(body, "example.com") == expected


def test_meta_for_configured_headers_and_routing_domain():
    it = intake(smtp={"tenant_header": "X-Customer", "campaign_header": "X-Mailing"},
                routing_domains={"Hotmail.com": "Outlook.com"})
    body = msg("X-Tenant: ignored", "X-Campaign: ignored", "x-customer: acme",
               "X-MAILING: spring")
    assert it.meta_for(body, "hotmail.com") == Meta(tenant="acme", campaign="spring",
                                                    routing_domain="outlook.com")
    assert it.meta_for(body, "gmail.com") == Meta(tenant="acme", campaign="spring")
