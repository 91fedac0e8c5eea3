"""What one node sends another in an xfer: a batch of messages with their
bodies, as MessagePack, POSTed to the target's ``RECEIVE_PATH``.

A batch names the xfer it belongs to, so that the target recognizes a batch
sent again (after a lost answer or a crash) and stores nothing twice.
"""

from __future__ import annotations

import msgspec

RECEIVE_PATH = "/api/admin/xfer/v1/receive"
CONTENT_TYPE = "application/vnd.msgpack"
PROTOCOL = "Xfer"  # reception_protocol of the target's Reception record


class XferMessage(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    id: str
    queue: str
    sender: str
    recipient: str
    body: int  # index into the batch's bodies
    created: float
    due: float
    attempts: int
    protocol: str | None = None


class XferBatch(msgspec.Struct, forbid_unknown_fields=True):
    xfer: str          # the xfer's id, made by the source
    source: str        # the source's node id
    bodies: list[bytes]
    messages: list[XferMessage]


class XferReceipt(msgspec.Struct):
    node: str     # the target's node id
    stored: int   # new to the target
    known: int    # held already (a batch sent again)


encode = msgspec.msgpack.Encoder().encode
decode_batch = msgspec.msgpack.Decoder(XferBatch).decode
