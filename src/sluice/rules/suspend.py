"""Suspend: everything about holding mail without bouncing it, in one place.

A suspension selects queues by its criteria (``Criteria``). From the moment
it is in force (before the API answers):

- every checkpoint asks ``check`` (one call): reception stores matching mail
  held, promotion and the check right before DATA put a message back on hold
  instead of sending it;
- the matching queues are held in the spool (their messages are not
  considered for promotion at all), and released when no suspension selects
  them any more: held mail is then due at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..audit import SERVER, Actor
from ..message import QueueName
from ..spool import Spool
from .book import SUSPEND, Rule
from .kind import RuleKind


class Suspensions(RuleKind):
    kind = SUSPEND

    def __init__(self, spool: Spool) -> None:
        super().__init__(spool)
        self.on_release: Callable[[], None] | None = None  # set by the wiring: wake promotion
        # Others that hold whole queues too: a bounce rule in its grace.
        self.also_held: list[Callable[[str, QueueName], bool]] = []

    def suspended_queues(self) -> set[str]:
        """The queues holding messages that are to be held whole now."""
        index = self.spool.index
        out = set()
        for q in index.names():
            parts = index.parts(q)
            if self.check(q, parts) is not None or any(h(q, parts) for h in self.also_held):
                out.add(q)
        return out

    async def update_holds(self) -> None:
        """Hold the queues suspended now; release those no longer suspended."""
        want = self.suspended_queues()
        held = set(self.spool.index.held())
        if want - held:
            await self.spool.hold(want - held)
        if held - want:
            await self.spool.unhold(held - want)
            if self.on_release is not None:
                self.on_release()

    async def _in_force(self, rule: Rule, at_start: bool) -> None:
        await self.update_holds()

    # Held mail goes back only once the change is in force everywhere.

    async def cancel(self, rule_id: str, actor: Actor = SERVER, request: Any = None,
                     action: str = "cancel") -> Rule | None:
        rule = await super().cancel(rule_id, actor, request, action)
        if rule is not None:
            await self.update_holds()
        return rule

    async def prune(self) -> list[Rule]:
        expired = await super().prune()
        if expired:
            await self.update_holds()
        return expired
