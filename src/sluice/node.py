"""The node's identity: a UUID made once per data directory.

Log records name their node by this UUID (``nodeid``, as KumoMTA's do); the
configured ``[server] node_name`` is the human name shown in views. The UUID
lives in ``<data_dir>/node_id`` so it survives restarts and stays with the
spool it describes; the main process makes it before any child starts, and
every process of the node reads the same file.
"""

from __future__ import annotations

import functools
import os
import uuid
from pathlib import Path


class NodeIdError(RuntimeError):
    """``node_id`` exists but does not hold a UUID."""


@functools.lru_cache(maxsize=None)
def node_id(data_dir: Path) -> str:
    """The UUID of the node whose data directory is ``data_dir``; made if absent."""
    path = Path(data_dir) / "node_id"
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        new = str(uuid.uuid4())
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(new + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # never replaces one that another process made first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        text = path.read_text(encoding="ascii").strip()
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise NodeIdError(f"{path}: does not hold a UUID ({text[:40]!r}); "
                          "remove it to make a new one") from None
