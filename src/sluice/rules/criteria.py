"""Which scheduled queues a rule applies to.

A rule's criteria are ANDed: every criterion that is set must equal the
queue's part of the same name. ``queue_names`` instead lists exact queue
names. No criterion at all selects every queue. Domains are normalized as
queue names are (lower case, IDNA); campaign and tenant are case-sensitive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..message import QueueName, normalize_domain


@dataclass(frozen=True, slots=True)
class Criteria:
    campaign: str | None = None
    tenant: str | None = None
    domain: str | None = None
    routing_domain: str | None = None
    queue_names: tuple[str, ...] | None = None

    @classmethod
    def build(cls, *, campaign: str | None = None, tenant: str | None = None,
              domain: str | None = None, routing_domain: str | None = None,
              queue_names: list[str] | tuple[str, ...] | None = None) -> Criteria:
        """Criteria from operator input, normalized as queue names are.

        None means "any". A blank campaign, tenant, domain or queue name is an
        error (ValueError naming the field), never "any"; a bad domain raises
        AddressError (a ValueError). Queue names cannot be combined with the
        other criteria.
        """
        def label(field: str, value: str | None) -> str | None:
            if value is None:
                return None
            if not value.strip():
                raise ValueError(f"{field}: must not be empty")
            return value.strip()

        def domain_of(field: str, value: str | None) -> str | None:
            if value is None:
                return None
            if not value.strip():
                raise ValueError(f"{field}: must not be empty")
            return normalize_domain(value)

        names = None
        if queue_names is not None:
            names = tuple(sorted({q.strip() for q in queue_names}))
            if not names or "" in names:
                raise ValueError("queue_names: must be a non-empty list of non-empty queue names")
            if any(v is not None for v in (campaign, tenant, domain, routing_domain)):
                raise ValueError("queue_names cannot be combined with campaign, tenant, domain "
                                 "or routing_domain")
        return cls(campaign=label("campaign", campaign), tenant=label("tenant", tenant),
                   domain=domain_of("domain", domain),
                   routing_domain=domain_of("routing_domain", routing_domain),
                   queue_names=names)

    @property
    def everything(self) -> bool:
        return not (self.campaign or self.tenant or self.domain or self.routing_domain
                    or self.queue_names)

    def matches(self, name: str, parts: QueueName) -> bool:
        if self.queue_names is not None:
            return name in self.queue_names
        return ((self.campaign is None or self.campaign == parts.campaign)
                and (self.tenant is None or self.tenant == parts.tenant)
                and (self.domain is None or self.domain == parts.domain)
                and (self.routing_domain is None or self.routing_domain == parts.routing_domain))

    def as_dict(self) -> dict[str, Any]:
        return {"campaign": self.campaign, "tenant": self.tenant, "domain": self.domain,
                "routing_domain": self.routing_domain,
                "queue_names": list(self.queue_names) if self.queue_names is not None else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Criteria:
        qn = d.get("queue_names")
        return cls(campaign=d.get("campaign"), tenant=d.get("tenant"), domain=d.get("domain"),
                   routing_domain=d.get("routing_domain"),
                   queue_names=tuple(qn) if qn is not None else None)

    def describe(self) -> str:
        """Short text for tables: ``campaign=X domain=Y`` or ``everything``."""
        if self.queue_names is not None:
            return "queue=" + ",".join(self.queue_names)
        parts = [f"{k}={v}" for k, v in (("campaign", self.campaign), ("tenant", self.tenant),
                                         ("domain", self.domain),
                                         ("routing_domain", self.routing_domain)) if v]
        return " ".join(parts) or "everything"
