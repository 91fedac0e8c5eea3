"""``sluice dkim-keygen``: a DKIM key pair, the private key to a file and the
DNS TXT record to publish to standard output.

The private key is PEM (PKCS#8) for both algorithms, the form ``[dkim]``
``key_file`` reads. The record's ``p=`` is what verifiers expect: for RSA the
base64 of the DER SubjectPublicKeyInfo (RFC 6376, 3.6.1), for Ed25519 the
base64 of the raw 32-byte public key (RFC 8463, 4.2).
"""

from __future__ import annotations

import base64
import os

import click
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ..config import DkimSettings
from ..message import AddressError, normalize_domain
from ..reception.dkim import MIN_RSA_BITS

TXT_STRING_MAX = 255  # RFC 1035, 3.3: one character-string of a TXT record


def _bad(option: str, message: str) -> click.BadParameter:
    return click.BadParameter(message, ctx=click.get_current_context(silent=True),
                              param_hint=f"'{option}'")


def check_domain(value: str) -> str:
    """The signing domain in its ASCII form (d= and the key's DNS name)."""
    try:
        domain = normalize_domain(value)
    except AddressError as exc:
        raise _bad("--domain", str(exc)) from None
    if domain.startswith("["):
        raise _bad("--domain", f"{value!r}: DKIM needs a domain name, not an address literal")
    return domain


def check_selector(value: str) -> str:
    """The same rule as the ``selector`` of ``[dkim]`` in the config."""
    try:
        return DkimSettings._check_selector(value)
    except ValueError as exc:
        raise _bad("--selector", str(exc)) from None


def txt_record(selector: str, domain: str, algorithm: str, public: bytes) -> str:
    """``S._domainkey.D IN TXT "..."``, the value split into strings of at most
    255 characters (a DNS TXT string's limit; verifiers join them)."""
    k = "ed25519" if algorithm == "ed25519-sha256" else "rsa"
    value = f"v=DKIM1; k={k}; p={base64.b64encode(public).decode('ascii')}"
    strings = " ".join(f'"{value[i:i + TXT_STRING_MAX]}"'
                       for i in range(0, len(value), TXT_STRING_MAX))
    return f"{selector}._domainkey.{domain} IN TXT {strings}"


def generate(algorithm: str, bits: int) -> tuple[bytes, bytes]:
    """A new key pair: (private key as PEM, the public key as the record's p= takes it)."""
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "ed25519-sha256":
        key = ed25519.Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, public


def write_new(path: str, data: bytes) -> None:
    """Write ``data`` to a new file readable by its owner only; an existing
    file is never replaced (it may be the key a published record names)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise click.ClickException(f"{path} exists; not overwriting a key (remove it or "
                                   "choose another --out)") from None
    except OSError as exc:
        raise click.ClickException(f"{path}: cannot create: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        os.unlink(path)
        raise click.ClickException(f"{path}: cannot write: {exc.strerror or exc}") from None


def run(domain: str, selector: str, algorithm: str, out: str | None, bits: int) -> int:
    """Check the options (a bad one is a usage error, exit 2), make the key,
    write it (an existing file is an error, exit 1), print the record."""
    domain, selector = check_domain(domain), check_selector(selector)
    if algorithm == "rsa-sha256" and not MIN_RSA_BITS <= bits <= 8192:
        raise _bad("--bits", f"{bits}: an RSA key has {MIN_RSA_BITS} to 8192 bits "
                   "(2048 is what verifiers expect)")
    path = out or f"{selector}.{domain}.key"
    pem, public = generate(algorithm, bits)
    write_new(path, pem)
    click.echo(f"sluice: private key written to {path}; publish this record, then add to "
               f'the config:\n  [dkim."{domain}"]\n  selector = "{selector}"\n'
               f'  key_file = "{os.path.abspath(path)}"' +
               (f'\n  algorithm = "{algorithm}"' if algorithm != "rsa-sha256" else ""),
               err=True)
    click.echo(txt_record(selector, domain, algorithm, public))
    return 0
