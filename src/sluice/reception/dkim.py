"""DKIM signing at reception (RFC 6376; ed25519-sha256 from RFC 8463).

Mail whose header From domain, or a parent domain of it, has a
``[dkim."domain"]`` key is signed once, when it is received and before it is
acknowledged: what is stored is what is delivered, so every attempt carries
the same signature and a retry costs no signing. The most specific domain
wins (``news.example.org`` before ``example.org``).

Keys are read, checked against their ``algorithm`` and tried once when the
signer is built, in every process that signs: a key that cannot be used
stops the server at start instead of failing every message. Neither key
material nor its parser's messages ever reach an error or a log line.

dkimpy does the signing (relaxed/relaxed canonicalization), except for the
RSA step itself: dkimpy computes it in pure Python (about 10 ms a message
with a 2048-bit key), OpenSSL through ``cryptography`` in a small fraction of
that. PKCS#1 v1.5 signatures are deterministic, so the bytes are the same.
dkimpy's parsing of the PEM key is kept per key instead of done per message. It takes an RSA
key as PEM and an Ed25519 key as the base64 of its 32-byte seed; key files
may be PEM for both (``sluice dkim-keygen`` writes PEM), and for Ed25519 also
that base64 seed (what dkimpy's own ``dknewkey`` writes).
"""

from __future__ import annotations

import base64
import binascii
import functools
from dataclasses import dataclass
from email.utils import getaddresses

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from ..config import ConfigError, DkimSettings, Settings
from ..message import AddressError, normalize_domain
from .intake import header_values

# Signed when ``headers`` is not set. A listed header the message lacks is
# signed as absent, so it cannot be added on the way without breaking the
# signature (a Reply-To or List-Unsubscribe slipped into a replayed message);
# From is listed twice so that no second From can be added either.
DEFAULT_HEADERS: tuple[str, ...] = (
    "From", "From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID",
    "In-Reply-To", "References", "MIME-Version", "Content-Type",
    "Content-Transfer-Encoding", "List-Unsubscribe", "List-Unsubscribe-Post",
)

MIN_RSA_BITS = 1024     # RFC 8301: verifiers ignore signatures by smaller keys
_MAX_KEY_FILE = 65536   # far above any PEM key; a bigger file is not one
_CANONICALIZE = (b"relaxed", b"relaxed")
_PROBE = b"From: probe@%s\r\nSubject: key check\r\n\r\nkey check\r\n"


# The RSA keys loaded here, by modulus, as OpenSSL keys (see the module docstring).
_OPENSSL_KEYS: dict[int, rsa.RSAPrivateKey] = {}
_dkimpy_rsa_sign = dkim.RSASSA_PKCS1_v1_5_sign


def _rsa_sign(digest: object, private_key: dict) -> bytes:
    """dkimpy's ``RSASSA_PKCS1_v1_5_sign``, computed by OpenSSL for our keys."""
    key = _OPENSSL_KEYS.get(private_key["modulus"])
    value = digest.digest()  # type: ignore[attr-defined]
    if key is None or len(value) != 32:  # not ours, or not SHA-256: dkimpy's own
        return _dkimpy_rsa_sign(digest, private_key)
    return key.sign(value, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


dkim.RSASSA_PKCS1_v1_5_sign = _rsa_sign
# dkimpy parses the PEM key (in Python) for every message: once per key is enough.
dkim.parse_pem_private_key = functools.lru_cache(maxsize=64)(dkim.parse_pem_private_key)


class DkimError(Exception):
    """A message that cannot be signed: a temporary failure, nothing stored
    (SMTP ``451 4.3.0``, HTTP 503)."""


@dataclass(frozen=True, slots=True)
class _Key:
    domain: bytes          # d=, the configured domain in its ASCII form
    selector: bytes
    algorithm: bytes
    private: bytes         # as dkimpy takes it (see the module docstring)
    headers: tuple[bytes, ...]


class DkimSigner:
    """Signs mail with the ``[dkim]`` keys of ``settings`` (see the module docstring)."""

    Error = DkimError  # what ``sign`` raises

    def __init__(self, settings: Settings) -> None:
        self._keys: dict[str, _Key] = {
            domain: _load(domain, conf) for domain, conf in settings.dkim.items()}

    def key_domain(self, from_domain: str) -> str | None:
        """The configured domain whose key signs mail from ``from_domain``
        (normalized): itself or its closest parent with a key."""
        labels = from_domain.split(".")
        for i in range(len(labels)):
            candidate = ".".join(labels[i:])
            if candidate in self._keys:
                return candidate
        return None

    def sign(self, body: bytes) -> bytes:
        """``body`` with a DKIM-Signature header prepended when its From
        domain has a key; otherwise ``body`` itself. Raises DkimError."""
        if not self._keys:
            return body
        domain = from_domain(body)
        signing = self.key_domain(domain) if domain is not None else None
        if signing is None:
            return body
        key = self._keys[signing]
        try:
            header = dkim.sign(body, key.selector, key.domain, key.private,
                               canonicalize=_CANONICALIZE, signature_algorithm=key.algorithm,
                               include_headers=list(key.headers))
        except dkim.KeyFormatError:
            raise DkimError(f"{signing}: the key cannot sign") from None
        except dkim.DKIMException as exc:
            raise DkimError(f"{signing}: {_short(str(exc))}") from None
        except Exception as exc:  # anything else in dkimpy: still no 250, no crash
            raise DkimError(f"{signing}: signing failed ({type(exc).__name__})") from None
        return header + body


def from_domain(body: bytes) -> str | None:
    """The normalized domain of the first address in the header From of
    ``body``, or None when there is no usable one (such mail is not signed).
    Only the header section is read."""
    end = body.find(b"\r\n\r\n")
    value = header_values(body if end < 0 else body[:end + 2], ["From"]).get("From")
    if not value:
        return None
    addresses = getaddresses([value])
    address = addresses[0][1] if addresses else ""
    local, at, domain = address.rpartition("@")
    if not (local and at and domain):
        return None
    try:
        return normalize_domain(domain)
    except AddressError:
        return None


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _where(domain: str, key: str) -> str:
    return f'dkim."{domain}".{key}'


def _load(domain: str, conf: DkimSettings) -> _Key:
    """Read, check and try the key of ``[dkim."domain"]``; ConfigError naming
    the key otherwise."""
    where = f"{_where(domain, 'key_file')}: {conf.key_file}"
    try:
        with open(conf.key_file, "rb") as fh:
            data = fh.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror or exc}") from None
    if len(data) > _MAX_KEY_FILE:
        raise ConfigError(f"{where}: larger than {_MAX_KEY_FILE} bytes, not a key file")
    try:
        if conf.algorithm == "ed25519-sha256":
            private = _ed25519_seed(data, conf.algorithm)
        else:
            private = _rsa_pem(data, conf.algorithm)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    key = _Key(domain.encode("ascii"), conf.selector.encode("ascii"),
               conf.algorithm.encode("ascii"), private,
               _headers(domain, conf.headers))
    try:
        dkim.sign(_PROBE % key.domain, key.selector, key.domain, key.private,
                  canonicalize=_CANONICALIZE, signature_algorithm=key.algorithm,
                  include_headers=list(key.headers))
    except Exception as exc:
        raise ConfigError(f"{where}: the key cannot sign ({type(exc).__name__})") from None
    return key


def _headers(domain: str, names: list[str] | None) -> tuple[bytes, ...]:
    """The header names to sign, checked: From among them, none that RFC 6376
    says not to sign (dkimpy refuses those on every message)."""
    if names is None:
        return tuple(n.lower().encode("ascii") for n in DEFAULT_HEADERS)
    out: list[bytes] = []
    for name in names:
        if not name or not name.isascii() or not all("!" <= c <= "~" and c != ":" for c in name):
            raise ConfigError(f"{_where(domain, 'headers')}: {name!r} is not a header name")
        lower = name.lower().encode("ascii")
        if lower in dkim.DKIM.SHOULD_NOT:
            raise ConfigError(f"{_where(domain, 'headers')}: {name} must not be signed "
                              "(RFC 6376, 5.4.1: it changes on the way)")
        out.append(lower)
    if b"from" not in out:
        raise ConfigError(f"{_where(domain, 'headers')}: must include From (RFC 6376, 5.4)")
    return tuple(out)


def _kind(key: object) -> str:
    for cls, name in ((rsa.RSAPrivateKey, "an RSA"), (ed25519.Ed25519PrivateKey, "an Ed25519"),
                      (ec.EllipticCurvePrivateKey, "an EC")):
        if isinstance(key, cls):
            return name
    return f"a {type(key).__name__.removesuffix('PrivateKey') or 'private'}"


def _pem_private_key(data: bytes) -> object:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError("the key is encrypted; DKIM keys are read without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("not a PEM private key") from None


def _rsa_pem(data: bytes, algorithm: str) -> bytes:
    """An RSA key as dkimpy reads it fastest (PKCS#1 PEM)."""
    key = _pem_private_key(data)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f'{_kind(key)} key, but algorithm is "{algorithm}" (an RSA key)')
    if key.key_size < MIN_RSA_BITS:
        raise ValueError(f"an RSA key of {key.key_size} bits; verifiers need at least "
                         f"{MIN_RSA_BITS}")
    _OPENSSL_KEYS[key.private_numbers().public_numbers.n] = key
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _ed25519_seed(data: bytes, algorithm: str) -> bytes:
    """An Ed25519 key, PEM or the base64 of its seed, as dkimpy takes it:
    the base64 of the 32-byte seed."""
    if b"-----BEGIN" in data:
        key = _pem_private_key(data)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f'{_kind(key)} key, but algorithm is "{algorithm}" '
                             "(an Ed25519 key)")
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
    else:
        try:
            seed = base64.b64decode(data.strip(), validate=True)
        except (binascii.Error, ValueError):
            seed = b""
        if len(seed) != 32:
            raise ValueError("neither a PEM private key nor the base64 of a 32-byte "
                             "Ed25519 seed")
    return base64.b64encode(seed)
