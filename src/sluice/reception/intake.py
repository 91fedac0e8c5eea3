"""What every received message goes through, whatever protocol brought it.

``Intake.accept`` turns one body and its recipients into messages: the queue
from the headers and config, the bounce rules checked (a caught message is
logged Reception + AdminBounce and never queued), one durable commit for all
of them. It returns once the commit is fsync'd: only then may the client be
told 250 (DESIGN invariant 1).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..logs import ADMIN_BOUNCE, RECEPTION, Response, admin_bounce_response, make_record
from ..message import Meta, normalize_label, queue_for, split_address
from ..node import node_id
from ..rules.store import RuleBook
from ..spool import Inbound, SqliteSpool, new_message_id


def header_values(body: bytes, names: list[str]) -> dict[str, str]:
    """First value of each header in ``names`` (case-insensitive), unfolded.

    Only the header section is read: it ends at the first empty line
    (CRLF or bare LF line endings alike).
    """
    wanted = {n.lower(): n for n in names}
    found: dict[str, bytearray] = {}
    current: str | None = None
    for raw in body.split(b"\n", 1000):
        line = raw.rstrip(b"\r")
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                found[current] += b" " + line.strip()
            continue
        current = None
        name, sep, value = line.partition(b":")
        if sep:
            key = name.strip().decode("latin-1").lower()
            if key in wanted and key not in found:
                found[key] = bytearray(value.strip())
                current = key
    return {wanted[k]: bytes(v).decode("utf-8", "replace") for k, v in found.items()}


@dataclass(slots=True)
class Accepted:
    ids: list[str]
    bounced: int


def summarize(items: list[Inbound]) -> dict[str, Any]:
    """What the queue side must learn of a committed reception (JSON-able).

    ``queues``: [name, domain, campaign, tenant, routing_domain, queued, held]
    per queue; ``bounced``: [rule_id, queue, n] for messages a rule caught.
    """
    queues: dict[str, list] = {}
    bounced: dict[tuple[str, str], int] = {}
    for i in items:
        name = str(i.queue)
        if i.terminal:
            if i.rule_id:
                bounced[(i.rule_id, name)] = bounced.get((i.rule_id, name), 0) + 1
            continue
        q = i.queue
        entry = queues.setdefault(name, [name, q.domain, q.campaign, q.tenant, q.routing_domain,
                                         0, i.held])
        entry[5] += 1
    return {"received": len(items), "queues": list(queues.values()),
            "bounced": [[rid, q, n] for (rid, q), n in bounced.items()]}


Report = Callable[[dict[str, Any]], Awaitable[None]]


class Intake:
    """``report`` hands each committed reception's summary to the queue side
    (its counters, the rules' counts, the promotion wake-up)."""

    def __init__(self, settings: Settings, spool: SqliteSpool, rules: RuleBook,
                 report: Report) -> None:
        self.settings = settings
        self.spool = spool
        self.rules = rules
        self.report = report
        self.nodeid = node_id(settings.data_path)

    def meta_for(self, body: bytes, domain: str) -> Meta:
        s = self.settings.smtp
        values = header_values(body, [s.tenant_header, s.campaign_header])
        return Meta(tenant=normalize_label(values.get(s.tenant_header)),
                    campaign=normalize_label(values.get(s.campaign_header)),
                    routing_domain=self.settings.routing_domains.get(domain))

    async def add_records(self, records: list[bytes]) -> None:
        """Log records that change nothing (a refused recipient)."""
        await self.spool.add_records(records)

    async def accept(self, body: bytes, sender: str, recipients: list[str], *, protocol: str,
                     peer: tuple[str, str] | None, session_id: str | None) -> Accepted:
        """Store one message per recipient; returns once durable."""
        now = time.time()
        node = self.nodeid
        # The reply that acknowledges the message: to the end of DATA (".") in SMTP.
        ack = Response(250, "OK", (2, 0, 0), None if protocol == "HTTP" else ".")
        items: list[Inbound] = []
        bounced = 0
        meta_cache: dict[str, Meta] = {}
        for rcpt in recipients:
            _, domain = split_address(rcpt)
            meta = meta_cache.get(domain)
            if meta is None:
                meta = meta_cache[domain] = self.meta_for(body, domain)
            queue = queue_for(domain, meta)
            name = str(queue)
            msg_id = new_message_id(name)
            common = dict(msg_id=msg_id, sender=sender, recipient=rcpt, queue=name,
                          meta=meta.as_dict(), size=len(body), created=now, nodeid=node,
                          peer=peer, reception_protocol=protocol, session_id=session_id, now=now)
            records = [make_record(RECEPTION, num_attempts=0, response=ack, **common)]
            item = Inbound(id=msg_id, queue=queue, sender=sender, recipient=rcpt, created=now,
                           protocol=protocol, records=records)
            rule = self.rules.bounce_for(name, queue)
            if rule is not None:
                item.terminal = True
                item.rule_id = rule.id
                if not rule.suppress_logging:
                    records.append(make_record(ADMIN_BOUNCE, num_attempts=0,
                                               response=admin_bounce_response(rule.reason),
                                               **{**common, "peer": None}))
                bounced += 1
            else:
                item.held = self.rules.suspended(name, queue) is not None
            items.append(item)
        await self.spool.receive(body, items)
        await self.report(summarize(items))
        return Accepted(ids=[i.id for i in items], bounced=bounced)
