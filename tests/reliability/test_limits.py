"""The limits table: every layer's limits are in it, the defaults agree across layers, and each
agreement catches the disagreement it is about."""

import dataclasses
from pathlib import Path

from dmlsys.cluster import limits, spec
from dmlsys.node.limits import NodeLimits
from dmlsys.serving.balancer import BalancerConfig
from dmlsys.serving.gateway import GatewayConfig
from dmlsys.serving.http import HttpLimits
from dmlsys.serving.replica import ReplicaConfig
from dmlsys.wire.codec import Limits

ROOT = Path(__file__).resolve().parents[2]
REPLICA = ReplicaConfig(model="m", store="-")


def _failing(**kw) -> set[str]:
    return {a.name for a in limits.check(**kw) if not a.holds}


def test_the_defaults_agree_across_layers():
    assert _failing() == set()


def test_every_limit_field_of_every_layer_has_a_row():
    where = " ".join(row.where for row in limits.TABLE)
    fields = [f"Limits.{f.name}" for f in dataclasses.fields(Limits)]
    fields += [f"NodeLimits.{f.name}" for f in dataclasses.fields(NodeLimits)]
    fields += [f"HttpLimits.{f.name}" for f in dataclasses.fields(HttpLimits) if f.name not in
               ("max_body_bytes", "read_timeout")]  # the door's own config sets these two: GatewayConfig rows
    fields += [f"GatewayConfig.{n}" for n in ("max_body_bytes", "read_timeout", "deadline", "max_instances")]
    fields += [f"BalancerConfig.{n}" for n in ("max_in_flight", "max_queue", "try_timeout", "probe_timeout")]
    fields += [f"ReplicaConfig.{n}" for n in ("max_batch", "max_instances", "max_queue")]
    assert [f for f in fields if f not in where] == []


def test_a_door_that_promises_more_instances_than_the_replica_takes_is_caught():
    assert _failing(gateway=GatewayConfig(max_instances=128), replica=REPLICA) == {"door instances <= replica instances"}


def test_too_many_gateways_for_a_replica_node_is_caught():
    assert "gateways' in-flight <= node's" in _failing(gateways=17)
    assert "gateways' in-flight <= replica queue" in _failing(replica=dataclasses.replace(REPLICA, max_queue=100),
                                                             gateways=2)
    assert _failing(gateways=16) == set()


def test_a_body_larger_than_a_receivers_frame_is_caught():
    assert _failing(wire=Limits(max_frame_bytes=1 << 20)) == {"body fits a frame"}


def test_a_try_longer_than_the_deadline_is_caught():
    gateway = GatewayConfig(deadline=1.0, balancer=BalancerConfig(try_timeout=2.0))
    assert _failing(gateway=gateway) == {"try within deadline"}


def test_a_spec_is_checked_with_its_gateways_and_replicas():
    assert not [a for a in limits.check_spec(spec.load(ROOT / "cluster" / "local.toml")) if not a.holds]
    doc = {"nodes": [{"name": "gateway", "role": "gateway", "replicas": 2, "config": {"max_in_flight": 600}},
                     {"name": "replica", "role": "replica", "config": {"model": "m", "max_instances": 8}}]}
    failing = {a.name for a in limits.check_spec(spec.parse(doc)) if not a.holds}
    assert failing == {"door instances <= replica instances", "gateways' in-flight <= node's",
                       "gateways' in-flight <= replica queue"}


def test_the_reliability_doc_lists_every_row():
    doc = (ROOT / "docs" / "reliability.md").read_text()
    missing = [row.name for row in limits.TABLE if f"| {row.name} |" not in doc]
    assert missing == []
