"""STARTTLS for reception: the server certificate and its TLS context.

With ``[smtp] tls_certificate`` and ``tls_private_key`` set, those PEM files
are used. With neither, the main process makes a self-signed certificate for
``[smtp] hostname`` under ``<data_dir>/tls/`` on first start (an ECDSA P-256
key, ten years), so a server started on the embedded defaults offers
STARTTLS: clients that encrypt opportunistically, as most MTAs do, do not
check certificates. Reception processes load the same files.

TLS 1.2 is the minimum. A certificate or key that cannot be used stops the
server at start with a message naming the key and the file.
"""

from __future__ import annotations

import datetime
import os
import ssl
from pathlib import Path

from ..config import ConfigError, Settings


class TlsSetupError(ConfigError):
    """The certificate or key cannot be used; the message names which and why."""


def certificate_paths(settings: Settings) -> tuple[Path, Path, bool]:
    """(certificate, key, self-signed?) for reception."""
    s = settings.smtp
    if s.tls_certificate is not None and s.tls_private_key is not None:
        return Path(s.tls_certificate), Path(s.tls_private_key), False
    d = settings.data_path / "tls"
    return d / "cert.pem", d / "key.pem", True


def ensure_certificate(settings: Settings) -> None:
    """Make the self-signed certificate when none is configured and none was
    made before; check that the certificate and key form a usable pair."""
    cert, key, self_signed = certificate_paths(settings)
    if self_signed and not (cert.exists() and key.exists()):
        _make_self_signed(settings.smtp.hostname, cert, key)
    server_context(settings)


def server_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of every reception session (TLS 1.2 or later)."""
    cert, key, self_signed = certificate_paths(settings)
    where = (f"the self-signed certificate in {cert.parent}" if self_signed
             else "smtp.tls_certificate / smtp.tls_private_key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TlsSetupError(f"{where}: cannot read {exc.filename!r}: {exc.strerror}") from None
    except PermissionError as exc:
        raise TlsSetupError(f"{where}: cannot read {exc.filename!r}: {exc.strerror}") from None
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        raise TlsSetupError(f"{where}: {cert} and {key} are not a usable PEM certificate "
                            f"and private key ({reason})") from None
    return ctx


def _make_self_signed(hostname: str, cert_path: Path, key_path: Path) -> None:
    # made once per data directory: cryptography's x509 is not loaded otherwise
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    # The key first, private from its creation; each file written whole
    # under a temporary name, so a crash never leaves half a pair.
    tmp_key = key_path.with_suffix(".tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.replace(tmp_key, key_path)
    tmp_cert = cert_path.with_suffix(".tmp")
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_cert, cert_path)
