"""Queue names and address/domain normalization."""

from __future__ import annotations

import pytest

from sluice.message import (
    AddressError,
    Meta,
    QueueName,
    format_queue_name,
    normalize_domain,
    normalize_label,
    parse_queue_name,
    queue_for,
    split_address,
)

# (domain, campaign, tenant, routing_domain, expected queue name)
FORMS = [
    ("example.com", "spring", "acme", None, "spring:acme@example.com"),
    ("example.com", "spring", None, None, "spring:@example.com"),
    ("example.com", None, "acme", None, "acme@example.com"),
    ("example.com", None, None, None, "example.com"),
    ("example.com", "spring", "acme", "outlook.com", "spring:acme@example.com!outlook.com"),
    ("example.com", "spring", None, "outlook.com", "spring:@example.com!outlook.com"),
    ("example.com", None, "acme", "outlook.com", "acme@example.com!outlook.com"),
    ("example.com", None, None, "outlook.com", "example.com!outlook.com"),
    # case and inner white space of campaign/tenant are kept
    ("example.com", "Back to School", "ACME Corp", None, "Back to School:ACME Corp@example.com"),
    # address literal as the domain
    ("[192.0.2.1]", "c", "t", None, "c:t@[192.0.2.1]"),
    ("[192.0.2.1]", None, None, "relay.example", "[192.0.2.1]!relay.example"),
    ("xn--bcher-kva.example", None, "t", None, "t@xn--bcher-kva.example"),
]


@pytest.mark.parametrize("domain,campaign,tenant,routing,expected", FORMS)
def test_format_queue_name(domain, campaign, tenant, routing, expected):
    assert format_queue_name(domain, campaign, tenant, routing) == expected


@pytest.mark.parametrize("domain,campaign,tenant,routing,expected", FORMS)
def test_parse_queue_name(domain, campaign, tenant, routing, expected):
    assert parse_queue_name(expected) == QueueName(
        domain=domain, campaign=campaign, tenant=tenant, routing_domain=routing)


@pytest.mark.parametrize("domain,campaign,tenant,routing,expected", FORMS)
def test_round_trip_format_parse(domain, campaign, tenant, routing, expected):
    name = format_queue_name(domain, campaign, tenant, routing)
    parts = parse_queue_name(name)
    assert (parts.domain, parts.campaign, parts.tenant, parts.routing_domain) == (
        domain, campaign, tenant, routing)
    assert str(parts) == name


@pytest.mark.parametrize("domain,campaign,tenant,routing,expected", FORMS)
def test_queue_name_str(domain, campaign, tenant, routing, expected):
    q = QueueName(domain=domain, campaign=campaign, tenant=tenant, routing_domain=routing)
    assert str(q) == expected


@pytest.mark.parametrize("campaign,tenant,routing,expected", [
    ("", "", "", "example.com"),
    ("", "acme", None, "acme@example.com"),
    ("spring", "", None, "spring:@example.com"),
    (None, None, "", "example.com"),
])
def test_format_empty_strings_mean_not_set(campaign, tenant, routing, expected):
    assert format_queue_name("example.com", campaign, tenant, routing) == expected


@pytest.mark.parametrize("name", ["", "!outlook.com", "acme@", "c:t@", "c:@!x.com"])
def test_parse_queue_name_without_domain_raises(name):
    with pytest.raises(AddressError):
        parse_queue_name(name)


# ---- queue_for -------------------------------------------------------------

@pytest.mark.parametrize("meta,expected", [
    (Meta(), "example.com"),
    (Meta(tenant="acme"), "acme@example.com"),
    (Meta(campaign="spring"), "spring:@example.com"),
    (Meta(tenant="acme", campaign="spring"), "spring:acme@example.com"),
    (Meta(routing_domain="outlook.com"), "example.com!outlook.com"),
    (Meta(tenant="acme", campaign="spring", routing_domain="outlook.com"),
     "spring:acme@example.com!outlook.com"),
    (Meta(tenant="acme", routing_domain="outlook.com"), "acme@example.com!outlook.com"),
    (Meta(campaign="spring", routing_domain="outlook.com"), "spring:@example.com!outlook.com"),
])
def test_queue_for(meta, expected):
    q = queue_for("example.com", meta)
    assert str(q) == expected
    assert q.domain == "example.com"
    assert q.campaign == meta.campaign
    assert q.tenant == meta.tenant
    assert q.routing_domain == meta.routing_domain
    assert parse_queue_name(str(q)) == q


def test_meta_as_dict_leaves_out_unset():
    assert Meta().as_dict() == {}
    assert Meta(tenant="acme", campaign=None, routing_domain="o.com").as_dict() == {
        "tenant": "acme", "routing_domain": "o.com"}


# ---- normalize_label (campaign / tenant) -----------------------------------

@pytest.mark.parametrize("value,expected", [
    (None, None),
    ("", None),
    ("   ", None),
    ("\t\r\n", None),
    ("acme", "acme"),
    ("  acme  ", "acme"),
    ("\tBack to School \r\n", "Back to School"),
    ("ACME", "ACME"),
    ("MiXeD cAsE", "MiXeD cAsE"),
    ("a  b", "a  b"),
])
def test_normalize_label(value, expected):
    assert normalize_label(value) == expected


# ---- normalize_domain ------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    ("example.com", "example.com"),
    ("Example.COM", "example.com"),
    ("YAHOO.COM", "yahoo.com"),
    ("  example.com  ", "example.com"),
    ("example.com.", "example.com"),
    ("mail-1.sub.example.org", "mail-1.sub.example.org"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.example", "xn--bcher-kva.example"),
    ("Bücher.Example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("XN--BCHER-KVA.EXAMPLE", "xn--bcher-kva.example"),
    ("münchen.de", "xn--mnchen-3ya.de"),
    ("[192.0.2.1]", "[192.0.2.1]"),
    ("localhost", "localhost"),
    ("a" * 63 + ".com", "a" * 63 + ".com"),
])
def test_normalize_domain(value, expected):
    assert normalize_domain(value) == expected


@pytest.mark.parametrize("value", [
    "",
    "   ",
    ".",
    "exa mple.com",
    "-bad.example",
    "bad-.example",
    "a..b",
    ".example.com",
    "under_score.example",
    "a" * 64 + ".com",
    ".".join(["a" * 63] * 4) + ".com",  # > 253 characters
    "ex!ample.com",
    "ex@ample.com",
    "ex:ample.com",
    "☃.com",
    "[192.0.2.1",
    "[ 192.0.2.1 ]",
])
def test_normalize_domain_bad_raises(value):
    with pytest.raises(AddressError):
        normalize_domain(value)


def test_address_error_is_value_error():
    assert issubclass(AddressError, ValueError)


# ---- split_address ---------------------------------------------------------

@pytest.mark.parametrize("address,expected", [
    ("user@example.com", ("user", "example.com")),
    ("User.Name@Example.COM", ("User.Name", "example.com")),
    ("user+tag@bücher.example", ("user+tag", "xn--bcher-kva.example")),
    ("postmaster@[192.0.2.1]", ("postmaster", "[192.0.2.1]")),
    ('"odd@local"@example.com', ('"odd@local"', "example.com")),
    ("tempfail@EXAMPLE.net.", ("tempfail", "example.net")),
])
def test_split_address(address, expected):
    assert split_address(address) == expected


@pytest.mark.parametrize("address", [
    "",
    "no-at-sign",
    "@example.com",
    "user@",
    "user@bad domain.com",
    "user@-bad.com",
    "us er@example.com",
    "<user>@example.com",
    "user\x01@example.com",
    "a" * 65 + "@example.com",
])
def test_split_address_bad_raises(address):
    with pytest.raises(AddressError):
        split_address(address)


def test_split_address_local_part_64_octets_is_fine():
    local = "a" * 64
    assert split_address(f"{local}@example.com") == (local, "example.com")
