"""Schemathesis over the served OpenAPI document: no 5xx, no schema violations.

Generated injections must not leave the machine: MX lookups go to a closed
local port, so any generated destination just fails temporarily. Creating
an xfer is left out: it connects to the target URL it is given at once
(its bad input has its own tests in test_xfer.py).
"""

from __future__ import annotations

import subprocess

from ..support import BIN, free_port


def test_schemathesis_finds_no_server_errors(make_serve):
    srv = make_serve(extra=f'[delivery]\nnameservers = ["127.0.0.1:{free_port()}"]\n').start()
    out = subprocess.run(
        [BIN / "schemathesis", "run", f"{srv.endpoint}/api-docs/openapi.json",
         "--max-examples", "40", "--seed", "20261127",
         "--exclude-path-regex", "^/api/admin/xfer/v1$",
         "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance"],
        capture_output=True, text=True, timeout=240)
    tail = out.stdout[-3000:]
    assert out.returncode == 0, tail
    assert " passed" in tail
    assert "Traceback" not in srv.log.read_text()
