"""The queue manager: promotion of due mail, and the fates of attempts.

Promotion claims due messages from the spool (a bounded batch, so memory
does not grow with the spool), checks the rules, and hands each message to
the delivery port (sites here, or the delivery process). Every outcome of
an attempt comes back here and becomes exactly one spool change with its
log records: delivered, bounced, failed (retry, or expiry), or stopped by a
rule (admin-bounced by ``rules.bounce``, or held again).

A claimed message is "in hand" (``spool.in_hand``) from the moment it is
claimed until its fate is written. One that leaves every hand without a
fate (a bug, a failed write) is an orphan: the reaper finds it and gives
it a TransientFailure and a retry, or its admin bounce if a bounce rule now
matches it; a bounce sweep takes it like any other matching message (see
docs/ARCHITECTURE.md, "The flow of a message").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..config import Settings
from ..delivery.dispatch import DeliveryPort, Dispatcher, Outcomes
from ..delivery.routes import Router
from ..logs import (
    BOUNCE,
    DELIVERY,
    EXPIRATION,
    NO_ATTEMPT,
    TRANSIENT_FAILURE,
    Attempt,
    Response,
    internal_error,
    message_record,
)
from ..rules.bounce import Bounces
from ..rules.suspend import Suspensions
from ..spool import Spool, Stored
from .scheduled import expires_at, next_due

if TYPE_CHECKING:
    from ..rules.automation import Automations

log = logging.getLogger(__name__)

_Fate = TypeVar("_Fate", bound=Callable[..., Awaitable[Any]])


def _settles(method: _Fate) -> _Fate:
    """Marks a method that writes a claimed message's fate: whether it
    succeeds or raises, the message is out of hand afterwards (if the write
    failed, the message is an orphan, which the reaper finds)."""
    @functools.wraps(method)
    async def settle(self: QueueManager, msg: Stored, *args: Any, **kw: Any) -> Any:
        try:
            return await method(self, msg, *args, **kw)
        finally:
            self.spool.let_go([msg.id])
    return settle  # type: ignore[return-value]


class QueueManager(Outcomes):
    MAX_IN_MEMORY = 5000
    CLAIM_BATCH = 500
    POLL_SECONDS = 1.0
    REAP_SECONDS = 10.0

    def __init__(self, settings: Settings, spool: Spool, bounces: Bounces,
                 suspensions: Suspensions, router: Router, stats: Counter[str],
                 nodeid: str) -> None:
        self.settings = settings
        self.spool = spool
        self.bounces = bounces
        self.suspensions = suspensions
        self.stats = stats
        self.nodeid = nodeid
        # Where promoted mail goes: sites in this process, or the delivery
        # process (the server replaces this one).
        self.delivery: DeliveryPort = Dispatcher(settings, router, self)
        # Receivers' responses that make rules (set by the wiring)
        self.automation: Automations | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._reaper: asyncio.Task | None = None
        self._stopping = False

    @property
    def in_memory(self) -> int:
        return len(self.spool.in_hand)

    def wake(self) -> None:
        """New or released mail may be due: look now instead of at the next poll."""
        self._wake.set()

    def record(self, kind: str, msg: Stored, response: Response,
               attempt: Attempt = NO_ATTEMPT) -> bytes:
        return message_record(kind, msg, response, meta=self.spool.index.parts(msg.queue).meta(),
                              nodeid=self.nodeid, attempt=attempt)

    # -- promotion ---------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="queue-manager")
        self._reaper = asyncio.create_task(self._reap_loop(), name="orphan-reaper")

    async def _run(self) -> None:
        while not self._stopping:
            try:
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

    async def _promote_once(self) -> int:
        room = min(self.CLAIM_BATCH, self.MAX_IN_MEMORY - self.in_memory)
        if room <= 0:
            return 0
        rows = await self.spool.claim_due(time.time(), room)
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
        parts = self.spool.index.parts(msg.queue)
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
        parts = self.spool.index.parts(msg.queue)
        return (self.bounces.check(msg.queue, parts, msg) is None
                and self.suspensions.check(msg.queue, parts, msg) is None)

    @_settles
    async def dispose_stopped(self, msg: Stored) -> None:
        """A rule stopped ``msg`` before it was sent: bounce it, or hold it again."""
        parts = self.spool.index.parts(msg.queue)
        rule = self.bounces.check(msg.queue, parts, msg)
        if rule is not None and not rule.pending():
            await self.bounces.bounce_claimed(msg, rule)
        else:  # a suspension, or a bounce rule in its grace
            held = rule is not None or self.suspensions.check(msg.queue, parts, msg) is not None
            await self.spool.release([msg], held=held)

    # -- outcomes ----------------------------------------------------------

    @_settles
    async def _finish(self, msg: Stored, records: list[bytes], kind: str) -> bool:
        done = await self.spool.finish(msg, records)
        if done:
            self.stats[kind] += 1
        return done

    async def delivered(self, msg: Stored, resp: Response, attempt: Attempt) -> None:
        msg.attempts += 1
        await self._finish(msg, [self.record(DELIVERY, msg, resp, attempt)], DELIVERY)

    async def bounced(self, msg: Stored, resp: Response, attempt: Attempt) -> None:
        msg.attempts += 1
        if self.automation is not None:
            self.automation.observe(self.spool.index.parts(msg.queue), resp, attempt.site)
        await self._finish(msg, [self.record(BOUNCE, msg, resp, attempt)], BOUNCE)

    @_settles
    async def attempt_failed(self, msg: Stored, resp: Response, attempt: Attempt,
                             count_attempt: bool = True) -> None:
        """A transient failure: retry later, unless a bounce rule now applies."""
        if count_attempt:
            msg.attempts += 1
        records = [self.record(TRANSIENT_FAILURE, msg, resp, attempt)]
        self.stats[TRANSIENT_FAILURE] += 1
        parts = self.spool.index.parts(msg.queue)
        if self.automation is not None:
            self.automation.observe(parts, resp, attempt.site)
        rule = self.bounces.check(msg.queue, parts, msg)
        if rule is not None and not rule.pending():
            await self.bounces.bounce_claimed(msg, rule, before=records)
            return
        qs = self.settings.queue_settings_for(parts.domain)
        due = next_due(time.time(), msg.created, max(1, msg.attempts), qs)
        await self.spool.retry(msg, due, records, held=rule is not None)  # held in a grace

    async def requeue(self, msgs: list[Stored]) -> None:
        """Put back messages whose attempt was lost with the delivery process."""
        await self.spool.release(msgs)

    # -- orphans -----------------------------------------------------------

    async def _reap_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.REAP_SECONDS)
            try:
                await self.reap_orphans()
            except Exception:
                log.exception("reclaiming orphaned messages failed")

    async def reap_orphans(self) -> int:
        """Give every claimed message that is in no one's hand a record and a way forward."""
        orphans = await self.spool.adopt_orphans()
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
        await self.spool.release(await self.delivery.stop(grace))
