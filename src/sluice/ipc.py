"""Messages between the main process and the reception workers.

One socket pair per worker; frames are a 4-byte length and an orjson body.
Either side may ``call`` (send and wait for the answer) and answers the
other side's calls with its ``handler``. Calls are answered in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

Handler = Callable[[dict[str, Any]], Awaitable[Any]]

_LEN = struct.Struct("!I")


class ChannelClosed(ConnectionError):
    """The other side is gone."""


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handler: Handler) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._task: asyncio.Task | None = None

    @classmethod
    async def over(cls, sock: Any, handler: Handler) -> Channel:
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
        channel = cls(reader, writer, handler)
        channel._task = asyncio.create_task(channel._run(), name="ipc-channel")
        return channel

    async def call(self, msg: dict[str, Any], timeout: float = 30.0) -> Any:
        if self._writer.is_closing():
            raise ChannelClosed("channel closed")
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = fut
        try:
            self._send({"call": call_id, "msg": msg})
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(call_id, None)

    def _send(self, frame: dict[str, Any]) -> None:
        data = orjson.dumps(frame)
        self._writer.write(_LEN.pack(len(data)) + data)

    async def _run(self) -> None:
        try:
            while True:
                head = await self._reader.readexactly(_LEN.size)
                frame = orjson.loads(await self._reader.readexactly(_LEN.unpack(head)[0]))
                if "answer" in frame:
                    fut = self._waiting.get(frame["answer"])
                    if fut is not None and not fut.done():
                        fut.set_result(frame.get("result"))
                else:
                    result = await self._handler(frame["msg"])
                    self._send({"answer": frame["call"], "result": result})
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ChannelClosed("channel closed"))
            self._writer.close()

    async def wait_closed(self) -> None:
        """Return when the other side has gone away."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def close(self) -> None:
        self._writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
