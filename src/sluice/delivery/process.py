"""The main process's side of the delivery process (``delivery/worker.py``).

``DeliveryProcess`` is the queue manager's ``Delivery`` when delivery runs
in its own process: promoted messages go over in batches, one per turn of
the event loop; their fates come back and the queue manager records them.
Until a fate is known, the message stays here (``out``). If the process
dies, everything in ``out`` goes back to its queue (at least once: a
message sent but not yet reported is sent again) and a new process starts,
which gets the rules, and the throttles still in force, before any message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..ipc import (
    Channel,
    ChannelClosed,
    Dispatch,
    Figures,
    Outcome,
    PushRules,
    Ready,
    RemoteError,
    Stop,
    Throttle,
    Withdraw,
    spawn,
    started,
)
from ..message import QueueName
from ..spool import Stored
from .shaping import SiteThrottles

if TYPE_CHECKING:
    from ..queues.manager import QueueManager
    from ..rules.book import Rule

log = logging.getLogger(__name__)

RULES_TIMEOUT = 5.0


class DeliveryProcess:
    """The ``DeliveryPort`` of the delivery process; the queue manager
    records the fates it reports."""

    def __init__(self, settings: Settings, manager: QueueManager,
                 bounces: Sequence[Rule] = (), suspensions: Sequence[Rule] = ()) -> None:
        self.settings = settings
        self.manager = manager
        self._bounces, self._suspensions = list(bounces), list(suspensions)
        self._rules_version = 0
        self._throttles = SiteThrottles()
        self._throttles_version = 0
        self.out: dict[str, Stored] = {}  # handed over, fate not known yet
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self._pending: list[tuple[Stored, QueueName]] = []
        self._flushing = False
        self._up = False
        self._stopping = False
        self._watcher: asyncio.Task | None = None
        self._calls: set[asyncio.Task] = set()

    # -- lifecycle ---------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Start the process; raises if it does not come up."""
        await self._spawn(timeout)
        self._watcher = asyncio.create_task(self._watch(), name="delivery-process")

    async def _spawn(self, timeout: float) -> None:
        ready = asyncio.Event()

        async def on_ready(msg: Ready, payload: bytes) -> bool:
            ready.set()
            return True

        self.proc, self.channel = await spawn("sluice.delivery.worker", self.settings,
                                              {Outcome: self._outcome, Ready: on_ready})
        if not await started(self.proc, ready, timeout):
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            raise RuntimeError(f"the delivery process did not start "
                               f"(exit status {self.proc.returncode})")
        # The rules and the throttles in force before any message; again if
        # they changed meanwhile.
        while True:
            version = (self._rules_version, self._throttles_version)
            await self.channel.call(self._rules_message(), timeout=RULES_TIMEOUT)
            for throttle in self._throttles_in_force():
                await self.channel.call(throttle, timeout=RULES_TIMEOUT)
            if version == (self._rules_version, self._throttles_version):
                break
        self._up = True
        self._schedule_flush()

    async def _watch(self) -> None:
        while not self._stopping:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping:
                return
            self._up = False
            log.error("the delivery process exited with %s; starting a new one", code)
            if self.channel is not None:
                await self.channel.close()
            await self._requeue_all()
            while not self._stopping:
                await asyncio.sleep(0.5)
                try:
                    await self._spawn(30.0)
                    break
                except Exception:
                    log.exception("starting the delivery process failed")

    async def _requeue_all(self) -> None:
        """Everything handed over and not finished goes back to its queue."""
        lost = list(self.out.values())
        self.out.clear()
        self._pending.clear()
        await self.manager.requeue(lost)

    async def stop(self, grace: float) -> list[Stored]:
        """Stop the process after sends under way end; returns what was not finished."""
        self._stopping = True
        if self._watcher is not None:  # no restart from here on
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._up and self.channel is not None:
            with contextlib.suppress(ChannelClosed, TimeoutError, RemoteError):
                await self.channel.call(Stop(grace=grace), timeout=grace + 5.0)
        self._up = False
        if self.channel is not None:
            await self.channel.close()  # a process that did not stop sees its channel close
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), 5.0)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        left = list(self.out.values())
        self.out.clear()
        self._pending.clear()
        return left

    # -- Delivery ----------------------------------------------------------

    async def dispatch(self, msg: Stored, parts: QueueName) -> None:
        self.out[msg.id] = msg
        self._pending.append((msg, parts))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flushing and self._pending and self._up:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        if not self._up or not self._pending or self.channel is None:
            return
        batch, self._pending = self._pending, []
        msgs = [m for m, _ in batch]
        self._call(Dispatch(queues={m.queue: p for m, p in batch}, msgs=msgs), msgs)

    def _call(self, msg: Dispatch, batch: list[Stored]) -> None:
        """Send without waiting for the answer (a lost process is the watcher's
        business); a batch the process refused goes back to its queues."""
        assert self.channel is not None

        async def call(channel: Channel) -> None:
            try:
                await channel.call(msg)
            except (ChannelClosed, TimeoutError):
                pass
            except RemoteError:
                lost = [m for m in batch if self.out.pop(m.id, None) is not None]
                await self.manager.requeue(lost)

        task = asyncio.create_task(call(self.channel))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def withdraw(self, rule: Rule) -> list[Stored]:
        """Messages ``rule`` selects: those not sent over yet, and those the
        delivery process has waiting in its ready queues (it has the rule: the
        rules are pushed before this is called)."""
        selected = [m for m, p in self._pending
                    if rule.criteria.matches(m.queue, p) and rule.criteria.matches_message(m)]
        if selected:
            ids = {m.id for m in selected}
            self._pending = [(m, p) for m, p in self._pending if m.id not in ids]
        if self._up and self.channel is not None:
            try:
                waiting = await self.channel.call(Withdraw(rule_id=rule.id),
                                                  timeout=RULES_TIMEOUT, returns=list[str])
            except (ChannelClosed, TimeoutError, RemoteError):
                waiting = []  # the check before DATA stops them in any case
            ids = set(waiting) - {m.id for m in selected}
            selected += [self.out[i] for i in ids if i in self.out]
        for m in selected:
            self.out.pop(m.id, None)
        return selected

    def _rules_message(self) -> PushRules:
        return PushRules(bounces=[r.to_row() for r in self._bounces],
                         suspensions=[r.to_row() for r in self._suspensions])

    async def rules_changed(self, bounces: Sequence[Rule], suspensions: Sequence[Rule]) -> None:
        """Put the rules in force in the delivery process before returning.

        If it does not confirm, it is stopped for good (SIGKILL) before this
        returns, and its replacement gets the rules before any message.
        """
        self._bounces, self._suspensions = list(bounces), list(suspensions)
        self._rules_version += 1
        if not self._up or self.channel is None or self.proc is None:
            return  # not up: it gets the rules before it gets any message
        try:
            await self.channel.call(self._rules_message(), timeout=RULES_TIMEOUT)
        except (ChannelClosed, TimeoutError, RemoteError):
            log.error("the delivery process did not take the new rules; restarting it")
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()

    def _throttles_in_force(self) -> list[Throttle]:
        """The throttles that have not ended (those that have are forgotten)."""
        return [Throttle(site=site, rate=rate, until=until)
                for site, rate, until in self._throttles.in_force()]

    async def throttle(self, site: str, rate: float, until: float) -> None:
        """Lower ``site``'s message rate in the delivery process until ``until``
        (see ``DeliveryPort.throttle``); remembered, and sent again to a new
        delivery process before any message while it lasts."""
        if not self._throttles.add(site, rate, until):
            return
        self._throttles_version += 1
        if not self._up or self.channel is None:
            return  # a process starting gets it before any message
        try:
            await self.channel.call(Throttle(site=site, rate=rate, until=until),
                                    timeout=RULES_TIMEOUT)
        except ChannelClosed:
            pass  # the process is gone: its replacement gets it
        except TimeoutError:
            log.warning("the delivery process did not confirm the throttle of %s within "
                        "%.0f s", site, RULES_TIMEOUT)
        except RemoteError:
            log.exception("the delivery process refused the throttle of %s", site)

    async def figures(self) -> dict[str, dict[str, Any]]:
        if not self._up or self.channel is None:
            return {}
        try:
            return await self.channel.call(Figures(), timeout=5.0,
                                           returns=dict[str, dict[str, Any]])
        except (ChannelClosed, TimeoutError, RemoteError):
            return {}

    # -- fates -------------------------------------------------------------

    async def _outcome(self, msg: Outcome, payload: bytes) -> bool:
        stored = self.out.pop(msg.id, None)
        if stored is None:
            return False
        m = self.manager
        if msg.kind == "stopped":
            await m.dispose_stopped(stored)
            return True
        assert msg.response is not None
        if msg.kind == "delivered":
            await m.delivered(stored, msg.response, msg.attempt)
        elif msg.kind == "bounced":
            await m.bounced(stored, msg.response, msg.attempt)
        else:
            await m.attempt_failed(stored, msg.response, msg.attempt,
                                   count_attempt=msg.count_attempt)
        return True
