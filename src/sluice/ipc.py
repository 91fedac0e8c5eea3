"""Messages between the main process and its children (the reception
workers, the delivery process), the channel that carries them, and how a
child is started.

Every message is a typed struct listed below (msgspec, tagged by class
name); nothing else crosses. One socket pair per child. A frame is two
4-byte lengths, a msgpack header (a call or an answer) and a raw payload (a
message body travels as bytes, never inside the header). Either side may
``call`` (send and wait for the answer); the other side answers each call
in its own task with the handler registered for that message type. A
handler that raises answers at once with the error, which the caller raises
as ``RemoteError`` (no caller waits out a timeout for a failure).
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
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, Union

import msgspec

from .logs import Attempt, Response
from .message import QueueName
from .spool.base import Stored

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger(__name__)


# -- the messages -----------------------------------------------------------

class Message(msgspec.Struct, tag=True, kw_only=True):
    """Base of every message; the tag is the class name."""


# both ways
class Ready(Message):
    """A child is up (child to main, the first call it makes)."""
    pid: int


class Stop(Message):
    """Stop (main to child); a delivery process lets sends under way end
    within ``grace`` seconds and answers the ids of those it gave up."""
    grace: float = 0.0


# reception worker -> main
class Accept(Message):
    """Store a received message (its body is the payload); answered with
    ``Accepted`` once it is durable."""
    sender: str
    recipients: list[str]
    protocol: str
    peer: tuple[str, str] | None
    session_id: str | None
    tls: tuple[str, str] | None = None  # (cipher, protocol version)
    authn_id: str | None = None          # the AUTH user
    tenant: str | None = None            # forced by the AUTH user's line


class Accepted(msgspec.Struct, kw_only=True):
    """The answer to ``Accept``: the message ids, or why the addresses were refused."""
    ids: list[str] = []
    bounced: int = 0
    address_error: str | None = None


class Records(Message):
    """Log records that change nothing (JSON lines in the payload)."""


# main -> delivery process
class PushRules(Message):
    """Every active bounce and suspend rule (rows as stored)."""
    bounces: list[dict[str, Any]]
    suspensions: list[dict[str, Any]]


class Dispatch(Message):
    """Promoted messages to send, with the parts of their queues."""
    queues: dict[str, QueueName]
    msgs: list[Stored]


class Withdraw(Message):
    """Take what bounce rule ``rule_id`` selects out of the ready queues;
    answered with the ids taken."""
    rule_id: str


class Figures(Message):
    """Per-site figures of the ready queues; answered with a dict."""


class Throttle(Message):
    """Hold site ``site``'s message rate to at most ``rate`` per second until
    the unix time ``until`` (``DeliveryPort.throttle``)."""
    site: str
    rate: float
    until: float


# delivery process -> main
class Outcome(Message):
    """The fate of one message: delivered, bounced, failed or stopped (by a rule)."""
    kind: str
    id: str
    response: Response | None = None
    attempt: Attempt = Attempt()
    count_attempt: bool = True


AnyMessage = Union[Ready, Stop, Accept, Records, PushRules, Dispatch, Withdraw, Figures, Throttle,
                   Outcome]


# -- the channel ------------------------------------------------------------

class _Call(msgspec.Struct, tag="call", array_like=True):
    id: int
    msg: AnyMessage


class _Answer(msgspec.Struct, tag="answer", array_like=True):
    id: int
    result: Any = None
    error: str | None = None


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Union[_Call, _Answer]).decode
_LENS = struct.Struct("!II")

T = TypeVar("T")
Handler = Callable[[Any, bytes], Awaitable[Any]]


class ChannelClosed(ConnectionError):
    """The other side is gone."""


class RemoteError(RuntimeError):
    """The other side's handler raised; the message names its exception."""


class Channel:
    """One end of a child's socket pair. ``handlers`` answer the other
    side's calls, one per message type."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 handlers: Mapping[type[Message], Handler]) -> None:
        self._reader = reader
        self._writer = writer
        self._handlers = dict(handlers)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._task: asyncio.Task | None = None
        self._answering: set[asyncio.Task] = set()

    @classmethod
    async def over(cls, sock: Any, handlers: Mapping[type[Message], Handler]) -> Channel:
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
        channel = cls(reader, writer, handlers)
        channel._task = asyncio.create_task(channel._run(), name="ipc-channel")
        return channel

    async def call(self, msg: Message, payload: bytes = b"", timeout: float = 60.0,
                   returns: type[T] | None = None) -> Any:
        """Send ``msg`` and wait for its answer (converted to ``returns`` when given)."""
        if self._writer.is_closing():
            raise ChannelClosed("channel closed")
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = fut
        try:
            self._send(_Call(call_id, msg), payload)
            result = await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(call_id, None)
        return msgspec.convert(result, returns) if returns is not None else result

    def _send(self, frame: _Call | _Answer, payload: bytes = b"") -> None:
        data = _encode(frame)
        self._writer.write(_LENS.pack(len(data), len(payload)) + data + payload)

    async def _answer(self, call_id: int, msg: Message, payload: bytes) -> None:
        handler = self._handlers.get(type(msg))
        try:
            if handler is None:
                raise LookupError(f"no handler for {type(msg).__name__}")
            frame = _Answer(call_id, await handler(msg, payload))
        except Exception as exc:  # the caller gets the error at once, not a timeout
            log.exception("handling %s failed", type(msg).__name__)
            frame = _Answer(call_id, error=f"{type(exc).__name__}: {exc}")
        if not self._writer.is_closing():
            self._send(frame)

    async def _run(self) -> None:
        try:
            while True:
                head = await self._reader.readexactly(_LENS.size)
                size, payload_size = _LENS.unpack(head)
                frame = _decode(await self._reader.readexactly(size))
                payload = await self._reader.readexactly(payload_size) if payload_size else b""
                if isinstance(frame, _Answer):
                    fut = self._waiting.get(frame.id)
                    if fut is not None and not fut.done():
                        if frame.error is not None:
                            fut.set_exception(RemoteError(frame.error))
                        else:
                            fut.set_result(frame.result)
                else:
                    task = asyncio.create_task(self._answer(frame.id, frame.msg, payload))
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


# -- children ---------------------------------------------------------------

async def spawn(module: str, settings: Settings, handlers: Mapping[type[Message], Handler],
                listeners: list[socket.socket] | tuple = ()
                ) -> tuple[asyncio.subprocess.Process, Channel]:
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
    return proc, await Channel.over(ours, handlers)


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
