"""What every received message goes through, whatever protocol brought it.

``Intake.accept`` turns one body and its recipients into messages: the queue
from the headers and config, the rules checked (a message a bounce rule
catches is logged Reception + AdminBounce and never queued; one a suspension
selects is stored held), one durable commit for all of them. It returns once
the commit is fsync'd: only then may the client be told 250 (see
docs/ARCHITECTURE.md, "Durable before acknowledged").
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import Settings
from ..logs import RECEPTION, Response, Tls, make_record
from ..message import Meta, normalize_label, parse_queue_name, queue_for, split_address
from ..spool import Inbound, Spool, new_message_id
from ..xfer import PROTOCOL as XFER_PROTOCOL

if TYPE_CHECKING:
    from ..rules.bounce import Bounces
    from ..rules.suspend import Suspensions
    from ..xfer import XferBatch


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


class Intake:
    """Turns received mail into stored messages (see the module docstring).

    ``on_received(queued)`` runs after each commit: the queue side's cue
    that new mail may be due."""

    def __init__(self, settings: Settings, spool: Spool, bounces: Bounces,
                 suspensions: Suspensions, nodeid: str, stats: Counter[str],
                 on_received: Callable[[int], None]) -> None:
        self.settings = settings
        self.spool = spool
        self.bounces = bounces
        self.suspensions = suspensions
        self.nodeid = nodeid
        self.stats = stats
        self.on_received = on_received

    def meta_for(self, body: bytes, domain: str, tenant: str | None = None) -> Meta:
        """The message's tenant and campaign from its headers; ``tenant``,
        when given (an AUTH user's), wins over the header."""
        s = self.settings.smtp
        values = header_values(body, [s.tenant_header, s.campaign_header])
        return Meta(tenant=tenant or normalize_label(values.get(s.tenant_header)),
                    campaign=normalize_label(values.get(s.campaign_header)),
                    routing_domain=self.settings.routing_domains.get(domain))

    async def add_records(self, records: list[bytes]) -> None:
        """Log records that change nothing (a refused recipient)."""
        await self.spool.add_records(records)

    async def accept(self, body: bytes, sender: str, recipients: list[str], *, protocol: str,
                     peer: tuple[str, str] | None, session_id: str | None,
                     tls: Tls | None = None, authn_id: str | None = None,
                     tenant: str | None = None) -> Accepted:
        """Store one message per recipient; returns once durable. ``tls``,
        ``authn_id``: the session's, for the Reception record; ``tenant``:
        forced by the AUTH user's line."""
        now = time.time()
        size = len(body)
        # The reply that acknowledges the message: to the end of DATA (".") in SMTP.
        ack = Response(250, "OK", (2, 0, 0), None if protocol == "HTTP" else ".")
        items: list[Inbound] = []
        meta_cache: dict[str, Meta] = {}
        for rcpt in recipients:
            _, domain = split_address(rcpt)
            meta = meta_cache.get(domain)
            if meta is None:
                meta = meta_cache[domain] = self.meta_for(body, domain, tenant)
            queue = queue_for(domain, meta)
            name = str(queue)
            msg_id = new_message_id(name)
            item = Inbound(id=msg_id, queue=queue, sender=sender, recipient=rcpt, created=now,
                           protocol=protocol)
            item.records.append(make_record(
                RECEPTION, msg_id=msg_id, sender=sender, recipient=rcpt, queue=name,
                meta=meta.as_dict() if authn_id is None else {**meta.as_dict(), "authn_id": authn_id},
                size=size, created=now, num_attempts=0, nodeid=self.nodeid,
                response=ack, peer=peer, reception_protocol=protocol, session_id=session_id,
                tls=tls, now=now))
            self._check(item, size, meta.as_dict(), session_id)
            items.append(item)
        await self.spool.receive(body, items)
        return Accepted(ids=[i.id for i in items], bounced=self._received(items))

    def _check(self, item: Inbound, size: int, meta: dict[str, str],
               session_id: str | None) -> None:
        """The rules' say on a message being received: a bounce rule catches it
        (terminal, with its AdminBounce record), holds it (in the rule's grace),
        or a suspension holds it."""
        name = str(item.queue)
        rule = self.bounces.check(name, item.queue, item)
        if rule is not None and rule.pending():
            item.held = True  # in its grace: held, not bounced
        elif rule is not None:
            item.terminal = True
            item.rule_id = rule.id
            rec = self.bounces.record_at_reception(item, rule, size=size, meta=meta,
                                                   session_id=session_id)
            if rec is not None:
                item.records.append(rec)
        else:
            item.held = self.suspensions.check(name, item.queue, item) is not None

    def _received(self, items: list[Inbound]) -> int:
        """Count what was stored (committed); returns how many were bounced."""
        self.stats[RECEPTION] += len(items)
        caught = Counter((i.rule_id, str(i.queue)) for i in items if i.terminal and i.rule_id)
        for (rule_id, name), n in caught.items():
            self.bounces.counted(rule_id, [(name, n)])
        bounced = sum(1 for i in items if i.terminal)
        if len(items) > bounced:
            self.on_received(len(items) - bounced)
        return bounced

    async def accept_transferred(self, batch: XferBatch, peer: tuple[str, str] | None
                                 ) -> tuple[int, int]:
        """Store what an xfer of another node sent (see ``sluice.xfer``): each
        message keeps its id, created time, due time and attempts, gets a
        Reception record (protocol ``Xfer``) and the rules' checks. A message
        already held here, or sent before by the same xfer, is skipped.
        Returns (stored, known) once durable. ValueError: a message that
        cannot be taken (its field named)."""
        now = time.time()
        ack = Response(250, "OK", (2, 0, 0), None)
        items: list[Inbound] = []
        for n, m in enumerate(batch.messages):
            if not 0 <= m.body < len(batch.bodies):
                raise ValueError(f"messages.{n}.body: no such body in the batch")
            if not m.id or len(m.id) > 64 or not m.id.isalnum():
                raise ValueError(f"messages.{n}.id: not a message id")
            try:
                queue = parse_queue_name(m.queue)
                split_address(m.recipient)
            except ValueError as exc:
                raise ValueError(f"messages.{n}: {exc}") from None
            size = len(batch.bodies[m.body])
            item = Inbound(id=m.id, queue=queue, sender=m.sender, recipient=m.recipient,
                           created=m.created, protocol=m.protocol, due=m.due,
                           attempts=m.attempts, body=m.body)
            item.records.append(make_record(
                RECEPTION, msg_id=m.id, sender=m.sender, recipient=m.recipient,
                queue=str(queue), meta=queue.meta(), size=size, created=m.created,
                num_attempts=m.attempts, nodeid=self.nodeid, response=ack, peer=peer,
                reception_protocol=XFER_PROTOCOL, now=now))
            self._check(item, size, queue.meta(), None)
            items.append(item)
        if not items:
            return 0, 0
        fresh = await self.spool.receive_transferred(batch.xfer, batch.bodies, items)
        self._received(fresh)
        return len(fresh), len(items) - len(fresh)
