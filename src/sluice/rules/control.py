"""Creating, listing and cancelling rules, and the bounce sweep.

``RuleControl`` is what the admin API calls. A new rule is stored in the
spool and put in force in memory before the call returns, so from the API's
answer on every enforcement point sees it (DESIGN invariant 3). A bounce
rule then sweeps the spool in the background: matching queue names come from
the in-memory queue index, matching rows are deleted in chunks, each chunk
committed with its AdminBounce records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from ..logs import ADMIN_BOUNCE
from ..spool import SqliteSpool, Stored
from .criteria import Criteria
from .store import BOUNCE, Rule, RuleBook, new_rule

log = logging.getLogger(__name__)

SWEEP_CHUNK = 2000


class RuleControl:
    def __init__(self, spool: SqliteSpool, book: RuleBook,
                 pack_bounces: Callable[[list[Stored], Rule], bytes | None],
                 purge_ready: Callable[[Rule], object],
                 rules_changed: Callable[[], Awaitable[None]], stats: Counter[str],
                 owned: set[str]) -> None:
        self.spool = spool
        self.owned = owned  # claimed messages on their way to a destination
        self.stats = stats
        self.book = book
        self._pack_bounces = pack_bounces
        self._purge_ready = purge_ready
        self._rules_changed = rules_changed
        self._sweeps: dict[str, asyncio.Task] = {}
        self._pruner: asyncio.Task | None = None

    async def start(self) -> None:
        """Load stored rules (before any listener opens) and resume sweeps."""
        expired = self.book.load(await self.spool.load_rules())
        if expired:
            await self.spool.delete_rules(expired)
        for rule in self.book.active(BOUNCE):
            self._start_sweep(rule)
        self._pruner = asyncio.create_task(self._prune_loop(), name="rule-pruner")

    async def stop(self) -> None:
        tasks = list(self._sweeps.values()) + ([self._pruner] if self._pruner else [])
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def create(self, kind: str, criteria: Criteria, reason: str, expires: float,
                     suppress_logging: bool = False) -> Rule:
        """Store and enforce a rule; one with the same criteria is replaced."""
        rule = new_rule(kind, criteria, reason, expires, suppress_logging)
        old = self.book.same_criteria(kind, criteria)
        await self.spool.save_rule(rule.to_row(), replaces=[r.id for r in old])
        for r in old:
            self.book.remove(r.id)
            task = self._sweeps.pop(r.id, None)
            if task is not None:
                task.cancel()
        self.book.add(rule)
        await self._rules_changed()
        if kind == BOUNCE:
            await self._purge_ready(rule)
            self._start_sweep(rule)
        return rule



    async def cancel(self, kind: str, rule_id: str) -> bool:
        rule = self.book.get(rule_id, kind)
        if rule is None:
            return False
        await self.spool.delete_rules([rule_id])
        self.book.remove(rule_id)
        task = self._sweeps.pop(rule_id, None)
        if task is not None:
            task.cancel()
        await self._rules_changed()
        return True

    def matching_queues(self, criteria: Criteria) -> dict[str, int]:
        """Queues in the spool now that ``criteria`` select, with their sizes."""
        out = {}
        for name, n in list(self.spool.counts.items()):
            parts = self.spool.parts.get(name)
            if n > 0 and parts is not None and criteria.matches(name, parts):
                out[name] = n
        return out

    def _start_sweep(self, rule: Rule) -> None:
        task = asyncio.create_task(self._sweep(rule), name=f"bounce-sweep-{rule.id}")
        self._sweeps[rule.id] = task
        task.add_done_callback(lambda t, rid=rule.id: self._sweeps.pop(rid, None)
                               if self._sweeps.get(rid) is t else None)

    async def _sweep(self, rule: Rule) -> None:
        """Remove every scheduled message the rule matches, chunk by chunk."""
        def pack(msgs: list[Stored]) -> bytes | None:
            return self._pack_bounces(msgs, rule)

        try:
            while rule.active():
                matching = self.matching_queues(rule.criteria)
                if not matching:
                    return
                removed = await self.spool.sweep(list(matching), SWEEP_CHUNK, pack, rule.id,
                                                 self.owned)
                if not removed:
                    return
                for q, n in removed.items():
                    rule.bounced[q] += n
                self.stats[ADMIN_BOUNCE] += sum(removed.values())
                await asyncio.sleep(0)  # let reception and delivery run between chunks
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("bounce sweep %s failed", rule.id)

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            expired = self.book.expired()
            if expired:
                await self.spool.delete_rules([r.id for r in expired])
                for r in expired:
                    self.book.remove(r.id)
                await self._rules_changed()

    def remaining(self, rule: Rule) -> float:
        return max(0.0, rule.expires - time.time())
