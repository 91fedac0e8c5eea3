"""The queue manager: promotes due mail to ready queues and records fates.

Promotion claims due messages from the spool (a bounded batch, so memory
does not grow with the spool), checks the rules, resolves each message's
next hop and hands it to that site's ready queue. Every outcome of an
attempt comes back here and becomes exactly one spool change with its log
records: delivered, bounced, failed (retry or expire) or admin-bounced.

``owned`` holds the ids of the claimed messages that this process is
responsible for (the spool adds an id in the same step that claims it; it
leaves when its fate is recorded, or when recording it failed). A claimed
message that nobody owns lost its way through a bug or a failed write: the
reaper gives it a TransientFailure record and a retry (or its admin bounce,
when a bounce rule matches it), and a bounce sweep removes it like any
other matching message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..config import Settings
from ..delivery.routes import Router
from ..logs import (
    ADMIN_BOUNCE,
    BOUNCE,
    DELIVERY,
    EXPIRATION,
    NO_ATTEMPT,
    RECEPTION,
    TRANSIENT_FAILURE,
    Attempt,
    Response,
    admin_bounce_response,
    internal_error,
    make_record,
    pack_admin_bounces,
)
from ..message import QueueName, parse_queue_name
from ..node import node_id
from ..rules.store import SUSPEND, Rule, RuleBook
from ..spool import SqliteSpool, Stored
from .dispatch import Delivery, Dispatcher, Outcomes
from .scheduled import expires_at, next_due

log = logging.getLogger(__name__)

_DELIVERY_KINDS = (DELIVERY, BOUNCE, TRANSIENT_FAILURE)

_Outcome = TypeVar("_Outcome", bound=Callable[..., Awaitable[Any]])


def _settles(method: _Outcome) -> _Outcome:
    """Marks a method that records a claimed message's fate: whether it
    succeeds or raises, the message is no longer owned afterwards (if the
    spool write failed, the message is an orphan, which the reaper finds)."""
    @functools.wraps(method)
    async def settle(self: QueueManager, msg: Stored, *args: Any, **kw: Any) -> Any:
        try:
            return await method(self, msg, *args, **kw)
        finally:
            self.owned.discard(msg.id)
    return settle  # type: ignore[return-value]


class QueueManager(Outcomes):
    MAX_IN_MEMORY = 5000
    CLAIM_BATCH = 500
    POLL_SECONDS = 1.0
    REAP_SECONDS = 10.0

    def __init__(self, settings: Settings, spool: SqliteSpool, rules: RuleBook,
                 router: Router, stats: Counter[str]) -> None:
        self.settings = settings
        self.spool = spool
        self.rules = rules
        self.stats = stats
        # Where promoted mail goes: sites in this process, or the delivery
        # process (the server replaces this one).
        self.delivery: Delivery = Dispatcher(settings, router, self)
        self.nodeid = node_id(settings.data_path)
        self.owned: set[str] = set()
        self._wake = asyncio.Event()
        self._holds_stale = True
        self._task: asyncio.Task | None = None
        self._reaper: asyncio.Task | None = None
        self._stopping = False

    @property
    def in_memory(self) -> int:
        return len(self.owned)

    # -- helpers -----------------------------------------------------------

    def parts(self, queue: str) -> QueueName:
        p = self.spool.parts.get(queue)
        return p if p is not None else parse_queue_name(queue)

    def record(self, kind: str, msg: Stored, response: Response,
               attempt: Attempt = NO_ATTEMPT) -> bytes:
        return make_record(kind, msg_id=msg.id, sender=msg.sender, recipient=msg.recipient,
                           queue=msg.queue, meta=self.meta(msg.queue), size=msg.size,
                           created=msg.created, num_attempts=msg.attempts,
                           nodeid=self.nodeid, response=response, site=attempt.site,
                           peer=attempt.peer, reception_protocol=msg.protocol,
                           delivery_protocol="ESMTP" if kind in _DELIVERY_KINDS else None,
                           session_id=attempt.session_id, tls=attempt.tls)

    def meta(self, queue: str) -> dict[str, str]:
        return self.parts(queue).meta()

    def admin_bounce_record(self, msg: Stored, rule: Rule) -> bytes | None:
        if rule.suppress_logging:
            return None
        return self.record(ADMIN_BOUNCE, msg, admin_bounce_response(rule.reason))

    def pack_admin_bounces(self, msgs: list[Stored], rule: Rule) -> bytes | None:
        """The AdminBounce records of a sweep chunk, packed (see logs.PACKED)."""
        if rule.suppress_logging:
            return None
        rows = [(m.id, m.sender, m.recipient, m.queue, m.size, m.created, m.attempts, m.protocol)
                for m in msgs]
        return pack_admin_bounces(rows, rule.reason, self.nodeid,
                                  {q: self.meta(q) for q in {m.queue for m in msgs}})

    async def apply_received(self, summary: dict) -> None:
        """Count what a reception committed (in this process, for every worker)."""
        spool = self.spool
        queued = 0
        for name, domain, campaign, tenant, routing, n, held in summary["queues"]:
            if name not in spool.parts:
                spool.parts[name] = QueueName(domain, campaign, tenant, routing)
            spool.counts[name] += n
            queued += n
            if held:
                spool.held.add(name)
        caught = 0
        for rule_id, queue, n in summary["bounced"]:
            caught += n
            rule = self.rules.get(rule_id)
            if rule is not None:
                rule.bounced[queue] += n
        self.stats[RECEPTION] += summary["received"]
        self.stats[ADMIN_BOUNCE] += caught
        if queued:
            self.announce()

    def announce(self) -> None:
        """New or released mail may be due: look now instead of at the next poll."""
        self._wake.set()

    async def rules_changed(self) -> None:
        """A rule came or went: put the rules in force where mail is sent,
        recompute which queues are held, then promote."""
        await self.delivery.rules_changed()
        self._holds_stale = True
        self._wake.set()

    # -- promotion ---------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="queue-manager")
        self._reaper = asyncio.create_task(self._reap_loop(), name="orphan-reaper")

    async def _run(self) -> None:
        while not self._stopping:
            try:
                if self._holds_stale:
                    await self._update_holds()
                promoted = await self._promote_once()
            except Exception:  # never let one bad batch stop delivery
                log.exception("promotion failed")
                promoted = 0
            if promoted >= self.CLAIM_BATCH and self.in_memory < self.MAX_IN_MEMORY:
                await asyncio.sleep(0)
                continue
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.POLL_SECONDS)

    def suspended_queues(self) -> set[str]:
        if not self.rules.has(SUSPEND):
            return set()
        return {q for q in list(self.spool.counts) if self.rules.suspended(q, self.parts(q))}

    async def _update_holds(self) -> None:
        """Hold the queues suspended now, release those no longer suspended."""
        self._holds_stale = False
        want = self.suspended_queues()
        held = set(self.spool.held)
        if want - held:
            await self.spool.hold(want - held)
        if held - want:
            await self.spool.unhold(held - want)

    async def _promote_once(self) -> int:
        room = min(self.CLAIM_BATCH, self.MAX_IN_MEMORY - self.in_memory)
        if room <= 0:
            return 0
        rows = await self.spool.claim_due(time.time(), room, self.owned)
        if rows:
            await asyncio.gather(*(self._route(m) for m in rows))
        return len(rows)

    async def _route(self, msg: Stored) -> None:
        try:
            await self._route_one(msg)
        except Exception as exc:
            log.exception("promoting %s failed", msg.id)
            try:
                await self.attempt_failed(msg, internal_error(exc, "promotion"), NO_ATTEMPT,
                                          count_attempt=False)
            except Exception:
                log.exception("recording the failure of %s failed; the reaper retries it",
                              msg.id)

    async def _route_one(self, msg: Stored) -> None:
        parts = self.parts(msg.queue)
        qs = self.settings.queue_settings_for(parts.domain)
        if time.time() >= expires_at(msg.created, qs):
            await self._finish(msg, [self.record(EXPIRATION, msg, Response(
                551, "Next delivery time would be after message expiry", (5, 4, 7)))], EXPIRATION)
            return
        if not await self.may_dispatch(msg):
            return
        await self.delivery.dispatch(msg, parts)

    async def load_body(self, body_id: int) -> bytes:
        return await self.spool.load_body(body_id)

    # -- rule checks -------------------------------------------------------

    def may_send_data(self, msg: Stored) -> bool:
        return not self.rules.stops(msg.queue, self.parts(msg.queue))

    @_settles
    async def dispose_stopped(self, msg: Stored) -> None:
        """A rule stopped ``msg``: admin-bounce it, or put it back on hold."""
        rule = self.rules.bounce_for(msg.queue, self.parts(msg.queue))
        if rule is not None:
            await self.admin_bounce(msg, rule)
        else:
            held = self.rules.suspended(msg.queue, self.parts(msg.queue)) is not None
            await self.spool.release([msg.id], held=held)
            if held:
                self.spool.held.add(msg.queue)

    @_settles
    async def admin_bounce(self, msg: Stored, rule: Rule, extra: list[bytes] | None = None) -> None:
        rec = self.admin_bounce_record(msg, rule)
        records = (extra or []) + ([rec] if rec else [])
        if await self._finish(msg, records, ADMIN_BOUNCE, rule.id):
            rule.bounced[msg.queue] += 1

    async def purge_ready(self, rule: Rule) -> int:
        """Admin-bounce what waits in ready queues for a rule that just landed."""
        taken = self.delivery.take(lambda m: rule.criteria.matches(m.queue, self.parts(m.queue)))
        for msg in taken:
            await self.admin_bounce(msg, rule)
        return len(taken)

    # -- outcomes ----------------------------------------------------------

    @_settles
    async def _finish(self, msg: Stored, records: list[bytes], kind: str,
                      rule_id: str | None = None) -> bool:
        done = await self.spool.finish(msg, records, rule_id)
        if done:
            self.stats[kind] += 1
        return done

    @_settles
    async def delivered(self, msg: Stored, resp: Response, attempt: Attempt) -> None:
        msg.attempts += 1
        await self._finish(msg, [self.record(DELIVERY, msg, resp, attempt)], DELIVERY)

    @_settles
    async def bounced(self, msg: Stored, resp: Response, attempt: Attempt) -> None:
        msg.attempts += 1
        await self._finish(msg, [self.record(BOUNCE, msg, resp, attempt)], BOUNCE)

    @_settles
    async def attempt_failed(self, msg: Stored, resp: Response, attempt: Attempt,
                             count_attempt: bool = True) -> None:
        """A transient failure: retry later, unless a bounce rule now applies."""
        if count_attempt:
            msg.attempts += 1
        records = [self.record(TRANSIENT_FAILURE, msg, resp, attempt)]
        self.stats[TRANSIENT_FAILURE] += 1
        parts = self.parts(msg.queue)
        rule = self.rules.bounce_for(msg.queue, parts)
        if rule is not None:
            await self.admin_bounce(msg, rule, records)
            return
        qs = self.settings.queue_settings_for(parts.domain)
        due = next_due(time.time(), msg.created, max(1, msg.attempts), qs)
        await self.spool.retry(msg, due, records)

    async def requeue(self, msgs: list[Stored]) -> None:
        """Put back messages whose attempt was lost with the delivery process."""
        if msgs:
            try:
                await self.spool.release([m.id for m in msgs])
            finally:
                self.owned.difference_update(m.id for m in msgs)

    # -- orphans -----------------------------------------------------------

    async def _reap_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.REAP_SECONDS)
            try:
                await self.reap_orphans()
            except Exception:
                log.exception("reclaiming orphaned messages failed")

    async def reap_orphans(self) -> int:
        """Give every claimed message that nobody owns a record and a way forward."""
        orphans = await self.spool.adopt_orphans(self.owned)
        for msg in orphans:
            log.error("message %s was claimed but had no delivery under way; retrying it",
                      msg.id)
            await self.attempt_failed(msg, Response(
                451, "delivery attempt lost (internal error); retrying", (4, 3, 0)),
                NO_ATTEMPT, count_attempt=False)
        return len(orphans)

    # -- lifecycle ---------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Stop promoting, let sends under way finish, put the rest back."""
        self._stopping = True
        self._wake.set()
        for task in (self._task, self._reaper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        left = [m.id for m in await self.delivery.stop(grace)]
        try:
            await self.spool.release(left)
        finally:
            self.owned.difference_update(left)
