"""Typed settings read from TOML, with the embedded defaults (README, "Configuration").

Every key is optional. A bad file raises ConfigError whose message names the
file, the key and the problem, so ``sluice serve`` can stop with it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .durations import parse_duration, parse_positive_duration
from .message import AddressError, normalize_domain

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


def _duration(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("must be longer than 0s")
        return float(value)
    return parse_positive_duration(value)


Seconds = Annotated[float, BeforeValidator(_duration)]


def _duration_or_zero(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if not isinstance(value, str):
        raise ValueError("expected a duration string like '0s', '10m' or '1h'")
    return parse_duration(value)


SecondsOrZero = Annotated[float, BeforeValidator(_duration_or_zero)]


def _host_port(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected 'HOST:PORT'")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not 'HOST:PORT'")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, e.g. '[::1]:2025'")
    return value


HostPort = Annotated[str, BeforeValidator(_host_port)]


def parse_networks(values: list[str]) -> list[IPNetwork]:
    nets = []
    for v in values:
        try:
            nets.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address or CIDR") from None
    return nets


def host_in(host: str | None, networks: list[IPNetwork]) -> bool:
    """Whether the address ``host`` (IPv4-mapped IPv6 counts as IPv4) is in ``networks``."""
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    data_dir: str = "var"
    node_name: str = "sluice"
    # SMTP reception processes sharing the listening port, plus one delivery
    # process; 0 = everything in the main process. Default: the number of
    # cores (bench/RESULTS.md, "Reception and delivery processes").
    workers: int = Field(default_factory=lambda: min(os.cpu_count() or 1, 64), ge=0, le=64)


_LOCAL_NAMES = {"localhost", "localhost.localdomain", "localhost6", "localhost6.localdomain6",
                "ip6-localhost", "ip6-loopback"}


def default_hostname() -> str:
    """The EHLO name and banner when ``[smtp] hostname`` is not set.

    The machine's fully qualified name; where the resolver only says
    ``localhost`` (as in many containers), the host name. Never ``localhost``,
    which receivers reject or score down: with no usable name at all, a
    reserved ``.invalid`` one, and ``hostname_warnings`` says to set one.
    """
    for name in (socket.getfqdn(), socket.gethostname()):
        name = name.strip().rstrip(".").lower()
        if name and name not in _LOCAL_NAMES and not name.startswith("localhost."):
            return name
    return "sluice.invalid"


def check_readable(path: str) -> str:
    """A file the server reads at start: an error now names it and the key."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    return path


ReadableFile = Annotated[str, AfterValidator(check_readable)]


class SmtpSettings(_Section):
    listen: list[HostPort] = ["127.0.0.1:2025"]
    hostname: str = Field(default_factory=default_hostname)
    relay_hosts: list[str] = ["127.0.0.1", "::1"]
    max_message_size: int = Field(default=20 * 1024 * 1024, gt=0)
    tenant_header: str = "X-Tenant"
    campaign_header: str = "X-Campaign"
    max_recipients: int = Field(default=1000, gt=0)
    idle_timeout: Seconds = 300.0
    # STARTTLS: both PEM files, or neither (a self-signed certificate for
    # hostname is made under <data_dir>/tls/ on first start).
    tls_certificate: ReadableFile | None = None
    tls_private_key: ReadableFile | None = None
    require_tls: bool = False
    # SMTP AUTH: lines "user:<argon2 or bcrypt hash>[:tenant]" (sluice passwd)
    auth_file: ReadableFile | None = None

    @model_validator(mode="after")
    def _check_tls_pair(self) -> SmtpSettings:
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            missing = "tls_private_key" if self.tls_private_key is None else "tls_certificate"
            raise ValueError(f"{missing} must be set too: set both tls_certificate and "
                             "tls_private_key, or neither (a self-signed certificate)")
        return self

    @field_validator("relay_hosts")
    @classmethod
    def _check_relay(cls, v: list[str]) -> list[str]:
        parse_networks(v)
        return v

    def relay_networks(self) -> list[IPNetwork]:
        return parse_networks(self.relay_hosts)

    @field_validator("hostname")
    @classmethod
    def _check_hostname(cls, v: str) -> str:
        v = v.strip().rstrip(".")
        if not v or any(c.isspace() or not c.isprintable() for c in v) or not v.isascii():
            raise ValueError("must be a host name (ASCII, no spaces)")
        return v

    def hostname_warnings(self) -> list[str]:
        """What an operator should know about the EHLO name (Postfix's practice:
        warn when it is not fully qualified)."""
        if self.hostname.endswith(".invalid"):
            return [f"no usable host name found; EHLO uses {self.hostname!r}: set [smtp] hostname"]
        if "." not in self.hostname:
            return [f"[smtp] hostname {self.hostname!r} is not a fully qualified domain name; "
                    "receivers may refuse or score down mail from it: set [smtp] hostname"]
        return []


class HttpSettings(_Section):
    listen: list[HostPort] = ["127.0.0.1:8000"]
    trusted_hosts: list[str] = ["127.0.0.1", "::1"]
    tokens_file: ReadableFile | None = None

    @field_validator("trusted_hosts")
    @classmethod
    def _check_trusted(cls, v: list[str]) -> list[str]:
        parse_networks(v)
        return v

    def trusted_networks(self) -> list[IPNetwork]:
        return parse_networks(self.trusted_hosts)


class QueueSettings(_Section):
    retry_interval: Seconds = 20 * 60.0
    max_retry_interval: Seconds = 8 * 3600.0
    max_age: Seconds = 7 * 86400.0


class QueueOverride(_Section):
    retry_interval: Seconds | None = None
    max_retry_interval: Seconds | None = None
    max_age: Seconds | None = None


TlsMode = Literal["opportunistic", "required", "required_insecure", "disabled"]


class DeliverySettings(_Section):
    connections_per_site: int = Field(default=32, gt=0)
    messages_per_connection: int = Field(default=100, gt=0)
    connect_timeout: Seconds = 30.0
    command_timeout: Seconds = 60.0
    nameservers: list[HostPort] = []   # DNS servers for MX lookups; empty = the system's
    # TLS to the next hop; per destination domain in [tls]
    tls: TlsMode = "opportunistic"
    tls_ca_file: ReadableFile | None = None   # CAs trusted besides the system's


class DkimSettings(_Section):
    """``[dkim."example.org"]``: the key that signs mail from that domain
    (and its subdomains without a key of their own)."""

    selector: str
    key_file: ReadableFile
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"
    headers: list[str] | None = None   # None: the signer's default list

    @field_validator("selector")
    @classmethod
    def _check_selector(cls, v: str) -> str:
        labels = v.split(".")
        if not v or not all(lab and lab.replace("-", "").replace("_", "").isalnum()
                            and lab.isascii() for lab in labels):
            raise ValueError(f"{v!r} is not a DNS label (letters, digits, '-', '_', dots)")
        return v


_RATE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*(s|sec|m|min|h|hr|d)\s*")
_RATE_UNIT = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}


def parse_rate(value: Any) -> float:
    """``"50/s"``, ``"1000/m"``, ``"20000/h"`` -> per second (KumoMTA's form)."""
    m = _RATE.fullmatch(value) if isinstance(value, str) else None
    if m is None or float(m.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a rate like '50/s', '1000/m' or '20000/h'")
    return float(m.group(1)) / _RATE_UNIT[m.group(2)]


def _rate(value: Any) -> float:
    # A number is per second (as a duration's number is seconds): what the
    # settings are written as when they go to a child process (JSON).
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 < value < float("inf"):
            raise ValueError("must be above 0")
        return float(value)
    return parse_rate(value)


PerSecond = Annotated[float, BeforeValidator(_rate)]

AUTOMATION_ACTIONS = ("suspend", "suspend_tenant", "suspend_campaign",
                      "bounce", "bounce_tenant", "bounce_campaign")


class Threshold(_Section):
    count: int = Field(ge=1)
    period: Seconds


class Automation(_Section):
    """``[[shaping."<domain>".automation]]``: what to do when a receiver's
    response matches ``regex`` (the response as one line: code, enhanced
    code, text)."""

    regex: str
    action: str
    duration: Seconds
    threshold: Threshold | None = None   # None: the first match acts

    @field_validator("regex")
    @classmethod
    def _check_regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return v

    @field_validator("action")
    @classmethod
    def _check_action(cls, v: str) -> str:
        name, sep, value = v.partition("=")
        if sep and name.strip() == "max_message_rate":
            parse_rate(value)
            return f"max_message_rate={value.strip()}"
        if v not in AUTOMATION_ACTIONS:
            raise ValueError(f"{v!r}: expected one of {', '.join(AUTOMATION_ACTIONS)} or "
                             "'max_message_rate=RATE' (e.g. 'max_message_rate=1/m')")
        return v

    @property
    def rate(self) -> float | None:
        """The lowered rate of a ``max_message_rate=`` action (per second)."""
        name, sep, value = self.action.partition("=")
        return parse_rate(value) if sep else None


class Shaping(_Section):
    """``[shaping."<domain>"]`` and ``[shaping.default]``: limits per
    destination site (the MX hosts a domain resolves to); a key that is not
    set falls back to ``default``, then to ``[delivery]``."""

    max_connections: int | None = Field(default=None, ge=1)
    max_deliveries_per_connection: int | None = Field(default=None, ge=1)
    max_message_rate: PerSecond | None = None
    max_connection_rate: PerSecond | None = None
    connect_timeout: Seconds | None = None
    idle_timeout: Seconds | None = None
    # the rates hold for the whole cluster ([cluster] redis_url), not per node
    shared: bool | None = None
    automation: list[Automation] = []


@dataclass(frozen=True, slots=True)
class SiteLimits:
    """The limits a destination site is held to (``Settings.limits_for``)."""

    max_connections: int
    max_deliveries_per_connection: int
    max_message_rate: float | None      # messages per second; None: no limit
    max_connection_rate: float | None   # new connections per second
    connect_timeout: float
    idle_timeout: float                 # an idle connection is closed after this
    shared: bool = False                # max_message_rate holds for the cluster


class ClusterSettings(_Section):
    """``[cluster]``: off unless ``redis_url`` is set."""

    redis_url: str | None = None   # redis://host:port/db, rediss://..., unix:///path
    # The bearer token this node presents to another node's API (xfer);
    # needed when it is not one of that node's trusted hosts.
    token: str | None = None

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        scheme, sep, rest = v.partition("://")
        if not sep or scheme not in ("redis", "rediss", "unix") or not rest:
            raise ValueError(f"{v!r} is not a Redis URL like 'redis://127.0.0.1:6379/0'")
        return v


class AdminSettings(_Section):
    # A new bounce rule holds matching mail this long before it bounces it
    # (its "grace"; the API's "grace" field overrides it). 0s: at once.
    bounce_grace: SecondsOrZero = 0.0
    # What an admin bounce removed is kept this long, so that it can be
    # restored; 0s: nothing is kept. Within max_bytes, oldest dropped first.
    bounce_retention: SecondsOrZero = 3600.0
    bounce_retention_max_bytes: int = Field(default=1 << 30, ge=0)


class Settings(BaseModel):
    """The whole configuration; ``Settings()`` is the embedded default."""

    model_config = ConfigDict(extra="forbid")

    server: ServerSettings = ServerSettings()
    smtp: SmtpSettings = SmtpSettings()
    http: HttpSettings = HttpSettings()
    queue: QueueSettings = QueueSettings()
    queue_overrides: dict[str, QueueOverride] = {}
    delivery: DeliverySettings = DeliverySettings()
    admin: AdminSettings = AdminSettings()
    tls: dict[str, TlsMode] = {}
    dkim: dict[str, DkimSettings] = {}
    shaping: dict[str, Shaping] = {}
    cluster: ClusterSettings = ClusterSettings()
    routes: dict[str, HostPort] = {}
    routing_domains: dict[str, str] = {}

    def queue_settings_for(self, domain: str) -> QueueSettings:
        """Defaults merged with the ``[queue."domain"]`` override, if any."""
        override = self.queue_overrides.get(domain)
        if override is None:
            return self.queue
        merged = self.queue.model_dump()
        merged.update({k: v for k, v in override.model_dump().items() if v is not None})
        return QueueSettings(**merged)

    def limits_for(self, domain: str) -> SiteLimits:
        """``[shaping."domain"]``, then ``[shaping.default]``, then ``[delivery]``."""
        d = self.delivery
        chain = [x for x in (self.shaping.get(domain), self.shaping.get("default")) if x]

        def pick(key: str, fallback: Any) -> Any:
            for entry in chain:
                value = getattr(entry, key)
                if value is not None:
                    return value
            return fallback

        return SiteLimits(
            max_connections=pick("max_connections", d.connections_per_site),
            max_deliveries_per_connection=pick("max_deliveries_per_connection",
                                               d.messages_per_connection),
            max_message_rate=pick("max_message_rate", None),
            max_connection_rate=pick("max_connection_rate", None),
            connect_timeout=pick("connect_timeout", d.connect_timeout),
            idle_timeout=pick("idle_timeout", 5.0),
            shared=pick("shared", False),
        )

    def automation_for(self, domain: str) -> list[tuple[str, Automation]]:
        """The automation entries that watch mail to ``domain``, each with
        its name (``<domain>#<n>``, ``default#<n>``; n counts from 1)."""
        out = []
        for key in (domain, "default"):
            entry = self.shaping.get(key)
            if entry is not None:
                out.extend((f"{key}#{i}", a) for i, a in enumerate(entry.automation, 1))
        return out

    @model_validator(mode="after")
    def _check_shared(self) -> Settings:
        for key, entry in self.shaping.items():
            if entry.shared and not self.cluster.redis_url:
                name = f'"{key}"' if "." in key else key
                raise ValueError(f"shaping.{name}.shared needs [cluster] redis_url (a rate "
                                 "shared by the nodes of a cluster)")
        return self

    @property
    def data_path(self) -> Path:
        return Path(self.server.data_dir)


_QUEUE_KEYS = set(QueueSettings.model_fields)


def _split_queue_table(raw: dict[str, Any]) -> dict[str, Any]:
    """``[queue]`` holds both the defaults and ``[queue."domain"]`` tables."""
    queue = raw.get("queue")
    if not isinstance(queue, dict):
        return raw
    defaults = {k: v for k, v in queue.items() if not isinstance(v, dict)}
    overrides = {}
    for key, value in queue.items():
        if isinstance(value, dict):
            try:
                overrides[normalize_domain(key)] = value
            except AddressError as exc:
                raise ConfigError(f"queue.{key}: {exc}") from None
    out = dict(raw)
    out["queue"] = defaults
    out["queue_overrides"] = overrides
    return out


def _normalize_domain_keys(raw: dict[str, Any], table: str, values_too: bool,
                           keep: tuple[str, ...] = ()) -> None:
    section = raw.get(table)
    if not isinstance(section, dict):
        return
    out = {}
    for key, value in section.items():
        try:
            k = key if key in keep else normalize_domain(key)
            out[k] = normalize_domain(value) if values_too and isinstance(value, str) else value
        except AddressError as exc:
            raise ConfigError(f"{table}.{key}: {exc}") from None
    raw[table] = out


def settings_from_dict(raw: dict[str, Any], source: str = "<config>") -> Settings:
    """Validate a parsed TOML document; errors name ``source`` and the key."""
    try:
        raw = _split_queue_table(dict(raw))
        _normalize_domain_keys(raw, "routes", values_too=False)
        _normalize_domain_keys(raw, "routing_domains", values_too=True)
        _normalize_domain_keys(raw, "tls", values_too=False)
        _normalize_domain_keys(raw, "dkim", values_too=False)
        _normalize_domain_keys(raw, "shaping", values_too=False, keep=("default",))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = list(err["loc"])
            if loc and loc[0] == "queue_overrides":
                loc[0] = "queue"
            key = ".".join(f'"{p}"' if "." in str(p) else str(p)
                           for p in loc if not str(p).startswith("function-"))
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append(f"{key}: {msg.removeprefix('Value error, ')}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None


def load_settings(path: str | Path | None) -> Settings:
    """Read ``path`` (TOML) or return the embedded defaults when None."""
    if path is None:
        return Settings()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return settings_from_dict(raw, str(p))
