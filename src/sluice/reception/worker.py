"""A reception worker: a process that speaks SMTP and nothing else.

``sluice serve`` with ``[server] workers = N`` runs N of these beside the
main process. The main process binds the SMTP listening sockets once and
hands them to every worker; each accepts connections from them (the kernel
gives each connection to one of them) and does the protocol work (commands,
addresses, relay control, DATA). Each accepted message goes to the main
process over a socket pair; the main process stores it with every other
reception in one group commit, applies the rules, and answers once it is
durable; only then does the worker send 250. So the spool keeps a single
writer and the rules are enforced in one place, while the SMTP work runs on
other cores.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import weakref

from ..config import Settings
from ..ipc import Accept, Channel, Ready, Records, Stop, child_main
from ..ipc import Accepted as AcceptAnswer
from ..logs import Tls
from ..message import AddressError
from .intake import Accepted
from .smtp import ReceptionHandler, start_smtp


class RemoteIntake:
    """``Intake``'s interface, carried out by the main process."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    async def accept(self, body: bytes, sender: str, recipients: list[str], *, protocol: str,
                     peer: tuple[str, str] | None, session_id: str | None,
                     tls: Tls | None = None, authn_id: str | None = None,
                     tenant: str | None = None) -> Accepted:
        """Raises AddressError for refused addresses, RemoteError when storing failed."""
        answer = await self.channel.call(
            Accept(sender=sender, recipients=recipients, protocol=protocol, peer=peer,
                   session_id=session_id,
                   tls=(tls.cipher, tls.protocol_version) if tls else None,
                   authn_id=authn_id, tenant=tenant), body, returns=AcceptAnswer)
        if answer.address_error is not None:
            raise AddressError(answer.address_error)
        return Accepted(ids=answer.ids, bounced=answer.bounced)

    async def add_records(self, records: list[bytes]) -> None:
        await self.channel.call(Records(), b"\n".join(records))


async def _serve(settings: Settings, sock: socket.socket, listeners: list[socket.socket]) -> None:
    stop = asyncio.Event()

    async def on_stop(msg: Stop, payload: bytes) -> bool:
        stop.set()
        return True

    channel = await Channel.over(sock, {Stop: on_stop})
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    handler = ReceptionHandler(settings, RemoteIntake(channel))
    sessions: weakref.WeakSet = weakref.WeakSet()
    servers = [await start_smtp(settings, handler, listener, sessions) for listener in listeners]
    await channel.call(Ready(pid=os.getpid()))
    stop_wait = asyncio.create_task(stop.wait())
    closed = asyncio.create_task(channel.wait_closed())
    await asyncio.wait({stop_wait, closed}, return_when=asyncio.FIRST_COMPLETED)
    for srv in servers:
        srv.close()
    await asyncio.sleep(0.2)  # a message being stored gets its 250
    for proto in list(sessions):
        if proto.transport is not None:
            proto.transport.close()
    await channel.close()


def main() -> None:
    """Entry point: ``python -m sluice.reception.worker FD`` (see ``ipc.spawn``)."""
    child_main(_serve)


if __name__ == "__main__":
    main()
