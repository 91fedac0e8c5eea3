"""Messages between the main process and its child processes (reception
workers, the delivery process), and how a child is started.

One socket pair per child. A frame is two 4-byte lengths, an orjson header
and a raw payload (a message body travels as bytes, not as JSON). Either
side may ``call`` (send and wait for the answer); the other side's calls are
answered by ``handler``, each in its own task, so many can be under way. A
handler that raises answers with the error, which the caller raises as
``RemoteError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], bytes], Awaitable[Any]]

_LENS = struct.Struct("!II")


class ChannelClosed(ConnectionError):
    """The other side is gone."""


class RemoteError(RuntimeError):
    """The other side's handler raised; the message names its exception."""


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handler: Handler) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._task: asyncio.Task | None = None
        self._answering: set[asyncio.Task] = set()

    @classmethod
    async def over(cls, sock: Any, handler: Handler) -> Channel:
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
        channel = cls(reader, writer, handler)
        channel._task = asyncio.create_task(channel._run(), name="ipc-channel")
        return channel

    async def call(self, msg: dict[str, Any], payload: bytes = b"", timeout: float = 60.0) -> Any:
        if self._writer.is_closing():
            raise ChannelClosed("channel closed")
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = fut
        try:
            self._send({"call": call_id, "msg": msg}, payload)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(call_id, None)

    def _send(self, frame: dict[str, Any], payload: bytes = b"") -> None:
        data = orjson.dumps(frame)
        self._writer.write(_LENS.pack(len(data), len(payload)) + data + payload)

    async def _answer(self, call_id: int, msg: dict[str, Any], payload: bytes) -> None:
        try:
            frame = {"answer": call_id, "result": await self._handler(msg, payload)}
        except Exception as exc:  # the caller gets the error at once, not a timeout
            log.exception("handling %r failed", msg.get("type"))
            frame = {"answer": call_id, "error": f"{type(exc).__name__}: {exc}"}
        if not self._writer.is_closing():
            self._send(frame)

    async def _run(self) -> None:
        try:
            while True:
                head = await self._reader.readexactly(_LENS.size)
                size, payload_size = _LENS.unpack(head)
                frame = orjson.loads(await self._reader.readexactly(size))
                payload = await self._reader.readexactly(payload_size) if payload_size else b""
                if "answer" in frame:
                    fut = self._waiting.get(frame["answer"])
                    if fut is not None and not fut.done():
                        if "error" in frame:
                            fut.set_exception(RemoteError(frame["error"]))
                        else:
                            fut.set_result(frame.get("result"))
                else:
                    task = asyncio.create_task(self._answer(frame["call"], frame["msg"], payload))
                    self._answering.add(task)
                    task.add_done_callback(self._answering.discard)
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


async def spawn(module: str, settings: Settings, handler: Handler,
                listeners: list[socket.socket] = ()) -> tuple[asyncio.subprocess.Process, Channel]:
    """Start ``python -m module FD [LISTENER_FD ...]`` with the settings on its
    standard input; returns the process and the channel to it (see
    ``child_main``). ``listeners`` are listening sockets the child shares."""
    ours, theirs = socket.socketpair()
    fds = [theirs.fileno(), *(s.fileno() for s in listeners)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *map(str, fds),
        stdin=asyncio.subprocess.PIPE, pass_fds=fds)
    theirs.close()
    assert proc.stdin is not None
    proc.stdin.write(settings.model_dump_json().encode())
    proc.stdin.close()
    return proc, await Channel.over(ours, handler)


async def started(proc: asyncio.subprocess.Process, ready: asyncio.Event,
                  timeout: float) -> bool:
    """Wait until a child says it is ready (True), or exits or times out (False)."""
    ready_wait = asyncio.create_task(ready.wait())
    died = asyncio.create_task(proc.wait())
    done, _ = await asyncio.wait({ready_wait, died}, timeout=timeout,
                                 return_when=asyncio.FIRST_COMPLETED)
    ready_wait.cancel()
    died.cancel()
    return ready_wait in done


def child_main(serve: Callable[[Settings, socket.socket, list[socket.socket]],
                                Awaitable[None]]) -> None:
    """A child's entry point: read the settings, the channel's descriptor and
    the listening sockets' (``spawn``), then run ``serve`` on uvloop until it
    returns."""
    from .config import Settings

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    fd, *listener_fds = map(int, sys.argv[1:])
    settings = Settings.model_validate_json(sys.stdin.read())
    sock = socket.socket(fileno=fd)
    listeners = [socket.socket(fileno=f) for f in listener_fds]
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings, sock, listeners))
