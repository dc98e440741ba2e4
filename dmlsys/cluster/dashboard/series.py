"""The dashboard's pure core: a node's samples over the last minutes, as rates and quantiles.

A node exposes running totals (requests answered, an RPC latency histogram of cumulative bucket
counts). A chart wants what happened *between* two looks: the request rate is the difference of
two totals over the time between them, and a window's p50/p99 come from the difference of two
histograms, not from the histogram since the node started (which would barely move after an
hour). ``quantile`` interpolates inside the bucket where the rank falls, as Prometheus'
``histogram_quantile`` does, so a chart agrees with what a Prometheus server would draw.

No sockets, no clock: samples carry the time they were taken (``Series.add(t, ...)``).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable

WINDOW_S = 300.0  # what a chart shows: the last five minutes
RATE_SPAN_S = 10.0  # a point's rate and quantiles cover the samples of (at least) the last 10 s


def quantile(bounds: tuple[float, ...], counts: list[float], q: float) -> float | None:
    """The ``q``-quantile of observations in buckets: ``counts[i]`` observations fell at or
    under ``bounds[i]`` and over ``bounds[i - 1]`` (not cumulative; one more count than bounds,
    the last for +Inf). None when there are no observations. A rank in the +Inf bucket answers
    the highest finite bound (the most one can say), as Prometheus does."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile: q must be within [0, 1], got {q}")
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, c in enumerate(counts):
        if c > 0 and seen + c >= rank:
            if i >= len(bounds):
                return bounds[-1]
            low = bounds[i - 1] if i > 0 else 0.0
            return low + (bounds[i] - low) * ((rank - seen) / c)
        seen += c
    return bounds[-1]


CONTROL = ("node.", "cluster.", "store.")  # the control plane's RPCs: probes, member lists, long polls


def histogram_from_text(text: str, family: str = "dmlsys_rpc_seconds",
                        skip: tuple[str, ...] = CONTROL) -> tuple[tuple[float, ...], list[float]]:
    """The bucket bounds and cumulative counts of ``family`` in Prometheus text, summed over the
    methods a node called, less the control plane's (``skip``: a member-list long poll would
    read as a slow request). ((), []) when the node exports none."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[float, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != family:
            continue
        for sample in fam.samples:
            if sample.name == family + "_bucket" and not sample.labels.get("method", "").startswith(skip):
                le = float(sample.labels["le"])
                sums[le] = sums.get(le, 0.0) + sample.value
    if not sums:
        return (), []
    les = sorted(sums)
    return tuple(le for le in les if not math.isinf(le)), [sums[le] for le in les]


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    t: float
    requests: float  # running total of requests the node answered (or messages it received)
    cumulative: tuple[float, ...]  # its RPC histogram's cumulative bucket counts ( +Inf last)
    in_flight: int


class Series:
    """One node's samples within ``window`` seconds, and the chart points they make.

    >>> s = Series(bounds=(0.1, 1.0))
    >>> s.add(0.0, requests=0, cumulative=(0, 0, 0), in_flight=0)
    >>> s.add(10.0, requests=50, cumulative=(40, 50, 50), in_flight=2)
    >>> s.points()[-1]["rate"]
    5.0
    """

    __slots__ = ("_samples", "bounds", "span", "window")

    def __init__(self, bounds: tuple[float, ...] = (), *, window: float = WINDOW_S, span: float = RATE_SPAN_S) -> None:
        self.bounds = bounds
        self.window = window
        self.span = span
        self._samples: collections.deque[Sample] = collections.deque()

    def add(self, t: float, *, requests: float, cumulative: Iterable[float] = (), in_flight: int = 0) -> None:
        cumulative = tuple(cumulative)
        if self._samples and (requests < self._samples[-1].requests or t <= self._samples[-1].t):
            self._samples.clear()  # the node restarted (its totals start over) or the clock went back
        self._samples.append(Sample(t, requests, cumulative, in_flight))
        while self._samples and self._samples[0].t < t - self.window - self.span:
            self._samples.popleft()

    def points(self) -> list[dict]:
        """One point per sample after the first: ``{t, rate, p50, p99, in_flight}``, the rate in
        requests per second and the quantiles in seconds (None without observations), each over
        the last ``span`` seconds up to that sample."""
        out = []
        samples = list(self._samples)
        start = 0
        for i in range(1, len(samples)):
            now = samples[i]
            while start < i - 1 and samples[start + 1].t <= now.t - self.span:
                start += 1
            then = samples[start]
            dt = now.t - then.t
            p50 = p99 = None
            if self.bounds and len(now.cumulative) == len(then.cumulative) == len(self.bounds) + 1:
                counts = _buckets([a - b for a, b in zip(now.cumulative, then.cumulative)])
                p50, p99 = quantile(self.bounds, counts, 0.5), quantile(self.bounds, counts, 0.99)
            out.append({"t": round(now.t, 3), "rate": round((now.requests - then.requests) / dt, 3),
                        "p50": p50, "p99": p99, "in_flight": now.in_flight})
        return out


def _buckets(cumulative: list[float]) -> list[float]:
    """Per-bucket counts from cumulative ones (never negative: a reset reads as empty)."""
    return [max(0.0, c - (cumulative[i - 1] if i else 0.0)) for i, c in enumerate(cumulative)]
