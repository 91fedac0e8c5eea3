"""``SluiceSMTP.__init__`` sets aiosmtpd's per-connection state itself (aiosmtpd's
own ``__init__`` costs a quarter of the CPU of accepting a message). That is
only right while it sets exactly what upstream's does: this fails when an
aiosmtpd release adds, renames or drops a per-connection attribute, and the
package's version range (pyproject.toml) keeps such a release out until
``SluiceSMTP`` follows it."""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import SMTP

from sluice.config import Settings
from sluice.reception.smtp import ReceptionHandler, SluiceSMTP


def test_sluice_smtp_sets_the_same_per_connection_state_as_aiosmtpd(tmp_path):
    settings = Settings.model_validate({"server": {"data_dir": str(tmp_path)}})
    handler = ReceptionHandler(settings, intake=None)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    try:
        upstream = SMTP(handler, hostname="h", ident="x", data_size_limit=1000, loop=loop,
                        enable_SMTPUTF8=True, decode_data=False, timeout=10)
        ours = SluiceSMTP(handler, hostname="h", ident="x", data_size_limit=1000, timeout=10,
                          loop=loop)
    finally:
        loop.close()
    # Sluice's own additions, on top of upstream's state; command_size_limits
    # is per connection here (upstream shares one on the class)
    extra = {"_greeted", "_helo_reply", "command_size_limits"}
    assert set(vars(ours)) - extra == set(vars(upstream))
    for name in ("enable_SMTPUTF8", "_decode_data", "data_size_limit", "hostname",
                 "_timeout_duration", "_auth_required", "_auth_require_tls", "tls_context"):
        assert getattr(ours, name) == getattr(upstream, name), name
    assert not ours.require_starttls and not upstream.require_starttls
    assert set(ours._smtp_methods) == set(upstream._smtp_methods)
