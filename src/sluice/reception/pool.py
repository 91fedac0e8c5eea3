"""The main process's side of the reception workers: start, feed, stop, restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from ..config import Settings
from ..ipc import Accept, Channel, Ready, Records, Stop, spawn, started
from ..ipc import Accepted as AcceptAnswer
from ..logs import Tls
from ..message import AddressError
from .intake import Intake

log = logging.getLogger(__name__)


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self.ready = asyncio.Event()


class WorkerPool:
    """N reception worker processes (see ``reception/worker.py``)."""

    def __init__(self, settings: Settings, count: int, intake: Intake,
                 listeners: list[socket.socket]) -> None:
        self.settings = settings
        self.count = count
        self.intake = intake
        self.listeners = listeners  # bound once here, shared by every worker
        self._workers: list[_Worker] = []
        self._watchers: list[asyncio.Task] = []
        self._stopping = False

    async def start(self, timeout: float = 30.0) -> None:
        """Start the workers; raises if one cannot start."""
        for i in range(self.count):
            w = _Worker(i)
            self._workers.append(w)
            await self._spawn(w)
        for w in self._workers:
            assert w.proc is not None
            if not await started(w.proc, w.ready, timeout):
                await self.stop()
                raise RuntimeError(f"reception worker {w.index} did not start "
                                   f"(exit status {w.proc.returncode})")

    async def _spawn(self, w: _Worker) -> None:
        w.ready.clear()

        async def on_ready(msg: Ready, payload: bytes) -> bool:
            w.ready.set()
            return True

        w.proc, w.channel = await spawn(
            "sluice.reception.worker", self.settings,
            {Accept: self._accept, Records: self._records, Ready: on_ready}, self.listeners)
        self._watchers.append(asyncio.create_task(self._watch(w), name=f"worker-{w.index}"))

    async def _watch(self, w: _Worker) -> None:
        assert w.proc is not None
        code = await w.proc.wait()
        if self._stopping or not w.ready.is_set():
            return  # stopping, or it never started: start() reports that
        log.error("reception worker %d exited with %s; starting a new one", w.index, code)
        if w.channel is not None:
            await w.channel.close()
        await asyncio.sleep(0.5)
        if not self._stopping:
            await self._spawn(w)

    async def _accept(self, msg: Accept, body: bytes) -> AcceptAnswer:
        """A worker's message: stored (and answered) like one received here.
        A failure to store it is answered as an error (the worker says 451)."""
        try:
            accepted = await self.intake.accept(body, msg.sender, msg.recipients,
                                                protocol=msg.protocol, peer=msg.peer,
                                                session_id=msg.session_id,
                                                tls=Tls(*msg.tls) if msg.tls else None,
                                                authn_id=msg.authn_id, tenant=msg.tenant)
        except AddressError as exc:
            return AcceptAnswer(address_error=str(exc))
        return AcceptAnswer(ids=accepted.ids, bounced=accepted.bounced)

    async def _records(self, msg: Records, payload: bytes) -> bool:
        await self.intake.add_records(payload.split(b"\n"))
        return True

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        for w in self._workers:
            if w.channel is not None:
                with contextlib.suppress(Exception):
                    await w.channel.call(Stop(), timeout=2.0)
        for w in self._workers:
            if w.proc is None:
                continue
            try:
                await asyncio.wait_for(w.proc.wait(), timeout)
            except asyncio.TimeoutError:
                w.proc.kill()
                await w.proc.wait()
            if w.channel is not None:
                await w.channel.close()
        for t in self._watchers:
            t.cancel()
