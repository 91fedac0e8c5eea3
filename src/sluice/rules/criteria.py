"""Which mail a rule applies to: ``Criteria``.

Queue criteria select scheduled queues: every criterion that is set must
equal the queue's part of the same name (AND), or ``queue_names`` lists exact
queue names. Domains are normalized as queue names are (lower case, IDNA);
campaign and tenant are case-sensitive.

Per-message criteria narrow that down, message by message, AND-combined
with the queue criteria: ``sender`` and ``recipient`` are glob patterns
matched case-insensitively (``message.glob_match``), ``older_than`` selects
messages created more than that many seconds ago. No criterion at all
selects everything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from ..durations import format_duration
from ..message import QueueName, glob_match, normalize_domain
from ..spool.base import MessageFilter


class Envelope(Protocol):
    """What per-message criteria look at (``spool.Stored``, ``spool.Inbound``)."""

    sender: str
    recipient: str
    created: float


@dataclass(frozen=True, slots=True)
class Criteria:
    campaign: str | None = None
    tenant: str | None = None
    domain: str | None = None
    routing_domain: str | None = None
    queue_names: tuple[str, ...] | None = None
    sender: str | None = None
    recipient: str | None = None
    older_than: float | None = None

    @classmethod
    def build(cls, *, campaign: str | None = None, tenant: str | None = None,
              domain: str | None = None, routing_domain: str | None = None,
              queue_names: list[str] | tuple[str, ...] | None = None,
              sender: str | None = None, recipient: str | None = None,
              older_than: float | None = None) -> Criteria:
        """Criteria from operator input, normalized as queue names are.

        None means "any". A blank campaign, tenant, domain, pattern or queue
        name is an error (ValueError naming the field), never "any"; a bad
        domain raises AddressError (a ValueError). Queue names cannot be
        combined with the other queue criteria.
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
        if older_than is not None and older_than <= 0:
            raise ValueError("older_than: must be longer than 0s")
        return cls(campaign=label("campaign", campaign), tenant=label("tenant", tenant),
                   domain=domain_of("domain", domain),
                   routing_domain=domain_of("routing_domain", routing_domain),
                   queue_names=names, sender=label("sender", sender),
                   recipient=label("recipient", recipient), older_than=older_than)

    @property
    def per_message(self) -> bool:
        """Whether the criteria look at each message, not only at its queue."""
        return self.sender is not None or self.recipient is not None or self.older_than is not None

    @property
    def everything(self) -> bool:
        return not (self.campaign or self.tenant or self.domain or self.routing_domain
                    or self.queue_names or self.per_message)

    def matches(self, name: str, parts: QueueName) -> bool:
        """The queue criteria: whether queue ``name`` can hold mail this selects."""
        if self.queue_names is not None:
            return name in self.queue_names
        return ((self.campaign is None or self.campaign == parts.campaign)
                and (self.tenant is None or self.tenant == parts.tenant)
                and (self.domain is None or self.domain == parts.domain)
                and (self.routing_domain is None or self.routing_domain == parts.routing_domain))

    def matches_message(self, msg: Envelope, now: float | None = None) -> bool:
        """The per-message criteria (the queue criteria are checked apart)."""
        if self.sender is not None and not glob_match(self.sender, msg.sender):
            return False
        if self.recipient is not None and not glob_match(self.recipient, msg.recipient):
            return False
        if self.older_than is not None:
            return msg.created < (time.time() if now is None else now) - self.older_than
        return True

    def message_filter(self, now: float | None = None) -> MessageFilter | None:
        """The per-message criteria as the spool filters rows (None: no filter)."""
        if not self.per_message:
            return None
        before = None
        if self.older_than is not None:
            before = (time.time() if now is None else now) - self.older_than
        return MessageFilter(sender=self.sender, recipient=self.recipient, created_before=before)

    def as_dict(self) -> dict[str, Any]:
        return {"campaign": self.campaign, "tenant": self.tenant, "domain": self.domain,
                "routing_domain": self.routing_domain,
                "queue_names": list(self.queue_names) if self.queue_names is not None else None,
                "sender": self.sender, "recipient": self.recipient,
                "older_than": self.older_than}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Criteria:
        qn = d.get("queue_names")
        return cls(campaign=d.get("campaign"), tenant=d.get("tenant"), domain=d.get("domain"),
                   routing_domain=d.get("routing_domain"),
                   queue_names=tuple(qn) if qn is not None else None,
                   sender=d.get("sender"), recipient=d.get("recipient"),
                   older_than=d.get("older_than"))

    def describe(self) -> str:
        """Short text for tables: ``campaign=X domain=Y sender=*@z`` or ``everything``."""
        parts = []
        if self.queue_names is not None:
            parts.append("queue=" + ",".join(self.queue_names))
        parts += [f"{k}={v}" for k, v in (("campaign", self.campaign), ("tenant", self.tenant),
                                          ("domain", self.domain),
                                          ("routing_domain", self.routing_domain),
                                          ("sender", self.sender),
                                          ("recipient", self.recipient)) if v]
        if self.older_than is not None:
            parts.append(f"older_than={format_duration(self.older_than)}")
        return " ".join(parts) or "everything"
