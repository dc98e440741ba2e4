"""The dashboard's pure core: rates and quantiles from running totals (dmlsys/cluster/dashboard/series.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dmlsys.cluster.dashboard.series import Series, histogram_from_text, quantile
from dmlsys.node.metrics import RPC_BUCKETS, LatencyHistogram, NodeMetrics

counts = st.lists(st.integers(0, 1000), min_size=len(RPC_BUCKETS) + 1, max_size=len(RPC_BUCKETS) + 1)


@given(counts, st.floats(0, 1), st.floats(0, 1))
def test_a_quantile_lies_within_the_bounds_and_grows_with_q(c, q1, q2):
    lo, hi = sorted((q1, q2))
    a, b = quantile(RPC_BUCKETS, c, lo), quantile(RPC_BUCKETS, c, hi)
    if sum(c) == 0:
        assert a is None and b is None
    else:
        assert 0 <= a <= b <= RPC_BUCKETS[-1]


@given(st.integers(0, len(RPC_BUCKETS) - 1), st.integers(1, 500), st.floats(0.01, 1))
def test_observations_in_one_bucket_give_a_quantile_inside_that_bucket(i, n, q):
    c = [0] * (len(RPC_BUCKETS) + 1)
    c[i] = n
    low = RPC_BUCKETS[i - 1] if i else 0.0
    assert low <= quantile(RPC_BUCKETS, c, q) <= RPC_BUCKETS[i]


def test_quantiles_agree_with_what_was_observed():
    h = LatencyHistogram()
    for ms in range(1, 101):  # 1 .. 100 ms, uniformly
        h.observe("model.predict", ms / 1000)
    bounds, cumulative = histogram_from_text(_text(h))
    per_bucket = [c - (cumulative[i - 1] if i else 0) for i, c in enumerate(cumulative)]
    assert 0.025 <= quantile(bounds, per_bucket, 0.5) <= 0.05
    assert 0.05 <= quantile(bounds, per_bucket, 0.99) <= 0.1


def test_the_control_planes_rpcs_are_left_out_of_a_nodes_latency():
    m = NodeMetrics("gateway")
    m.rpc_seconds.observe("cluster.members", 2.0)  # a long poll, not a slow request
    m.rpc_seconds.observe("node.ping", 1.0)
    m.rpc_seconds.observe("model.predict", 0.002)
    from prometheus_client import generate_latest

    _, cumulative = histogram_from_text(generate_latest(m.registry).decode())
    assert cumulative[-1] == 1
    assert histogram_from_text("") == ((), [])


@given(st.floats(0.5, 500), st.integers(3, 60))
def test_a_steady_rate_reads_as_that_rate(rate, n):
    s = Series(RPC_BUCKETS, span=10.0)
    for i in range(n):
        s.add(float(i), requests=rate * i, in_flight=i % 3)
    points = s.points()
    assert len(points) == n - 1
    assert all(abs(p["rate"] - rate) <= 0.001 * rate + 0.001 for p in points)
    assert points[-1]["in_flight"] == (n - 1) % 3


def test_a_restarted_node_starts_its_series_over_rather_than_read_a_negative_rate():
    s = Series()
    for i in range(5):
        s.add(float(i), requests=100.0 * i)
    s.add(5.0, requests=3.0)  # the process restarted: its totals began again
    s.add(6.0, requests=13.0)
    assert [p["rate"] for p in s.points()] == [10.0]


def test_samples_older_than_the_window_are_dropped():
    s = Series(window=60.0, span=10.0)
    for i in range(200):
        s.add(float(i), requests=float(i))
    assert len(s.points()) <= 71
    assert s.points()[0]["t"] >= 199 - 71


def _text(h: LatencyHistogram) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    class One:
        def collect(self):
            yield h.family("dmlsys_rpc_seconds", "x", "n")

    registry = CollectorRegistry()
    registry.register(One())
    return generate_latest(registry).decode()
