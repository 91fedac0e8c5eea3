"""TLS on delivery, the parts without a peer: which mode a message gets, the
ready queues it lands in, the SSL contexts, and the memory of hosts whose
handshake failed. What each mode does on the wire is in
``tests/e2e/test_delivery_tls.py``."""

from __future__ import annotations

import ssl

import pytest

from sluice.config import ConfigError, settings_from_dict
from sluice.delivery.dispatch import Dispatcher
from sluice.delivery.tls import PlainFallback, TlsPolicy
from sluice.message import parse_queue_name

from ..support import until
from ..support.delivery import OneHop, StopEverything, stored
from ..support.peers import CertificateAuthority


def settings(delivery: dict | None = None, tls: dict | None = None):
    return settings_from_dict({"delivery": delivery or {}, "tls": tls or {}})


def test_the_mode_is_the_domains_in_tls_else_the_delivery_default():
    s = settings({"tls": "opportunistic"},
                 {"Secure.Example": "required", "lab.example": "disabled"})
    policy = TlsPolicy(s.delivery, s.tls)
    assert policy.mode_for("secure.example") == "required"   # keys are normalized
    assert policy.mode_for("lab.example") == "disabled"
    assert policy.mode_for("other.example") == "opportunistic"
    assert policy.default == "opportunistic"


def test_without_overrides_nothing_is_looked_up_per_message():
    assert TlsPolicy(settings().delivery, {}).per_domain == {}
    # an override that repeats the default changes nothing, so it is dropped
    s = settings({"tls": "required"}, {"a.example": "required", "b.example": "disabled"})
    assert TlsPolicy(s.delivery, s.tls).per_domain == {"b.example": "disabled"}


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="tls"):
        settings({"tls": "sometimes"})


def test_contexts_require_tls_1_2_and_only_required_verifies():
    s = settings(tls={"secure.example": "required"})
    policy = TlsPolicy(s.delivery, s.tls)
    assert policy.verified is not None
    for context in (policy.insecure, policy.verified):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert policy.insecure.verify_mode == ssl.CERT_NONE
    assert policy.insecure.check_hostname is False
    assert policy.verified.verify_mode == ssl.CERT_REQUIRED
    assert policy.verified.check_hostname is True


def test_the_verifying_context_is_built_only_when_a_mode_is_required():
    assert TlsPolicy(settings().delivery, {}).verified is None
    s = settings({"tls": "required_insecure"}, {"a.example": "disabled"})
    assert TlsPolicy(s.delivery, s.tls).verified is None
    assert TlsPolicy(settings({"tls": "required"}).delivery, {}).verified is not None


def test_tls_ca_file_is_trusted_besides_the_system_cas(tmp_path):
    ca = CertificateAuthority(tmp_path, "Unit Test CA")
    plain = TlsPolicy(settings({"tls": "required"}).delivery, {}).verified
    policy = TlsPolicy(settings({"tls": "required", "tls_ca_file": str(ca.cert)}).delivery, {})
    assert plain is not None and policy.verified is not None
    subjects = [dict(rdn[0] for rdn in c["subject"]) for c in policy.verified.get_ca_certs()]
    assert {"commonName": "Unit Test CA"} in subjects
    # what the system trusts is still there: one CA more than without the file
    assert (policy.verified.cert_store_stats()["x509_ca"]
            == plain.cert_store_stats()["x509_ca"] + 1)


def test_a_ca_file_without_certificates_stops_the_start_naming_the_key(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"delivery\.tls_ca_file .*ca\.pem.*no CA certificate"):
        TlsPolicy(settings({"tls": "required", "tls_ca_file": str(bad)}).delivery, {})


def test_plain_fallback_is_per_host_and_port_and_expires():
    now = [1000.0]
    fallback = PlainFallback(clock=lambda: now[0])
    fallback.remember("mx.example", 25)
    assert ("mx.example", 25) in fallback
    assert ("mx.example", 2525) not in fallback
    assert ("mx2.example", 25) not in fallback
    now[0] += PlainFallback.SECONDS - 1
    assert ("mx.example", 25) in fallback
    now[0] += 1
    assert ("mx.example", 25) not in fallback




async def test_domains_sharing_hosts_share_a_ready_queue_only_with_the_same_mode():
    s = settings({"tls": "opportunistic"}, {"secure.example": "required"})
    outcomes = StopEverything(s)
    dispatcher = Dispatcher(s, OneHop(), outcomes)  # type: ignore[arg-type]
    for n, domain in enumerate(["a.example", "secure.example", "b.example"]):
        await dispatcher.dispatch(stored(n, domain), parse_queue_name(domain))
    assert set(dispatcher.sites) == {"mx.example:25", "mx.example:25 tls=required"}
    assert dispatcher.sites["mx.example:25"].tls_mode == "opportunistic"
    assert dispatcher.sites["mx.example:25 tls=required"].tls_mode == "required"
    # the records name the site as before; the contexts are the process's
    assert {site.name for site in dispatcher.sites.values()} == {"mx.example:25"}
    assert all(site.tls is dispatcher.tls for site in dispatcher.sites.values())
    await until(lambda: len(outcomes.stopped) == 3)
    await dispatcher.stop(1.0)


async def test_without_tls_overrides_the_site_key_is_the_hop():
    s = settings({"tls": "required"})
    dispatcher = Dispatcher(s, OneHop(), StopEverything(s))  # type: ignore[arg-type]
    await dispatcher.dispatch(stored(1, "a.example"), parse_queue_name("a.example"))
    assert list(dispatcher.sites) == ["mx.example:25"]
    assert dispatcher.sites["mx.example:25"].tls_mode == "required"
    await dispatcher.stop(1.0)
