"""The automation engine in process, on a real server: a rule it made is
extended when the trigger comes again, never duplicated; a rate action holds
the site's rate; the scopes of tenant and campaign actions."""

from __future__ import annotations

import time

from sluice.audit import Actor
from sluice.logs import Response
from sluice.message import QueueName

from ..support import InProcess, settings_for, until

TSS04 = Response(421, "[TSS04] Messages temporarily deferred", (4, 7, 0), ".")


def _settings(tmp_path, *entries: dict):
    return settings_for(tmp_path, shaping={"x.example": {"automation": list(entries)}})


async def test_a_rule_made_again_while_in_force_is_extended_not_duplicated(tmp_path):
    settings = _settings(tmp_path, {"regex": r"\[TSS04\]", "action": "suspend",
                                    "duration": "10m"})
    async with InProcess(settings) as srv:
        engine = srv.services.manager.automation
        suspensions = srv.services.suspensions
        engine.observe(QueueName("x.example"), TSS04, "site-x")
        rule = (await until(lambda: suspensions.active()))[0]
        first_end = rule.expires
        time.sleep(0.05)  # the second trigger comes later: its end is later
        engine.observe(QueueName("x.example", campaign="c1"), TSS04, "site-x")
        await until(lambda: suspensions.active()[0].expires > first_end)
        assert [r.id for r in suspensions.active()] == [rule.id]
        actions = [e["action"] for e in (await srv.api("GET", "/api/admin/audit/v1")).json()]
        assert sorted(actions) == ["suspend-create", "suspend-extend"]
        # it is an ordinary rule: an operator cancels it
        assert (await srv.api("DELETE", "/api/admin/suspend/v1", {"id": rule.id})).status_code \
            == 200
        engine.observe(QueueName("x.example"), TSS04, "site-x")
        new = (await until(lambda: suspensions.active()))[0]
        assert new.id != rule.id


async def test_a_rule_an_operator_made_is_not_extended_by_automation(tmp_path):
    settings = _settings(tmp_path, {"regex": r"\[TSS04\]", "action": "suspend",
                                    "duration": "10m"})
    async with InProcess(settings) as srv:
        r = await srv.api("POST", "/api/admin/suspend/v1",
                          {"domain": "x.example", "reason": "by hand", "duration": "1m"})
        mine = r.json()["id"]
        srv.services.manager.automation.observe(QueueName("x.example"), TSS04, "site-x")
        # same criteria: the automatic rule replaces it, as any new rule would
        active = await until(lambda: [x for x in srv.services.suspensions.active()
                                      if x.id != mine] or None)
        assert active[0].reason.startswith("automation: ")


async def test_tenant_and_campaign_actions_need_that_part(tmp_path):
    settings = _settings(tmp_path,
                         {"regex": r"\[TSS04\]", "action": "suspend_campaign", "duration": "1h"},
                         {"regex": r"\[TSS04\]", "action": "bounce_tenant", "duration": "1h"})
    async with InProcess(settings) as srv:
        engine = srv.services.manager.automation
        engine.observe(QueueName("x.example"), TSS04, "site-x")  # neither tenant nor campaign
        engine.observe(QueueName("x.example", campaign="spring", tenant="acme"), TSS04, "site-x")
        suspended = (await until(lambda: srv.services.suspensions.active()))[0]
        bounced = (await until(lambda: srv.services.bounces.active()))[0]
        assert (suspended.criteria.domain, suspended.criteria.campaign) == ("x.example", "spring")
        assert suspended.criteria.tenant is None
        assert (bounced.criteria.domain, bounced.criteria.tenant) == ("x.example", "acme")
        assert len(srv.services.suspensions.active()) == len(srv.services.bounces.active()) == 1


async def test_responses_that_do_not_match_change_nothing(tmp_path):
    settings = _settings(tmp_path, {"regex": r"^421 .*\[TSS04\]", "action": "suspend",
                                    "duration": "1h"})
    async with InProcess(settings) as srv:
        engine = srv.services.manager.automation
        engine.observe(QueueName("x.example"), Response(451, "[TSS04] x", (4, 7, 0)), "s")
        engine.observe(QueueName("other.example"), TSS04, "s")  # not watched
        assert not engine._tasks  # an action would have its task from the call on
        await srv.api("GET", "/api/admin/suspend/v1")
        assert srv.services.suspensions.active() == []


async def test_a_rule_made_or_extended_is_shared_and_a_shared_extension_is_adopted(tmp_path):
    settings = _settings(tmp_path, {"regex": r"\[TSS04\]", "action": "suspend",
                                    "duration": "10m"})
    async with InProcess(settings) as srv:
        engine = srv.services.manager.automation
        suspensions = srv.services.suspensions
        shared: list[dict] = []

        async def share(rule) -> None:
            shared.append(rule.to_row())

        engine.share = share
        engine.observe(QueueName("x.example"), TSS04, "site-x")
        await until(lambda: len(shared) == 1)
        time.sleep(0.05)
        engine.observe(QueueName("x.example", campaign="c1"), TSS04, "site-x")
        await until(lambda: len(shared) == 2)
        assert shared[0]["id"] == shared[1]["id"]
        assert shared[1]["expires"] > shared[0]["expires"]
        # what another node does with them: adopt, then extend on the second
        row = {**shared[1], "id": "5b0c1a1e-0000-4000-8000-000000000001",
               "criteria": {**shared[1]["criteria"], "domain": "y.example"}}
        actor = Actor("cluster:node-z")
        adopted = await suspensions.adopt({**row, "expires": row["expires"] - 60}, actor)
        assert adopted is not None
        assert await suspensions.adopt({**row, "expires": row["expires"] - 60}, actor) is None
        extended = await suspensions.adopt(row, actor)
        assert extended is not None and extended.expires == row["expires"]
        assert len(suspensions.active()) == 2
