"""The main process's side of the delivery process (``delivery/worker.py``).

``DeliveryProcess`` is the queue manager's ``Delivery`` when delivery runs
in its own process: promoted messages go over in batches, one per turn of
the event loop; their fates come back and the queue manager records them.
Until a fate is known, the message stays here (``out``). If the process
dies, everything in ``out`` goes back to its queue (at least once: a
message sent but not yet reported is sent again) and a new process starts,
which gets the rules before any message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import Settings
from ..ipc import Channel, ChannelClosed, RemoteError, spawn, started
from ..logs import Attempt
from ..message import QueueName
from ..rules.store import BOUNCE, SUSPEND, RuleBook
from ..spool import Stored
from .worker import response_from_wire

if TYPE_CHECKING:
    from ..queues.manager import QueueManager

log = logging.getLogger(__name__)

RULES_TIMEOUT = 5.0


class DeliveryProcess:
    def __init__(self, settings: Settings, manager: QueueManager, rules: RuleBook) -> None:
        self.settings = settings
        self.manager = manager
        self.rules = rules
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

        async def handle(msg: dict[str, Any], payload: bytes) -> Any:
            if msg["type"] == "outcome":
                return await self._outcome(msg)
            if msg["type"] == "ready":
                ready.set()
                return True
            return None

        self.proc, self.channel = await spawn("sluice.delivery.worker", self.settings, handle)
        if not await started(self.proc, ready, timeout):
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            raise RuntimeError(f"the delivery process did not start "
                               f"(exit status {self.proc.returncode})")
        # The rules before any message; again if they changed meanwhile.
        while True:
            version = self.rules.version
            await self.channel.call(self._rules_message(), timeout=RULES_TIMEOUT)
            if version == self.rules.version:
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
                await self.channel.call({"type": "stop", "grace": grace}, timeout=grace + 5.0)
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
        queues = {m.queue: [p.domain, p.campaign, p.tenant, p.routing_domain] for m, p in batch}
        msgs = [[m.id, m.queue, m.sender, m.recipient, m.body_id, m.size, m.created, m.due,
                 m.attempts, m.protocol] for m, _ in batch]
        self._call({"type": "dispatch", "queues": queues, "msgs": msgs}, [m for m, _ in batch])

    def _call(self, msg: dict[str, Any], batch: list[Stored]) -> None:
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

    def take(self, pred: Callable[[Stored], bool]) -> list[Stored]:
        """Messages not yet sent over that ``pred`` selects (the delivery
        process gives back its own waiting ones when it gets the new rules)."""
        taken = [m for m, _ in self._pending if pred(m)]
        if taken:
            ids = {m.id for m in taken}
            self._pending = [(m, p) for m, p in self._pending if m.id not in ids]
            for m in taken:
                self.out.pop(m.id, None)
        return taken

    def _rules_message(self) -> dict[str, Any]:
        rows = [r.to_row() for r in self.rules.active(BOUNCE) + self.rules.active(SUSPEND)]
        return {"type": "rules", "rules": rows}

    async def rules_changed(self) -> None:
        """Put the rules in force in the delivery process before returning.

        If it does not confirm, it is stopped for good (SIGKILL) before this
        returns, and its replacement gets the rules before any message.
        """
        if not self._up or self.channel is None or self.proc is None:
            return  # not up: it gets the rules before it gets any message
        try:
            await self.channel.call(self._rules_message(), timeout=RULES_TIMEOUT)
        except (ChannelClosed, TimeoutError, RemoteError):
            log.error("the delivery process did not take the new rules; restarting it")
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()

    async def figures(self) -> dict[str, dict[str, int]]:
        if not self._up or self.channel is None:
            return {}
        try:
            return await self.channel.call({"type": "figures"}, timeout=5.0)
        except (ChannelClosed, TimeoutError, RemoteError):
            return {}

    # -- fates -------------------------------------------------------------

    async def _outcome(self, msg: dict[str, Any]) -> bool:
        stored = self.out.pop(msg["id"], None)
        if stored is None:
            return False
        m = self.manager
        kind = msg["kind"]
        if kind == "stopped":
            await m.dispose_stopped(stored)
            return True
        resp = response_from_wire(msg["response"])
        assert resp is not None
        attempt = Attempt.from_wire(msg["attempt"])
        if kind == "delivered":
            await m.delivered(stored, resp, attempt)
        elif kind == "bounced":
            await m.bounced(stored, resp, attempt)
        else:
            await m.attempt_failed(stored, resp, attempt, count_attempt=msg["count_attempt"])
        return True
