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

    def make(**kw) -> Serve:
        srv = Serve(tmp_path, **kw)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        try:
            srv.stop()
        except Exception:
            srv.kill()
