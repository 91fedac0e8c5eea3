"""Durable message storage: the ``Spool`` protocol and its SQLite backend."""

from .base import Inbound, Spool, Stored, new_message_id
from .index import QueueIndex
from .sqlite import SqliteSpool

__all__ = ["Inbound", "QueueIndex", "Spool", "SqliteSpool", "Stored", "new_message_id"]
