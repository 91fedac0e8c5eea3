from __future__ import annotations

import pytest

from .support import Serve, Sink


@pytest.fixture
def sink(tmp_path):
    s = Sink(tmp_path).start()
    yield s
    s.stop()


@pytest.fixture
def make_serve(tmp_path):
    started: list[Serve] = []

    def make(name: str | None = None, **kw) -> Serve:
        """A server, not started yet; ``name``: a node of that name with a
        directory of its own (for several servers in one test)."""
        where = tmp_path
        if name is not None:
            where = tmp_path / name
            where.mkdir()
            kw["node_name"] = name
        srv = Serve(where, **kw)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        try:
            srv.stop()
        except Exception:
            srv.kill()
