"""Per-node metrics, exported in Prometheus text format.

Counters on the message path are plain ints bumped inline (a prometheus_client Counter takes a
lock per increment); a custom collector turns them into metric families when scraped.
"""

from __future__ import annotations

import collections

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class NodeMetrics:
    __slots__ = ("node", "registry", "messages_in", "messages_out", "bytes_in", "bytes_out", "errors", "rpc_seconds",
                 "_gauges")

    def __init__(self, node: str) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        self.messages_in = 0
        self.messages_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self._gauges: dict[str, tuple[str, object]] = {}
        self.rpc_seconds = Histogram(
            "dmlsys_rpc_seconds", "Round-trip time of RPCs this node made, by method",
            ["method"], registry=self.registry, buckets=RPC_BUCKETS,
        )
        self.registry.register(self)

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def gauge(self, name: str, help: str, read) -> None:
        """Export ``read()`` as gauge ``dmlsys_<name>`` (services use this for queue depths etc.)."""
        self._gauges[name] = (help, read)

    def collect(self):
        labels = ["node"]
        for name, help, value in (
            ("dmlsys_messages_in", "Messages received", self.messages_in),
            ("dmlsys_messages_out", "Messages sent", self.messages_out),
            ("dmlsys_bytes_in", "Bytes received", self.bytes_in),
            ("dmlsys_bytes_out", "Bytes sent", self.bytes_out),
        ):
            family = CounterMetricFamily(name, help, labels=labels)
            family.add_metric([self.node], value)
            yield family
        family = CounterMetricFamily("dmlsys_errors", "Errors by kind", labels=["node", "kind"])
        for kind, count in sorted(self.errors.items()):
            family.add_metric([self.node, kind], count)
        yield family
        for name, (help, read) in self._gauges.items():
            family = GaugeMetricFamily(f"dmlsys_{name}", help, labels=labels)
            family.add_metric([self.node], float(read()))
            yield family

    def describe(self):
        return []

    def summary(self) -> dict:
        return {
            "messages_in": self.messages_in, "messages_out": self.messages_out,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "errors": dict(self.errors),
        }
