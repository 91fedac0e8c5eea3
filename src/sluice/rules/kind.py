"""What the two kinds of operator rule share: ``RuleKind``.

A rule is stored in the spool before it is put in force; a new rule with
exactly the same criteria replaces the old one (new id and reason); a rule
ends when cancelled, replaced or expired (pruned), and stays stored, ended,
for restores; rules are loaded from the spool before any listener opens.
Every change an operator makes is audited in the same commit. Every change is put in force everywhere
mail is checked (``changed``: the delivery process among them) before the
call that made it returns, so the API answers only once it holds.

``rules.bounce.Bounces`` and ``rules.suspend.Suspensions`` add what each
kind does when a rule comes into force or ends.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from .. import audit
from ..audit import SERVER, Actor
from ..message import QueueName
from ..spool import Spool
from .book import Rule, RuleBook, new_rule
from .criteria import Criteria, Envelope

Changed = Callable[[], Awaitable[None]]


class RuleKind:
    kind: ClassVar[str]

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.book = RuleBook(self.kind)
        self.changed: Changed | None = None  # set by the wiring: push the rules everywhere

    # -- the checkpoint ----------------------------------------------------

    def check(self, name: str, parts: QueueName, msg: Envelope | None = None) -> Rule | None:
        """The rule of this kind in force for a message ``msg`` of queue
        ``name``, if any: the one call every checkpoint makes (reception,
        promotion, right before DATA, requeue). Without ``msg``: a rule that
        selects the whole queue."""
        return self.book.match(name, parts, msg) if self.book else None

    # -- lifecycle ---------------------------------------------------------

    async def load(self, rows: list[dict[str, Any]]) -> None:
        """Put the stored rules of this kind in force (at start, before any listener)."""
        expired = self.book.load(rows)
        if expired:
            await self.spool.end_rules(expired, time.time())
        for rule in self.book.active():
            await self._in_force(rule, at_start=True)

    async def stop(self) -> None:
        """Stop background work (a bounce's sweeps and grace timers)."""

    # -- operator actions --------------------------------------------------

    def active(self) -> list[Rule]:
        return self.book.active()

    def get(self, rule_id: str) -> Rule | None:
        return self.book.get(rule_id)

    async def matched(self, criteria: Criteria) -> dict[str, int]:
        """What ``criteria`` select now, per queue (for the audit; per-message
        criteria are counted message by message)."""
        queues = self.spool.index.matching(criteria)
        where = criteria.message_filter()
        if where is None:
            return queues
        counts, _ = await self.spool.count_matching(queues, where, samples=0)
        return counts

    async def create(self, criteria: Criteria, reason: str, expires: float,
                     suppress_logging: bool = False, grace: float = 0.0,
                     actor: Actor = SERVER, request: Any = None) -> Rule:
        """Store the rule and put it in force; one with the same criteria is
        replaced (it ends). Audited in the same commit."""
        rule = new_rule(self.kind, criteria, reason, expires, suppress_logging, grace)
        return await self._put_in_force(rule, actor, request, await self.matched(criteria))

    async def adopt(self, row: dict[str, Any], actor: Actor) -> Rule | None:
        """A rule made on another node of the cluster: stored and put in force
        here with the same id (one with the same criteria is replaced, as by
        ``create``); one here already is extended to its end there (an
        automatic rule triggered again). None when it is here already with
        that end, or no longer active."""
        rule = Rule.from_row({**row, "bounced": {}})
        here = self.book.get(rule.id)
        if here is not None:
            if rule.expires > here.expires:
                return await self.extend(rule.id, rule.expires, actor, row)
            return None
        if not rule.active():
            return None
        if await self.spool.get_rule(rule.id) is not None:
            return None  # it was here and ended
        return await self._put_in_force(rule, actor, row, matched=None)

    async def _put_in_force(self, rule: Rule, actor: Actor, request: Any,
                            matched: dict[str, int] | None) -> Rule:
        """Store ``rule`` (ending those with the same criteria, audited in the
        same commit) and put it in force everywhere mail is checked."""
        old = [r for r in self.book.same_criteria(rule.criteria) if r.id != rule.id]
        await self.spool.save_rule(rule.to_row(), replaces=[r.id for r in old], audit=audit.entry(
            f"{self.kind}-create", actor, rule_id=rule.id, request=request, matched=matched,
            result={"id": rule.id, "replaced": [r.id for r in old]}))
        for r in old:
            self.book.remove(r.id)
            await self._ended(r)
        self.book.add(rule)
        await self._changed()
        await self._in_force(rule, at_start=False)
        return rule

    async def extend(self, rule_id: str, expires: float, actor: Actor = SERVER,
                     request: Any = None) -> Rule | None:
        """Move an active rule's end to ``expires`` (never earlier than it
        was); None if there is no active rule with that id. Audited."""
        rule = self.book.get(rule_id)
        if rule is None:
            return None
        expires = max(expires, rule.expires)
        await self.spool.set_expiry(rule_id, expires, audit=audit.entry(
            f"{self.kind}-extend", actor, rule_id=rule_id, request=request,
            result={"id": rule_id, "expires": expires}))
        rule.expires = expires
        self.book.touch()
        await self._changed()
        return rule

    async def cancel(self, rule_id: str, actor: Actor = SERVER, request: Any = None,
                     action: str = "cancel") -> Rule | None:
        """End an active rule; None if there is none with that id."""
        rule = self.book.get(rule_id)
        if rule is None:
            return None
        await self.spool.end_rules([rule_id], time.time(), audit=audit.entry(
            f"{self.kind}-{action}", actor, rule_id=rule_id, request=request,
            result={"cancelled": True}))
        self.book.remove(rule_id)
        await self._ended(rule)
        await self._changed()
        return rule

    async def prune(self) -> list[Rule]:
        """End the rules that have expired (they stay stored for restores)."""
        expired = self.book.expired()
        if expired:
            await self.spool.end_rules([r.id for r in expired], time.time())
            for r in expired:
                self.book.remove(r.id)
                await self._ended(r)
            await self._changed()
        return expired

    # -- what each kind adds -----------------------------------------------

    async def _in_force(self, rule: Rule, at_start: bool) -> None:
        """A rule came into force (created, or loaded at start)."""

    async def _ended(self, rule: Rule) -> None:
        """A rule ended (cancelled, replaced or expired)."""

    async def _changed(self) -> None:
        if self.changed is not None:
            await self.changed()
