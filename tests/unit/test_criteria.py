"""Rule criteria: which scheduled queues a bounce/suspend rule selects."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.message import AddressError, QueueName, format_queue_name, parse_queue_name
from sluice.rules.criteria import Criteria


def q(name: str) -> tuple[str, QueueName]:
    return name, parse_queue_name(name)


QUEUES = [
    "yahoo.com",
    "spring:acme@yahoo.com",
    "spring:@yahoo.com",
    "acme@yahoo.com",
    "acme@gmail.com",
    "spring:acme@hotmail.com!outlook.com",
    "hotmail.com!outlook.com",
    "Back to school:acme@gmail.com",
    "back to school:@gmail.com",
    "xn--bcher-kva.example",
]


def selected(c: Criteria) -> set[str]:
    return {name for name in QUEUES if c.matches(*q(name))}


# ---- table of criteria -> queues selected ----------------------------------

@pytest.mark.parametrize("kw,expected", [
    ({}, set(QUEUES)),
    ({"domain": "yahoo.com"},
     {"yahoo.com", "spring:acme@yahoo.com", "spring:@yahoo.com", "acme@yahoo.com"}),
    ({"domain": "Yahoo.COM"},
     {"yahoo.com", "spring:acme@yahoo.com", "spring:@yahoo.com", "acme@yahoo.com"}),
    ({"domain": " YAHOO.com. "},
     {"yahoo.com", "spring:acme@yahoo.com", "spring:@yahoo.com", "acme@yahoo.com"}),
    ({"domain": "bücher.example"}, {"xn--bcher-kva.example"}),
    ({"domain": "BÜCHER.example"}, {"xn--bcher-kva.example"}),
    ({"campaign": "spring"},
     {"spring:acme@yahoo.com", "spring:@yahoo.com", "spring:acme@hotmail.com!outlook.com"}),
    ({"campaign": "  spring  "},
     {"spring:acme@yahoo.com", "spring:@yahoo.com", "spring:acme@hotmail.com!outlook.com"}),
    ({"campaign": "Spring"}, set()),
    ({"tenant": "acme"},
     {"spring:acme@yahoo.com", "acme@yahoo.com", "acme@gmail.com",
      "spring:acme@hotmail.com!outlook.com", "Back to school:acme@gmail.com"}),
    ({"tenant": "ACME"}, set()),
    ({"tenant": "acme", "domain": "gmail.com"},
     {"acme@gmail.com", "Back to school:acme@gmail.com"}),
    ({"tenant": "acme", "campaign": "spring", "domain": "yahoo.com"}, {"spring:acme@yahoo.com"}),
    ({"campaign": "spring", "domain": "gmail.com"}, set()),
    ({"routing_domain": "outlook.com"},
     {"spring:acme@hotmail.com!outlook.com", "hotmail.com!outlook.com"}),
    ({"routing_domain": "Outlook.COM"},
     {"spring:acme@hotmail.com!outlook.com", "hotmail.com!outlook.com"}),
    ({"domain": "outlook.com"}, set()),
    ({"domain": "hotmail.com"},
     {"spring:acme@hotmail.com!outlook.com", "hotmail.com!outlook.com"}),
    ({"domain": "hotmail.com", "routing_domain": "outlook.com", "tenant": "acme"},
     {"spring:acme@hotmail.com!outlook.com"}),
    ({"campaign": "Back to school"}, {"Back to school:acme@gmail.com"}),
    ({"campaign": "back to school"}, {"back to school:@gmail.com"}),
    ({"queue_names": ["acme@yahoo.com", "yahoo.com"]}, {"acme@yahoo.com", "yahoo.com"}),
    ({"queue_names": [" acme@yahoo.com "]}, {"acme@yahoo.com"}),
    ({"queue_names": ["ACME@yahoo.com"]}, set()),
    ({"queue_names": ["yahoo"]}, set()),
    ({"queue_names": ["hotmail.com"]}, set()),  # exact: not hotmail.com!outlook.com
])
def test_criteria_select(kw, expected):
    assert selected(Criteria.build(**kw)) == expected


def test_domain_criterion_is_normalized_yahoo():
    c = Criteria.build(domain="Yahoo.COM")
    assert c.domain == "yahoo.com"
    assert c.matches(*q("yahoo.com"))
    assert c.matches(*q("tenant@yahoo.com"))


def test_campaign_is_case_sensitive():
    c = Criteria.build(campaign="back to school")
    assert not c.matches(*q("Back to school:@example.com"))
    assert not c.matches(*q("Back to school:t@example.com"))
    assert c.matches(*q("back to school:@example.com"))


def test_build_normalizes():
    c = Criteria.build(campaign="  Spring ", tenant="\tACME\n", domain="Example.COM",
                       routing_domain="Bücher.example")
    assert c == Criteria(campaign="Spring", tenant="ACME", domain="example.com",
                         routing_domain="xn--bcher-kva.example", queue_names=None)


@pytest.mark.parametrize("field", ["campaign", "tenant", "domain", "routing_domain"])
@pytest.mark.parametrize("blank", ["", "  "])
def test_build_refuses_blank_values_as_the_api_does(field, blank):
    """A blank criterion is a mistake, never "any" (the API answers 422)."""
    with pytest.raises(ValueError, match=f"^{field}: must not be empty"):
        Criteria.build(**{field: blank})


def test_build_none_means_not_set():
    c = Criteria.build(campaign=None, tenant=None, domain=None, routing_domain=None)
    assert c == Criteria()
    assert c.everything


@pytest.mark.parametrize("names", [[], [""], ["a.com", " "]])
def test_build_refuses_empty_queue_names(names):
    with pytest.raises(ValueError, match="^queue_names: "):
        Criteria.build(queue_names=names)


def test_build_refuses_queue_names_with_criteria():
    with pytest.raises(ValueError, match="cannot be combined"):
        Criteria.build(queue_names=["a.com"], tenant="t")


def test_build_queue_names_stripped_and_deduplicated():
    c = Criteria.build(queue_names=[" a.com", "b.com ", "a.com"])
    assert c.queue_names == ("a.com", "b.com")
    assert not c.everything


@pytest.mark.parametrize("kw", [{"domain": "bad domain"}, {"routing_domain": "-x.com"},
                                {"domain": "a..b"}])
def test_build_bad_domain_raises(kw):
    with pytest.raises(AddressError):
        Criteria.build(**kw)


@pytest.mark.parametrize("kw,everything", [
    ({}, True),
    ({"campaign": "c"}, False),
    ({"tenant": "t"}, False),
    ({"domain": "d.com"}, False),
    ({"routing_domain": "r.com"}, False),
    ({"queue_names": ["x.com"]}, False),
])
def test_everything(kw, everything):
    assert Criteria.build(**kw).everything is everything


def test_same_criteria_compare_equal_after_normalization():
    assert Criteria.build(domain="Yahoo.COM") == Criteria.build(domain="yahoo.com")
    assert Criteria.build(campaign=" c ") == Criteria.build(campaign="c")
    assert Criteria.build(campaign="C") != Criteria.build(campaign="c")
    assert Criteria.build(domain="yahoo.com") != Criteria.build(routing_domain="yahoo.com")


@pytest.mark.parametrize("kw", [
    {}, {"campaign": "c", "tenant": "t", "domain": "d.com", "routing_domain": "r.com"},
    {"queue_names": ["a.com", "t@b.com"]},
    {"sender": "*@x.org", "recipient": "?b@*", "older_than": 7200.0, "tenant": "t"},
])
def test_as_dict_from_dict_round_trip(kw):
    c = Criteria.build(**kw)
    d = c.as_dict()
    assert set(d) == {"campaign", "tenant", "domain", "routing_domain", "queue_names",
                      "sender", "recipient", "older_than"}
    assert Criteria.from_dict(d) == c


def test_rows_stored_before_per_message_criteria_still_load():
    old = {"campaign": "c", "tenant": None, "domain": None, "routing_domain": None,
           "queue_names": None}
    assert Criteria.from_dict(old) == Criteria(campaign="c")


class Msg:
    def __init__(self, sender="a@b.org", recipient="r@x.com", created=1000.0) -> None:
        self.sender, self.recipient, self.created = sender, recipient, created


@pytest.mark.parametrize("kw,msg,expected", [
    ({"sender": "*@Compromised.Example"}, Msg(sender="Spam@compromised.example"), True),
    ({"sender": "*@compromised.example"}, Msg(sender="a@other.example"), False),
    ({"sender": "*@compromised.example"}, Msg(sender="a@compromised.example.net"), False),
    ({"recipient": "?@x.com"}, Msg(recipient="r@X.COM"), True),
    ({"recipient": "?@x.com"}, Msg(recipient="rr@x.com"), False),
    ({"sender": "\u00fc*@x.org"}, Msg(sender="\u00dcser@X.org"), True),  # not only ASCII
    ({"older_than": 100.0}, Msg(created=850.0), True),
    ({"older_than": 100.0}, Msg(created=950.0), False),
    ({"sender": "*@x.org", "older_than": 100.0}, Msg(sender="a@x.org", created=950.0), False),
    ({}, Msg(), True),
])
def test_per_message_criteria(kw, msg, expected):
    c = Criteria.build(**kw)
    assert c.per_message == bool(kw)
    assert c.matches_message(msg, now=1000.0) is expected


@pytest.mark.parametrize("kw,field", [
    ({"sender": "  "}, "sender"), ({"recipient": ""}, "recipient"),
    ({"older_than": 0}, "older_than"), ({"older_than": -5}, "older_than"),
])
def test_per_message_criteria_refuse_blank_and_non_positive(kw, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        Criteria.build(**kw)


def test_per_message_criteria_count_as_a_selection():
    assert not Criteria.build(sender="*@x.org").everything
    assert Criteria.build(sender="*@x.org") != Criteria.build(sender="*@y.org")
    assert Criteria.build(queue_names=["a.com"], sender="*@x.org").per_message


@pytest.mark.parametrize("kw,text", [
    ({}, "everything"),
    ({"campaign": "c", "domain": "Y.com"}, "campaign=c domain=y.com"),
    ({"tenant": "t", "routing_domain": "r.com"}, "tenant=t routing_domain=r.com"),
    ({"queue_names": ["a.com", "b.com"]}, "queue=a.com,b.com"),
    ({"tenant": "t", "sender": "*@x.org", "older_than": 5400.0},
     "tenant=t sender=*@x.org older_than=1h 30m"),
])
def test_describe(kw, text):
    assert Criteria.build(**kw).describe() == text


# ---- property: AND semantics -----------------------------------------------

_FORBIDDEN = ":@!"
labels = (
    st.text(alphabet=st.characters(blacklist_characters=_FORBIDDEN,
                                   blacklist_categories=("Cs", "Cc")),
            min_size=1, max_size=12)
    .map(str.strip)
    .filter(bool)
)
ldh_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
domains = st.lists(ldh_label, min_size=1, max_size=3).map(".".join)


def _criterion(data, strategy, value):
    """None, the queue's own value, or a value different from it."""
    choice = data.draw(st.sampled_from(["none", "same", "other"]))
    if choice == "none":
        return None
    if choice == "same" and value is not None:
        return value
    return data.draw(strategy.filter(lambda v: v != value))


@settings(max_examples=200, deadline=None)
@given(data=st.data(),
       campaign=st.none() | labels,
       tenant=st.none() | labels,
       domain=domains,
       routing=st.none() | domains)
def test_matches_is_and_of_given_criteria(data, campaign, tenant, domain, routing):
    name = format_queue_name(domain, campaign, tenant, routing)
    parts = QueueName(domain=domain, campaign=campaign, tenant=tenant, routing_domain=routing)
    assert parse_queue_name(name) == parts

    c_campaign = _criterion(data, labels, campaign)
    c_tenant = _criterion(data, labels, tenant)
    c_domain = _criterion(data, domains, domain)
    c_routing = _criterion(data, domains, routing)
    crit = Criteria.build(campaign=c_campaign, tenant=c_tenant, domain=c_domain,
                          routing_domain=c_routing)

    expected = ((c_campaign is None or c_campaign == campaign)
                and (c_tenant is None or c_tenant == tenant)
                and (c_domain is None or c_domain == domain)
                and (c_routing is None or c_routing == routing))
    assert crit.matches(name, parts) is expected
    # the same answer with the parts read back from the name
    assert crit.matches(name, parse_queue_name(name)) is expected
    if all(v is None for v in (c_campaign, c_tenant, c_domain, c_routing)):
        assert crit.everything and expected


@settings(max_examples=200, deadline=None)
@given(data=st.data(),
       campaign=st.none() | labels,
       tenant=st.none() | labels,
       domain=domains,
       routing=st.none() | domains,
       others=st.lists(domains, max_size=3))
def test_queue_names_match_exact_names_only(data, campaign, tenant, domain, routing, others):
    name = format_queue_name(domain, campaign, tenant, routing)
    parts = QueueName(domain=domain, campaign=campaign, tenant=tenant, routing_domain=routing)
    include = data.draw(st.booleans())
    listed = [o for o in others if o != name] + ([name] if include else [])
    if not listed:
        listed = [name + "x"]
    crit = Criteria.build(queue_names=listed)
    assert crit.matches(name, parts) is include
    # queue_names ignore the parts entirely: a name not listed never matches
    assert crit.matches(name + ".other", parts) is ((name + ".other") in listed)


def _sql_matches(pattern: str, value: str) -> bool:
    import sqlite3

    from sluice.message import glob_match
    from sluice.spool.where import _glob_sql

    conn = sqlite3.connect(":memory:")
    conn.create_function("sluice_glob", 2, glob_match, deterministic=True)
    conn.execute("CREATE TABLE m (sender TEXT)")
    conn.execute("INSERT INTO m VALUES (?)", (value,))
    params: list = []
    clause = _glob_sql("sender", pattern, params)
    return conn.execute(f"SELECT count(*) FROM m WHERE 1{clause}", params).fetchone()[0] == 1


@given(pattern=st.text(alphabet="ab%_*?[]!\\\\Ab.@\u00fc\u00c9\u212a", max_size=8),
       value=st.text(alphabet="ab%_*?[]\\\\AB.@\u00fc\u00dc\u00e9\u212ak", max_size=8))
def test_the_spool_selects_exactly_what_the_glob_matches(pattern, value):
    """The SQL the spool uses (a LIKE pre-filter, then the matcher) agrees with
    the matcher the rules use in memory, ASCII or not."""
    from sluice.message import glob_match

    assert _sql_matches(pattern, value) == glob_match(pattern, value)


@pytest.mark.parametrize("pattern,value", [
    ("[!]]", "a"), ("[!]]x", "ax"), ("[]]", "]"), ("[]a]", "a"), ("[!a]]", "b]"),
    ("[", "["), ("a[]", "a[]"), ("100%@*", "100%@x"), ("a_b@*", "a_b@x"), ("a\\b*", "a\\bc"),
])
def test_character_classes_and_like_wildcards_select_what_the_glob_matches(pattern, value):
    from sluice.message import glob_match

    assert glob_match(pattern, value)
    assert _sql_matches(pattern, value)
