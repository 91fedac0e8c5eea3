"""Messages, their meta data, and scheduled queue names.

A scheduled queue name is built from a message's meta data (docs/ARCHITECTURE.md,
"Queues"):

    campaign:tenant@domain   both set
    campaign:@domain         only a campaign
    tenant@domain            only a tenant
    domain                   neither
    ...!routing_domain       suffix when a routing domain is set

Domains are lower-cased and IDNA-encoded (``xn--`` form); campaign and tenant
are kept exactly as given apart from surrounding white space.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass

import idna

_LDH_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_ADDRESS_LITERAL = re.compile(r"^\[[^\[\]\s]+\]$")


class AddressError(ValueError):
    """An address or domain that cannot be used; the message says why."""


def normalize_domain(domain: str) -> str:
    """Lower-case ``domain`` and convert it to its IDNA ASCII form.

    Address literals (``[192.0.2.1]``) are kept as they are. Raises
    AddressError for anything that is not a usable host name.
    """
    d = domain.strip().rstrip(".")
    if not d:
        raise AddressError("empty domain")
    if _ADDRESS_LITERAL.match(d):
        return d.lower()
    if d.isascii():
        ascii_name = d.lower()
    else:
        try:
            ascii_name = idna.encode(d, uts46=True).decode("ascii").lower()
        except (idna.IDNAError, UnicodeError) as exc:
            raise AddressError(f"invalid international domain {domain!r}: {exc}") from None
    if len(ascii_name) > 253:
        raise AddressError(f"domain {domain!r} is longer than 253 characters")
    for label in ascii_name.split("."):
        if not _LDH_LABEL.match(label):
            raise AddressError(f"invalid domain {domain!r}")
    return ascii_name


def split_address(address: str) -> tuple[str, str]:
    """Split ``local@domain`` into its local part and normalized domain."""
    local, at, domain = address.rpartition("@")
    if not at or not local:
        raise AddressError(f"address {address!r} needs the form local-part@domain")
    if len(local.encode("utf-8", "surrogateescape")) > 64:
        raise AddressError(f"local part of {address!r} is longer than 64 octets")
    if any(c.isspace() or ord(c) < 32 or c in "<>" for c in local):
        raise AddressError(f"local part of {address!r} has forbidden characters")
    return local, normalize_domain(domain)


def normalize_label(value: str | None) -> str | None:
    """Campaign/tenant normalization: strip white space; empty means not set."""
    if value is None:
        return None
    v = value.strip()
    return v or None


@dataclass(frozen=True, slots=True)
class QueueName:
    """The parts a scheduled queue name is made of."""

    domain: str
    campaign: str | None = None
    tenant: str | None = None
    routing_domain: str | None = None

    def __str__(self) -> str:
        return format_queue_name(self.domain, self.campaign, self.tenant, self.routing_domain)

    def meta(self) -> dict[str, str]:
        """The log record's ``meta``: the parts that are set, besides the domain."""
        return {k: v for k, v in (("tenant", self.tenant), ("campaign", self.campaign),
                                  ("routing_domain", self.routing_domain)) if v}


def format_queue_name(
    domain: str,
    campaign: str | None = None,
    tenant: str | None = None,
    routing_domain: str | None = None,
) -> str:
    """Build the scheduled queue name; ``domain`` must already be normalized."""
    if campaign and tenant:
        name = f"{campaign}:{tenant}@{domain}"
    elif campaign:
        name = f"{campaign}:@{domain}"
    elif tenant:
        name = f"{tenant}@{domain}"
    else:
        name = domain
    if routing_domain:
        name = f"{name}!{routing_domain}"
    return name


def parse_queue_name(name: str) -> QueueName:
    """Split a scheduled queue name into its parts.

    The domain (and routing domain) never contain ``@``, ``:`` (outside an
    address literal) or ``!``, so they are found from the right; whatever is
    before the last ``@`` is ``campaign:tenant`` (split at the first ``:``)
    or a tenant alone.
    """
    rest, bang, routing = name.rpartition("!")
    if not bang:
        rest, routing = name, ""
    prefix, at, domain = rest.rpartition("@")
    campaign = tenant = None
    if at:
        head, colon, tail = prefix.partition(":")
        if colon:
            campaign, tenant = head or None, tail or None
        else:
            tenant = prefix or None
    else:
        domain = rest
    if not domain:
        raise AddressError(f"queue name {name!r} has no domain")
    return QueueName(domain=domain, campaign=campaign, tenant=tenant, routing_domain=routing or None)


@dataclass(slots=True)
class Meta:
    """Per-message meta data that decides the queue."""

    tenant: str | None = None
    campaign: str | None = None
    routing_domain: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in (("tenant", self.tenant), ("campaign", self.campaign),
                                  ("routing_domain", self.routing_domain)) if v}


def queue_for(domain: str, meta: Meta) -> QueueName:
    """The scheduled queue a message to ``domain`` with ``meta`` belongs to."""
    return QueueName(domain=domain, campaign=meta.campaign, tenant=meta.tenant,
                     routing_domain=meta.routing_domain)


@functools.lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern.casefold()), re.S)


def glob_match(pattern: str, value: str) -> bool:
    """Whether ``value`` matches the glob ``pattern`` (``*``, ``?``, ``[...]``),
    case-insensitively: the one matcher of per-message criteria, used by the
    rules in memory and, as an SQL function, by the spool."""
    return _glob(pattern).match(value.casefold()) is not None
