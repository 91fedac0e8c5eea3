"""DKIM signing: which key signs what, the keys it refuses, and signatures
that dkimpy's verifier accepts with the public key ``dkim-keygen`` prints."""

from __future__ import annotations

import base64
import dataclasses
import re
import subprocess
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from dkim.util import parse_tag_value

from sluice.cli.dkim import generate, txt_record
from sluice.config import ConfigError, settings_from_dict
from sluice.reception.dkim import DkimError, DkimSigner, from_domain

MESSAGE = (b"From: Someone <x@%s>\r\nTo: y@example.com\r\nSubject: hello\r\n"
           b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n"
           b"\r\nHello there.\r\n.a line with a dot\r\n")

ALGORITHMS = ["rsa-sha256", "ed25519-sha256"]


class Keys:
    """Key files made as ``sluice dkim-keygen`` makes them, and the DNS
    records it prints for them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.records: dict[bytes, bytes] = {}   # DNS name -> TXT value (strings joined)

    def make(self, domain: str, selector: str, algorithm: str = "rsa-sha256") -> Path:
        pem, public = generate(algorithm, 2048)
        path = self.tmp / f"{selector}.{domain}.key"
        path.write_bytes(pem)
        record = txt_record(selector, domain, algorithm, public)
        name, _, rest = record.partition(" IN TXT ")
        self.records[name.encode() + b"."] = "".join(re.findall(r'"([^"]*)"', rest)).encode()
        return path

    def dns(self, name: bytes, timeout: float = 5) -> bytes | None:
        return self.records.get(name)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


def signer(dkim_tables: dict[str, dict]) -> DkimSigner:
    return DkimSigner(settings_from_dict({"dkim": dkim_tables}))


def tags(signed: bytes) -> dict[bytes, bytes]:
    header = signed.split(b"\r\n\r\n", 1)[0]
    assert header.startswith(b"DKIM-Signature: ")
    value = re.match(rb"DKIM-Signature: (.*?)\r\n(?![ \t])", header + b"\r\n", re.S).group(1)
    return parse_tag_value(value)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_signature_verifies_with_the_printed_public_key(keys, algorithm):
    key = keys.make("example.org", "s1", algorithm)
    body = MESSAGE % b"example.org"
    signed = signer({"example.org": {"selector": "s1", "key_file": str(key),
                                     "algorithm": algorithm}}).sign(body)
    assert signed.endswith(body) and signed != body
    t = tags(signed)
    assert (t[b"a"], t[b"d"], t[b"s"], t[b"c"]) == (
        algorithm.encode(), b"example.org", b"s1", b"relaxed/relaxed")
    assert re.sub(rb"\s", b"", t[b"h"]).split(b":")[:2] == [b"from", b"from"]
    assert dkim.verify(signed, dnsfunc=keys.dns)
    # relaxed canonicalization: refolded headers and trailing spaces still verify
    relaxed = signed.replace(b"Subject: hello", b"Subject:   hello ")
    assert dkim.verify(relaxed, dnsfunc=keys.dns)
    assert not dkim.verify(signed.replace(b"Hello there", b"Hello world"), dnsfunc=keys.dns)
    assert not dkim.verify(signed.replace(b"Subject: hello", b"Subject: hullo"),
                           dnsfunc=keys.dns)


def test_a_second_from_header_breaks_the_signature(keys):
    """From is signed one time more than it occurs: none can be added."""
    key = keys.make("example.org", "s1")
    signed = signer({"example.org": {"selector": "s1", "key_file": str(key)}}).sign(
        MESSAGE % b"example.org")
    forged = signed.replace(b"From: Someone", b"From: evil@attacker.test\r\nFrom: Someone")
    assert dkim.verify(signed, dnsfunc=keys.dns)
    assert not dkim.verify(forged, dnsfunc=keys.dns)


def test_the_most_specific_domain_with_a_key_signs(keys):
    s = signer({
        "example.org": {"selector": "top", "key_file": str(keys.make("example.org", "top"))},
        "News.Example.ORG": {"selector": "news", "algorithm": "ed25519-sha256",
                             "key_file": str(keys.make("news.example.org", "news",
                                                       "ed25519-sha256"))},
    })
    expected = {
        b"example.org": (b"example.org", b"top"),
        b"other.example.org": (b"example.org", b"top"),            # parent fallback
        b"news.example.org": (b"news.example.org", b"news"),
        b"a.b.NEWS.example.org": (b"news.example.org", b"news"),   # closest parent
    }
    for domain, (d, sel) in expected.items():
        signed = s.sign(MESSAGE % domain)
        t = tags(signed)
        assert (t[b"d"], t[b"s"]) == (d, sel), domain
        assert dkim.verify(signed, dnsfunc=keys.dns), domain


@pytest.mark.parametrize("body", [
    MESSAGE % b"example.com",                       # no key for that domain
    MESSAGE % b"notexample.org",                     # a suffix is not a parent
    b"To: y@example.com\r\nSubject: no From\r\n\r\nhi\r\n",
    b"From: undisclosed-recipients:;\r\n\r\nhi\r\n",
    b"From: x@\r\n\r\nhi\r\n",
    b"From: not an address\r\n\r\nhi\r\n",
    b"Subject: x\r\n\r\nFrom: x@example.org\r\n",    # a From in the body is no header
])
def test_mail_without_a_key_for_its_from_domain_is_unchanged(keys, body):
    s = signer({"example.org": {"selector": "s1", "key_file": str(keys.make("example.org", "s1"))}})
    assert s.sign(body) == body


def test_no_keys_configured_returns_the_very_same_bytes():
    body = MESSAGE % b"example.org"
    assert DkimSigner(settings_from_dict({})).sign(body) is body


def test_the_from_domain_comes_from_the_first_address_of_the_header():
    assert from_domain(b'From: "Doe, J." <j@Sub.Example.ORG>\r\n\r\n') == "sub.example.org"
    assert from_domain(b"From: j@example.org (a comment)\r\n\r\n") == "example.org"
    assert from_domain(b"From: a@one.test, b@two.test\r\n\r\n") == "one.test"
    assert from_domain(b"From:\r\n =?utf-8?q?J?= <j@b\xc3\xbccher.example>\r\n\r\n") == \
        "xn--bcher-kva.example"


def test_configured_headers_are_the_ones_signed(keys):
    key = keys.make("example.org", "s1")
    s = signer({"example.org": {"selector": "s1", "key_file": str(key),
                                "headers": ["From", "Subject", "X-Campaign"]}})
    signed = s.sign(MESSAGE % b"example.org")
    assert re.sub(rb"\s", b"", tags(signed)[b"h"]) == b"from:subject:x-campaign"
    assert dkim.verify(signed, dnsfunc=keys.dns)
    # To is not signed: changing it keeps the signature valid
    assert dkim.verify(signed.replace(b"To: y@", b"To: z@"), dnsfunc=keys.dns)


def test_ed25519_key_as_dkimpys_base64_seed_is_accepted(keys, tmp_path):
    keys.make("example.org", "s1", "ed25519-sha256")
    pem = (tmp_path / "s1.example.org.key").read_bytes()
    seed = serialization.load_pem_private_key(pem, None).private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
        serialization.NoEncryption())
    seed_file = tmp_path / "seed.key"
    seed_file.write_bytes(base64.b64encode(seed) + b"\n")
    signed = signer({"example.org": {"selector": "s1", "key_file": str(seed_file),
                                     "algorithm": "ed25519-sha256"}}).sign(MESSAGE % b"example.org")
    assert dkim.verify(signed, dnsfunc=keys.dns)


def _pem(key, password: bytes | None = None) -> bytes:
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def _bad_keys(tmp: Path) -> dict[str, tuple[bytes, str, str]]:
    """name -> (file content, algorithm, what the error says)"""
    rsa_key = _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    ed_key = _pem(ed25519.Ed25519PrivateKey.generate())
    small = subprocess.run(["openssl", "genrsa", "512"], capture_output=True, check=True).stdout
    return {
        "garbage": (b"this is not a key\n", "rsa-sha256", "not a PEM private key"),
        "garbage-ed25519": (b"bm90IGEga2V5\n", "ed25519-sha256",
                            "neither a PEM private key nor the base64 of a 32-byte"),
        "truncated": (rsa_key[:400], "rsa-sha256", "not a PEM private key"),
        "rsa-for-ed25519": (rsa_key, "ed25519-sha256",
                            'an RSA key, but algorithm is "ed25519-sha256"'),
        "ed25519-for-rsa": (ed_key, "rsa-sha256", 'an Ed25519 key, but algorithm is "rsa-sha256"'),
        "ec": (_pem(ec.generate_private_key(ec.SECP256R1())), "rsa-sha256", "an EC key"),
        "encrypted": (_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048),
                           b"secret"), "rsa-sha256", "the key is encrypted"),
        "small": (small, "rsa-sha256", "an RSA key of 512 bits"),
        "public-key": (rsa.generate_private_key(public_exponent=65537, key_size=2048)
                       .public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo),
                       "rsa-sha256", "not a PEM private key"),
    }


def test_unusable_keys_are_config_errors_naming_the_key_never_its_material(tmp_path):
    for name, (content, algorithm, problem) in _bad_keys(tmp_path).items():
        path = tmp_path / f"{name}.key"
        path.write_bytes(content)
        with pytest.raises(ConfigError) as info:
            signer({"example.org": {"selector": "s1", "key_file": str(path),
                                    "algorithm": algorithm}})
        msg = str(info.value)
        assert msg.startswith(f'dkim."example.org".key_file: {path}: '), (name, msg)
        assert problem in msg, (name, msg)
        for line in content.decode("latin-1").splitlines():
            if len(line) >= 12 and not line.startswith("-----"):
                assert line not in msg, name


def test_a_key_file_that_cannot_be_read_is_a_config_error(tmp_path):
    # the config check finds it first; a key file removed in between is also named
    with pytest.raises(ConfigError, match=r'dkim\."example\.org"\.key_file: .*No such file'):
        signer({"example.org": {"selector": "s1", "key_file": str(tmp_path / "missing.key")}})


@pytest.mark.parametrize("headers, problem", [
    (["Subject", "To"], "must include From"),
    (["From", "Received"], "Received must not be signed"),
    (["From", "DKIM-Signature"], "DKIM-Signature must not be signed"),
    (["From", "Sub ject"], "'Sub ject' is not a header name"),
    (["From", "X:Y"], "'X:Y' is not a header name"),
])
def test_headers_that_cannot_be_signed_are_config_errors(keys, headers, problem):
    with pytest.raises(ConfigError) as info:
        signer({"example.org": {"selector": "s1", "headers": headers,
                                "key_file": str(keys.make("example.org", "s1"))}})
    assert str(info.value).startswith('dkim."example.org".headers: ')
    assert problem in str(info.value)


def test_a_message_dkimpy_cannot_parse_is_a_signing_error(keys):
    """A header section with a line that is no header field: the one input
    dkimpy refuses. Mail from domains without a key goes on unchanged."""
    s = signer({"example.org": {"selector": "s1", "key_file": str(keys.make("example.org", "s1"))}})
    broken = b"From: x@%s\r\nthis line is no header\r\nSubject: x\r\n\r\nbody\r\n"
    with pytest.raises(DkimError, match=r"^example\.org: Unexpected characters in RFC822 header"):
        s.sign(broken % b"example.org")
    assert s.sign(broken % b"example.com") == broken % b"example.com"


def test_a_key_that_fails_at_signing_time_is_a_signing_error_without_its_material(keys):
    """The key was checked at start; should signing with it fail anyway, the
    error says so without the key."""
    s = signer({"example.org": {"selector": "s1", "key_file": str(keys.make("example.org", "s1"))}})
    key = s._keys["example.org"]
    s._keys["example.org"] = dataclasses.replace(
        key, private=b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END")
    with pytest.raises(DkimError) as info:
        s.sign(MESSAGE % b"example.org")
    assert str(info.value) == "example.org: the key cannot sign"
