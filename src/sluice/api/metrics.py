"""``GET /metrics``: Prometheus text exposition (prometheus_client)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..logs import ADMIN_BOUNCE, BOUNCE, DELIVERY, EXPIRATION, RECEPTION, TRANSIENT_FAILURE
from .deps import services
from .models import ERROR_RESPONSES

router = APIRouter(tags=["status"], responses=ERROR_RESPONSES)

_COUNTERS = [
    ("sluice_messages_received", "Messages accepted (one per recipient).", RECEPTION),
    ("sluice_messages_delivered", "Messages delivered (2xx from the destination).", DELIVERY),
    ("sluice_transient_failures", "Delivery attempts that failed temporarily.", TRANSIENT_FAILURE),
    ("sluice_messages_bounced", "Messages refused permanently by the destination.", BOUNCE),
    ("sluice_messages_admin_bounced", "Messages cancelled by an admin bounce rule.", ADMIN_BOUNCE),
    ("sluice_messages_expired", "Messages that reached max_age undelivered.", EXPIRATION),
]


class _Collector:
    def __init__(self, svc, sites: dict[str, dict[str, Any]]) -> None:
        self.svc = svc
        self.sites = sites

    def collect(self) -> Iterator[Metric]:
        stats = self.svc.stats
        for name, doc, key in _COUNTERS:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], stats.get(key, 0))
            yield c
        q = GaugeMetricFamily("sluice_scheduled_queue_size", "Messages in a scheduled queue.",
                              labels=["queue"])
        for name, n in self.svc.spool.index.counts().items():
            q.add_metric([name], n)
        yield q
        r = GaugeMetricFamily("sluice_ready_queue_size", "Messages promoted for a site.",
                              labels=["site"])
        conns = GaugeMetricFamily("sluice_connections", "Open delivery connections per site.",
                                  labels=["site"])
        max_conns = GaugeMetricFamily("sluice_site_max_connections",
                                      "Most delivery connections a site may have open.",
                                      labels=["site"])
        limit = GaugeMetricFamily("sluice_site_message_rate_limit",
                                  "Messages per second a site may be sent now (a throttle's "
                                  "rate while one lasts); absent without a limit.",
                                  labels=["site"])
        rate = GaugeMetricFamily("sluice_site_delivery_rate",
                                 "Messages delivered to a site per second, over the last 10 s.",
                                 labels=["site"])
        for name, site in self.sites.items():
            r.add_metric([name], site["queued"])
            conns.add_metric([name], site["connections"])
            if "max_connections" in site:
                max_conns.add_metric([name], site["max_connections"])
            if site.get("message_rate_limit") is not None:
                limit.add_metric([name], site["message_rate_limit"])
            if "rate" in site:
                rate.add_metric([name], site["rate"])
        yield r
        yield conns
        yield max_conns
        yield limit
        yield rate
        total = GaugeMetricFamily("sluice_spool_messages", "Messages in the spool.")
        total.add_metric([], self.svc.spool.index.total())
        yield total
        size = GaugeMetricFamily("sluice_spool_bytes", "Size of the spool on disk.")
        size.add_metric([], self.svc.spool.size_bytes())
        yield size


@router.get("/metrics", response_class=Response)
async def metrics(svc=Depends(services)) -> Response:
    """Counters and queue sizes in Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(svc, await svc.manager.delivery.figures()))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
