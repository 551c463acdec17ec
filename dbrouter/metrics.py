"""Prometheus metrics for a `Router` (optional extra ``prometheus``).

Everything is read from `Router.stats` and the pools' histograms at scrape
time by a custom collector: nothing is added to the query path. Metric names
follow the Prometheus conventions (base units, ``_total`` for counters):

- ``dbrouter_pool_connections{node, state="idle"|"in_use"}`` and
  ``dbrouter_pool_max_connections{node}``, ``dbrouter_pool_waiting{node}``
- ``dbrouter_pool_acquired_total``, ``dbrouter_pool_timeouts_total``, ``dbrouter_pool_rejected_total``,
  ``dbrouter_pool_connect_errors_total``, ``dbrouter_pool_connections_opened_total``,
  ``dbrouter_pool_connections_closed_total``, ``dbrouter_pool_connections_discarded_total``,
  ``dbrouter_pool_leaks_total`` (all ``{node}``)
- ``dbrouter_acquire_seconds{node}``: histogram of the wait for a connection
- ``dbrouter_breaker_state{node}``: 0 closed, 1 open, 2 half-open;
  ``dbrouter_breaker_trips_total{node}``
- ``dbrouter_node_up{node}``, ``dbrouter_node_primary{node}``,
  ``dbrouter_replica_lag_seconds{node}`` (NaN when unknown),
  ``dbrouter_node_latency_seconds{node}`` (moving average), ``dbrouter_node_serving_reads{node}``,
  ``dbrouter_node_slow_ejected{node}``
- ``dbrouter_reads_total``, ``dbrouter_writes_total``, ``dbrouter_retries_total``, ``dbrouter_retries_refused_total``,
  ``dbrouter_fallbacks_total``, ``dbrouter_failovers_total``,
  ``dbrouter_write_outcome_unknown_total``, ``dbrouter_deadline_exceeded_total``,
  ``dbrouter_hedges_total``, ``dbrouter_hedges_won_total``, ``dbrouter_hedges_refused_total``, ``dbrouter_split_brain``

Every metric also carries a ``router`` label (the router's name, ``default``
unless given), so that one process can export several routers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .pool import WAIT_BUCKETS
from .resilience import STATE_CODES

if TYPE_CHECKING:
    from .aio import AsyncRouter
    from .router import Router

__all__ = ["MetricsServer", "RouterCollector", "start_http_server"]

_POOL_COUNTERS = (
    ("acquired", "dbrouter_pool_acquired", "Connections handed out by the pool."),
    ("timeouts", "dbrouter_pool_timeouts", "Callers that gave up waiting for a connection."),
    ("rejected", "dbrouter_pool_rejected", "Callers refused at once because max_waiting were already waiting."),
    ("connect_errors", "dbrouter_pool_connect_errors", "Failed attempts to open a connection."),
    ("opened", "dbrouter_pool_connections_opened", "Connections opened."),
    ("closed", "dbrouter_pool_connections_closed", "Connections closed."),
    ("discarded", "dbrouter_pool_connections_discarded", "Connections thrown away as broken, stale or expired."),
    ("leaks", "dbrouter_pool_leaks", "Connections held longer than leak_threshold."),
)
_ROUTER_COUNTERS = (
    ("reads", "dbrouter_reads", "Reads routed."),
    ("writes", "dbrouter_writes", "Writes and transactions routed to the primary."),
    ("retries", "dbrouter_retries", "Retries after transient failures."),
    ("retries_refused", "dbrouter_retries_refused", "Retries the retry budget refused (the call raised instead)."),
    ("fallbacks", "dbrouter_fallbacks", "Reads sent to the primary because no replica could serve."),
    ("failovers", "dbrouter_failovers", "Times another node became the primary."),
    ("write_outcome_unknown", "dbrouter_write_outcome_unknown", "Writes whose connection broke after sending."),
    ("deadline_exceeded", "dbrouter_deadline_exceeded", "Calls that ran out of their deadline (timeout=, deadline(), call_timeout)."),
    ("hedges", "dbrouter_hedges", "Hedged reads sent to a second replica (hedge_after)."),
    ("hedges_won", "dbrouter_hedges_won", "Hedged reads whose second replica answered first."),
    ("hedges_refused", "dbrouter_hedges_refused", "Hedges the hedge budget refused."),
)


class RouterCollector(Collector):
    """A collector for one router; register it on any registry."""

    def __init__(self, router: Router | AsyncRouter, name: str = "default") -> None:
        self._router = router
        self._name = name

    def describe(self) -> list[Any]:
        return []  # collected on demand; no need to pre-declare

    def collect(self) -> Iterator[Any]:
        router, labels = self._router, ["router", "node"]
        stats = router.stats()
        nodes = stats["nodes"]
        connections = GaugeMetricFamily("dbrouter_pool_connections", "Open connections by state.", labels=[*labels, "state"])
        max_conns = GaugeMetricFamily("dbrouter_pool_max_connections", "The pool's max_size.", labels=labels)
        waiting = GaugeMetricFamily("dbrouter_pool_waiting", "Callers waiting for a connection.", labels=labels)
        counters = {key: CounterMetricFamily(name, doc, labels=labels) for key, name, doc in _POOL_COUNTERS}
        breaker = GaugeMetricFamily("dbrouter_breaker_state", "Circuit breaker: 0 closed, 1 open, 2 half-open.", labels=labels)
        trips = CounterMetricFamily("dbrouter_breaker_trips", "Times the breaker opened.", labels=labels)
        up = GaugeMetricFamily("dbrouter_node_up", "1 when the node answered its last probe.", labels=labels)
        primary = GaugeMetricFamily("dbrouter_node_primary", "1 for the node writes go to.", labels=labels)
        lag = GaugeMetricFamily("dbrouter_replica_lag_seconds", "Replay lag of a replica (NaN: unknown).", labels=labels)
        latency = GaugeMetricFamily("dbrouter_node_latency_seconds", "Moving average of statement time.", labels=labels)
        serving = GaugeMetricFamily("dbrouter_node_serving_reads", "1 when the node is in the read rotation.", labels=labels)
        slow = GaugeMetricFamily("dbrouter_node_slow_ejected", "1 while a slow replica is out of rotation.", labels=labels)
        acquire = HistogramMetricFamily("dbrouter_acquire_seconds", "Time waited for a pooled connection.", labels=labels)
        by_name = {node.name: node for node in router.nodes}
        for node_name, info in nodes.items():
            values = [self._name, node_name]
            pool = info["pool"]
            connections.add_metric([*values, "idle"], pool["idle"])
            connections.add_metric([*values, "in_use"], pool["in_use"])
            max_conns.add_metric(values, pool["max_size"])
            waiting.add_metric(values, pool["waiting"])
            for key, _name, _doc in _POOL_COUNTERS:
                counters[key].add_metric(values, pool[key])
            breaker.add_metric(values, STATE_CODES.get(info["breaker"], 1))
            trips.add_metric(values, info["breaker_trips"])
            up.add_metric(values, 1 if info["healthy"] else 0)
            primary.add_metric(values, 1 if info["role"] == "primary" else 0)
            if info["role"] != "primary":
                lag.add_metric(values, math.nan if info["lag"] is None else info["lag"])
            latency.add_metric(values, info["latency"])
            serving.add_metric(values, 1 if info["serving_reads"] else 0)
            slow.add_metric(values, 1 if info["slow_ejected"] else 0)
            node = by_name.get(node_name)
            if node is not None:
                cumulative, total, _count = node.pool.wait_histogram()
                bounds = [*(str(b) for b in WAIT_BUCKETS), "+Inf"]
                acquire.add_metric(values, list(zip(bounds, cumulative, strict=True)), total)
        yield from (connections, max_conns, waiting, *counters.values(), breaker, trips, up, primary, lag, latency, serving,
                    slow, acquire)
        for key, name, doc in _ROUTER_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["router"])
            family.add_metric([self._name], stats[key])
            yield family
        split = GaugeMetricFamily("dbrouter_split_brain", "1 while more than one node accepts writes.", labels=["router"])
        split.add_metric([self._name], 1 if stats["split_brain"] else 0)
        yield split


class MetricsServer:
    """A running exporter; `stop` shuts it down."""

    def __init__(self, server: Any, thread: Any, registry: CollectorRegistry) -> None:
        self._server = server
        self._thread = thread
        self.registry = registry

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_http_server(router: Router | AsyncRouter, port: int = 9187, addr: str = "127.0.0.1", *, name: str = "default") -> MetricsServer:
    """Serve ``router``'s metrics at ``http://addr:port/metrics`` (port 0 picks a free one).

    Binds to loopback by default; pass ``addr="0.0.0.0"`` to let a Prometheus on
    another host scrape it.
    """
    registry = CollectorRegistry()
    registry.register(RouterCollector(router, name))
    server, thread = _start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(server, thread, registry)
