"""The main process's side of the reception workers: start, feed, stop, restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from .config import Settings
from .ipc import Channel, ChannelClosed

log = logging.getLogger(__name__)


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self.ready = asyncio.Event()


class WorkerPool:
    """N reception worker processes (see ``reception/worker.py``)."""

    def __init__(self, settings: Settings, count: int,
                 on_received: Callable[[dict[str, Any]], Awaitable[None]],
                 rule_rows: Callable[[], list[dict[str, Any]]]) -> None:
        self.settings = settings
        self.count = count
        self._on_received = on_received
        self._rule_rows = rule_rows
        self._workers: list[_Worker] = []
        self._watchers: list[asyncio.Task] = []
        self._stopping = False

    async def start(self, timeout: float = 30.0) -> None:
        """Start the workers; raises if one cannot start (e.g. its port is taken)."""
        for i in range(self.count):
            w = _Worker(i)
            self._workers.append(w)
            await self._spawn(w)
        for w in self._workers:
            assert w.proc is not None
            ready = asyncio.create_task(w.ready.wait())
            died = asyncio.create_task(w.proc.wait())
            done, _ = await asyncio.wait({ready, died}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            died.cancel()
            if ready not in done:
                await self.stop()
                raise RuntimeError(f"reception worker {w.index} did not start "
                                   f"(exit status {w.proc.returncode})")

    async def _spawn(self, w: _Worker) -> None:
        ours, theirs = socket.socketpair()
        w.ready.clear()
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sluice.reception.worker", str(theirs.fileno()),
            stdin=asyncio.subprocess.PIPE, pass_fds=(theirs.fileno(),))
        theirs.close()
        assert w.proc.stdin is not None
        w.proc.stdin.write(self.settings.model_dump_json().encode())
        w.proc.stdin.close()

        async def handle(msg: dict[str, Any]) -> Any:
            if msg["type"] == "received":
                await self._on_received(msg["summary"])
                return True
            if msg["type"] == "ready":
                w.ready.set()
                return True
            return None

        w.channel = await Channel.over(ours, handle)
        # First message: the rule set, before the worker opens its listeners.
        await w.channel.call({"type": "rules", "rules": self._rule_rows()})
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

    async def push_rules(self) -> None:
        """Send the current rule set to every worker; returns once all apply it."""
        rows = self._rule_rows()
        calls = [w.channel.call({"type": "rules", "rules": rows}, timeout=10.0)
                 for w in self._workers if w.channel is not None]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for r in results:
            # A worker that died will load the rules from the spool when restarted.
            if isinstance(r, Exception) and not isinstance(r, (ChannelClosed, asyncio.TimeoutError)):
                raise r

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        for w in self._workers:
            if w.channel is not None:
                with contextlib.suppress(Exception):
                    await w.channel.call({"type": "stop"}, timeout=2.0)
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
