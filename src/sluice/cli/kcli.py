"""``kcli``: the operator client for the admin API (KumoMTA's command names).

Exit status: 0 done, 1 the server refused or could not be reached (its
message is printed), 2 usage error.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click
import httpx
from rich.console import Console
from rich.table import Table

DEFAULT_ENDPOINT = "http://127.0.0.1:8000"


class ServerSaidNo(click.ClickException):
    exit_code = 1


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 250, soft_wrap=False,
                   highlight=False)


class Client:
    def __init__(self, endpoint: str, token: str | None) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def call(self, method: str, path: str, body: Any = None, params: dict | None = None) -> Any:
        try:
            resp = httpx.request(method, self.endpoint + path, json=body, params=params,
                                 headers=self.headers, timeout=60.0)
        except httpx.HTTPError as exc:
            raise ServerSaidNo(f"cannot reach {self.endpoint}: {exc}") from None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code >= 400:
            msg = data.get("error") if isinstance(data, dict) else None
            raise ServerSaidNo(f"{resp.status_code}: {msg or resp.text}")
        return data


def options(f):
    f = click.option("--endpoint", envvar="KUMO_KCLI_ENDPOINT", default=DEFAULT_ENDPOINT,
                     show_default=True, help="Base URL of the server's HTTP API.")(f)
    f = click.option("--token", envvar="KCLI_TOKEN", default=None,
                     help="Bearer token (needed when not calling from a trusted host).")(f)
    return f


def _setup(ctx: click.Context, endpoint: str, token: str | None) -> None:
    ctx.obj = Client(endpoint, token)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@options
@click.pass_context
def cli(ctx: click.Context, endpoint: str, token: str | None) -> None:
    """Operate a running Sluice server."""
    _setup(ctx, endpoint, token)


_QUEUE_CRITERIA = ("campaign", "tenant", "domain", "routing_domain")
_MESSAGE_CRITERIA = ("sender", "recipient", "older_than")


def _selection(sel: dict[str, Any]) -> dict[str, Any]:
    """The API's selection fields from the selection options (``selection_options``)."""
    queue, everything = sel.pop("queue"), sel.pop("everything")
    criteria = {k: v for k, v in sel.items() if v is not None}
    queue_criteria = [k for k in _QUEUE_CRITERIA if k in criteria]
    if queue and queue_criteria:
        raise click.UsageError("--queue cannot be combined with --campaign, --tenant, "
                               "--domain or --routing-domain")
    if everything and (criteria or queue):
        raise click.UsageError("--everything selects all mail; it cannot be combined with "
                               "other criteria")
    if not (criteria or queue or everything):
        raise click.UsageError(
            "no criteria given: name a --campaign, --tenant, --domain, --routing-domain, "
            "--queue, --sender, --recipient or --older-than, or say --everything to act on "
            "ALL queued mail")
    if queue:
        criteria["queue_names"] = list(queue)
    return criteria


def criteria_options(f):
    """Which mail (``_selection``), and why."""
    f = click.option("--older-than", default=None,
                     help="Only messages created more than this long ago, e.g. 2h.")(f)
    f = click.option("--recipient", default=None, help="Recipient glob, e.g. '*@example.com'.")(f)
    f = click.option("--sender", default=None,
                     help="Sender glob, case-insensitive, e.g. '*@compromised.example'.")(f)
    f = click.option("--everything", is_flag=True, help="Select ALL mail.")(f)
    f = click.option("--queue", multiple=True, help="Exact scheduled queue name (repeatable).")(f)
    f = click.option("--routing-domain", default=None)(f)
    f = click.option("--domain", default=None, help="Recipient domain.")(f)
    f = click.option("--tenant", default=None)(f)
    f = click.option("--campaign", default=None)(f)
    f = click.option("--reason", required=True, help="Why; written into the logs.")(f)
    return f


def selection_options(f):
    """A rule's options: which mail, why, and for how long."""
    f = criteria_options(f)
    f = click.option("--duration", default=None,
                     help="How long the rule keeps catching new mail (default 5m).")(f)
    return f


@cli.command()
@selection_options
@click.option("--suppress-logging", is_flag=True, help="Write no AdminBounce records.")
@click.option("--dry-run", is_flag=True, help="Only show which queues match and their sizes.")
@click.option("--grace", default=None,
              help="Hold matching mail this long before bouncing it, e.g. 10m (cancel or "
                   "bounce-apply in the meantime).")
@click.pass_obj
def bounce(client: Client, reason, duration, suppress_logging, dry_run, grace, **sel) -> None:
    """Bounce (cancel) matching queued mail; kcli bounce-restore undoes it."""
    body: dict[str, Any] = {"reason": reason, **_selection(sel)}
    if grace is not None:
        body["grace"] = grace
    if duration is not None:
        body["duration"] = duration
    if suppress_logging:
        body["suppress_logging"] = True
    if dry_run:
        body["dry_run"] = True
        data = client.call("POST", "/api/admin/bounce/v1", body)
        table = Table("QUEUE", "MESSAGES", box=None)
        for q, n in sorted(data["queues"].items(), key=lambda x: (-x[1], x[0])):
            table.add_row(q, str(n))
        table.add_row("TOTAL", str(data["total"]))
        console = _console()
        console.print(table)
        if data.get("samples"):
            samples = Table("ID", "SENDER", "RECIPIENT", "QUEUE", box=None)
            for m in data["samples"]:
                samples.add_row(m["id"], m["sender"], m["recipient"], m["queue"])
            console.print()
            console.print(samples)
        return
    data = client.call("POST", "/api/admin/bounce/v1", body)
    click.echo(data["id"])
    if grace is not None:
        click.echo(f"bounce rule created; matching mail is held for {grace}, then bounced "
                   "(kcli bounce-cancel releases it, kcli bounce-apply bounces it now)", err=True)
    else:
        click.echo("bounce rule created; matching queued mail is being bounced in the "
                   "background (see kcli bounce-list for counts)", err=True)


def _criteria_text(entry: dict) -> str:
    parts = ["queue=" + ",".join(entry["queue_names"])] if entry.get("queue_names") else []
    parts += [f"{k}={entry[k]}" for k in (*_QUEUE_CRITERIA, *_MESSAGE_CRITERIA) if entry.get(k)]
    return " ".join(parts) or "everything"


@cli.command("bounce-list")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON array.")
@click.pass_obj
def bounce_list(client: Client, as_json: bool) -> None:
    """List the bounce rules in force."""
    data = client.call("GET", "/api/admin/bounce/v1")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table("ID", "STATE", "BOUNCE IN", "REASON", "REMAIN", "BOUNCED", "CRITERIA", box=None)
    for e in data:
        table.add_row(e["id"], e["state"], e.get("bounce_in") or "-", e["reason"], e["duration"],
                      str(e["total_bounced"]), _criteria_text(e))
    _console().print(table)


@cli.command("bounce-cancel")
@click.option("--id", "rule_id", required=True, help="Rule id from bounce or bounce-list.")
@click.pass_obj
def bounce_cancel(client: Client, rule_id: str) -> None:
    """Stop a bounce rule (a pending rule releases what it held; mail already
    bounced stays bounced: see bounce-restore)."""
    client.call("DELETE", "/api/admin/bounce/v1", {"id": rule_id})
    click.echo(f"bounce rule {rule_id} cancelled")


@cli.command("bounce-apply")
@click.option("--id", "rule_id", required=True, help="Rule id from bounce or bounce-list.")
@click.pass_obj
def bounce_apply(client: Client, rule_id: str) -> None:
    """End a pending bounce rule's grace now: it bounces what it held."""
    client.call("POST", "/api/admin/bounce/v1/apply", {"id": rule_id})
    click.echo(f"bounce rule {rule_id} applied")


@cli.command("bounce-restore")
@click.option("--id", "rule_id", required=True, help="Rule id (in force, cancelled or expired).")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON answer.")
@click.pass_obj
def bounce_restore(client: Client, rule_id: str, as_json: bool) -> None:
    """Put back every message a bounce rule bounced that is still retained."""
    data = client.call("POST", "/api/admin/bounce/v1/restore", {"id": rule_id})
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table("QUEUE", "RESTORED", box=None)
    for q, n in sorted(data["restored"].items(), key=lambda x: (-x[1], x[0])):
        table.add_row(q, str(n))
    table.add_row("TOTAL", str(data["total_restored"]))
    console = _console()
    console.print(table)
    if data["unavailable"]:
        console.print(f"{data['unavailable']} bounced by this rule were no longer retained "
                      "and could not be restored")


@cli.command()
@click.option("--since", default=None, help="RFC 3339 time: only entries from then on.")
@click.option("--limit", type=click.IntRange(min=1, max=10000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON array.")
@click.pass_obj
def audit(client: Client, since: str | None, limit: int, as_json: bool) -> None:
    """Who did what: every admin write, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if since is not None:
        params["since"] = since
    data = client.call("GET", "/api/admin/audit/v1", params=params)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table("TIME", "ACTION", "ACTOR", "RULE", "RESULT", box=None)
    for e in data:
        result = json.dumps(e["result"], separators=(",", ":")) if e["result"] is not None else ""
        table.add_row(e["time"], e["action"], e["actor"], e["rule_id"] or "-", result)
    _console().print(table)


@cli.command()
@selection_options
@click.pass_obj
def suspend(client: Client, reason, duration, **sel) -> None:
    """Hold matching mail in its queue (not delivered, not bounced)."""
    body: dict[str, Any] = {"reason": reason, **_selection(sel)}
    if duration is not None:
        body["duration"] = duration
    data = client.call("POST", "/api/admin/suspend/v1", body)
    click.echo(data["id"])


@cli.command("suspend-list")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON array.")
@click.pass_obj
def suspend_list(client: Client, as_json: bool) -> None:
    """List the suspensions in force."""
    data = client.call("GET", "/api/admin/suspend/v1")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table("ID", "REASON", "REMAIN", "CRITERIA", box=None)
    for e in data:
        table.add_row(e["id"], e["reason"], e["duration"], _criteria_text(e))
    _console().print(table)


@cli.command("suspend-cancel")
@click.option("--id", "rule_id", required=True, help="Suspension id from suspend or suspend-list.")
@click.pass_obj
def suspend_cancel(client: Client, rule_id: str) -> None:
    """End a suspension; held mail is delivered within seconds."""
    client.call("DELETE", "/api/admin/suspend/v1", {"id": rule_id})
    click.echo(f"suspension {rule_id} cancelled")


@cli.command()
@criteria_options
@click.option("--target", required=True,
              help="The other node's HTTP API base URL, e.g. http://10.0.0.2:8000.")
@click.pass_obj
def xfer(client: Client, reason, target, **sel) -> None:
    """Move matching queued mail to another node (e.g. to drain this one
    before maintenance); each message leaves only once the target stored it."""
    data = client.call("POST", "/api/admin/xfer/v1",
                       {"reason": reason, "target": target, **_selection(sel)})
    click.echo(data["id"])
    click.echo(f"xfer to {data['target']} started (queue {data['queue_name']}); see kcli "
               "xfer-list for progress, kcli xfer-cancel to stop it", err=True)


@cli.command("xfer-list")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON array.")
@click.pass_obj
def xfer_list(client: Client, as_json: bool) -> None:
    """List this node's xfers and how far each has got."""
    data = client.call("GET", "/api/admin/xfer/v1")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    table = Table("ID", "TARGET", "STATE", "WAITING", "SENT", "MOVED", "RETURNED", "CRITERIA",
                  "ERROR", box=None)
    for e in data:
        table.add_row(e["id"], e["target"], e["state"], str(e["waiting"]), str(e["sent"]),
                      str(e["moved"]), str(e["returned"]), _criteria_text(e["criteria"]),
                      e["error"] or "")
    _console().print(table)


@cli.command("xfer-cancel")
@click.argument("queue_name", required=False)
@click.option("--id", "xfer_id", default=None, help="The xfer's id (from xfer or xfer-list).")
@click.option("--reason", required=True,
              help="Written into the AdminRebind record of each message given back.")
@click.pass_obj
def xfer_cancel(client: Client, queue_name: str | None, xfer_id: str | None, reason: str) -> None:
    """Stop an xfer, named by its queue (<target>.xfer.kumomta.internal: every
    xfer to that target) or --id: what it has not sent goes back to its queues."""
    if (queue_name is None) == (xfer_id is None):
        raise click.UsageError("name the xfer's QUEUE_NAME or give --id, not both")
    body = {"reason": reason, **({"id": xfer_id} if xfer_id else {"queue_name": queue_name})}
    data = client.call("POST", "/api/admin/xfer-cancel/v1", body)
    click.echo(f"cancelled {', '.join(data['cancelled'])}: {data['total_returned']} messages "
               f"back in their queues, {data['in_flight']} already sent finish moving")


def format_rate(per_second: float | None) -> str:
    """A rate as configured: ``50/s``, ``1000/m``, ``20000/h`` ("-": no limit)."""
    if per_second is None:
        return "-"
    for unit, seconds in (("s", 1), ("m", 60), ("h", 3600)):
        n = per_second * seconds
        if n >= 1 and abs(n - round(n)) < 1e-6 * n:
            return f"{round(n)}/{unit}"
    return f"{per_second:.4g}/s"


@cli.command("queue-summary")
@click.option("--by-volume", is_flag=True, help="Largest queues first.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Show at most N rows.")
@click.option("--domain", default=None, help="Only queues of this destination domain.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON summary.")
@click.option("--cluster", is_flag=True,
              help="Every live node of the cluster, summed ([cluster] redis_url).")
@click.pass_obj
def queue_summary(client: Client, by_volume: bool, limit: int | None, domain: str | None,
                  as_json: bool, cluster: bool) -> None:
    """Scheduled queues, and ready queues per destination site with its
    limits ([shaping]) and the rate it is delivered at."""
    data = client.call("GET", "/metrics.json", params={"cluster": "true"} if cluster else None)
    scheduled = data["scheduled"]
    if domain:
        d = domain.strip().lower()
        scheduled = {q: n for q, n in scheduled.items()
                     if q.split("!")[0].rpartition("@")[2] == d}
    rows = sorted(scheduled.items(), key=(lambda x: (-x[1], x[0])) if by_volume else None)
    if limit:
        rows = rows[:limit]
    if as_json:
        click.echo(json.dumps({"scheduled": dict(rows), "ready": data["ready"]}, indent=2))
        return
    console = _console()
    # The site's limits ([shaping]): connections at most, messages per
    # connection, message and connection rates; a throttle's rate and end
    # while one lasts; the messages delivered per second over the last 10 s.
    t = Table("SITE", "DELIVERED", "FAILED", "CONNECTIONS", "QUEUED", "MAX-CONN", "PER-CONN",
              "MAX-RATE", "CONN-RATE", "THROTTLED", "RATE", box=None)
    for site, s in sorted(data["ready"].items()):
        throttled = "-"
        if s.get("throttled_until") is not None:
            throttled = (f"{format_rate(s.get('message_rate_limit'))} until "
                         f"{time.strftime('%H:%M:%SZ', time.gmtime(s['throttled_until']))}")
        t.add_row(site, str(s["delivered"]), str(s["failed"]), str(s["connections"]),
                  str(s["queued"]), str(s.get("max_connections", "-")),
                  str(s.get("max_deliveries_per_connection", "-")),
                  format_rate(s.get("max_message_rate")),
                  format_rate(s.get("max_connection_rate")), throttled,
                  f"{s['rate']:.1f}/s" if s.get("rate") is not None else "-")
    console.print(t)
    console.print()
    t = Table("QUEUE", "COUNT", box=None)
    for q, n in rows:
        t.add_row(q, str(n))
    console.print(t)


@cli.command("cluster-status")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON object.")
@click.pass_obj
def cluster_status(client: Client, as_json: bool) -> None:
    """The live nodes of the cluster: name, HTTP endpoint, last seen, queued."""
    data = client.call("GET", "/api/admin/cluster/v1/status")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    t = Table("NODE", "HTTP", "LAST SEEN", "AGO", "SCHEDULED", "READY", box=None)
    for n in data["nodes"]:
        t.add_row(n["name"], n["http"], n["last_seen"], f"{n['seconds_since']:.1f}s",
                  str(n["scheduled"]), str(n["ready"]))
    _console().print(t)


@cli.command("inspect-message")
@click.argument("message_id", required=False, metavar="[ID]")
@click.option("--id", "msg_id", default=None, help="Message id (from the logs); or give it "
              "as the argument, as KumoMTA's kcli takes it.")
@click.option("--want-body", is_flag=True, help="Include the message content.")
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON object.")
@click.pass_obj
def inspect_message(client: Client, message_id: str | None, msg_id: str | None, want_body: bool,
                    as_json: bool) -> None:
    """Show a queued message: queue, meta, attempts, next due time."""
    if message_id and msg_id and message_id != msg_id:
        raise click.UsageError("give the message id once: as the argument or with --id")
    wanted = message_id or msg_id
    if not wanted:
        raise click.UsageError("which message? kcli inspect-message ID (or --id ID)")
    params = {"id": wanted}
    if want_body:
        params["want_body"] = "true"
    data = client.call("GET", "/api/admin/inspect-message/v1", params=params)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    body = data.pop("body", None)
    table = Table(box=None, show_header=False)
    for key, value in data.items():
        if isinstance(value, dict):
            value = " ".join(f"{k}={v}" for k, v in value.items()) or "-"
        table.add_row(key.upper(), str(value))
    _console().print(table)
    if body is not None:
        click.echo()
        click.echo(body, nl=False)


def main() -> None:
    cli(prog_name=os.path.basename(sys.argv[0]) or "kcli")
