"""Role factories validate [nodes.config] at the edge and name the key that is wrong."""

from pathlib import Path

import pytest

from dmlsys.assembly import RoleContext
from dmlsys.node import ConfigError
from dmlsys.serving.gateway import GatewayService
from dmlsys.serving.replica import ModelService
from dmlsys.serving.roles import build_gateway, build_replica


def ctx(config, http="127.0.0.1:8000"):
    return RoleContext("n", "r", config, Path("/tmp/store"), Path("/tmp"), http)


def test_replica_and_gateway_build_from_valid_config():
    [replica] = build_replica(ctx({"model": "fashion-mlp", "version": 2}))
    assert isinstance(replica, ModelService) and replica.config.version == 2
    [gateway] = build_gateway(ctx({"policy": "round-robin", "probe_period": 0.25, "models": ["a"]}, http="0.0.0.0:9"))
    assert isinstance(gateway, GatewayService)
    assert gateway.config.http == "0.0.0.0:9" and gateway.config.balancer.policy == "round-robin"
    [gateway] = build_gateway(ctx({"max_connections": 8, "read_timeout": 2.5, "idle_timeout": 30}))
    assert (gateway.config.max_connections, gateway.config.read_timeout, gateway.config.idle_timeout) == (8, 2.5, 30)
    assert gateway.config.balancer.turn_affinity == 16
    [gateway] = build_gateway(ctx({"turn_affinity": 1}))
    assert gateway.config.balancer.turn_affinity == 1  # off: every predict picked by the policy
    [replica] = build_replica(ctx({"model": "m", "max_queue": 16}))
    assert replica.config.max_queue == 16 and replica.config.http is None  # no HTTP of its own by default
    [replica] = build_replica(ctx({"model": "m", "http": "127.0.0.1:0"}))
    assert replica.config.http == "127.0.0.1:0"


@pytest.mark.parametrize("build, config, key", [
    (build_replica, {}, "model"),
    (build_replica, {"model": "m", "version": 0}, "version"),
    (build_replica, {"model": "m", "colour": "red"}, "colour"),
    (build_gateway, {"policy": "random"}, "policy"),
    (build_gateway, {"probe_period": -1}, "probe_period"),
    (build_gateway, {"http": "nope"}, "http"),
    (build_gateway, {"models": "m"}, "models"),
    (build_gateway, {"base_ejection": 10, "max_ejection": 5}, "max_ejection"),
    (build_replica, {"model": "m", "max_queue": 0}, "max_queue"),
    (build_replica, {"model": "m", "http": "nope"}, "http"),
    (build_replica, {"model": "m", "http": 8000}, "http"),
    (build_gateway, {"max_body_bytes": 2 << 30}, "max_body_bytes"),
    (build_gateway, {"max_connections": 0}, "max_connections"),
    (build_gateway, {"read_timeout": 0}, "read_timeout"),
    (build_gateway, {"idle_timeout": "long"}, "idle_timeout"),
    (build_gateway, {"turn_affinity": 0}, "turn_affinity"),
])
def test_bad_config_names_the_key(build, config, key):
    with pytest.raises(ConfigError) as info:
        build(ctx(config))
    assert info.value.key == key


def test_gateway_http_off_builds_a_door_less_gateway_and_buckets_are_checked():
    [gateway] = build_gateway(ctx({"http": "off"}))
    assert gateway.config.http is None
    [replica] = build_replica(ctx({"model": "m", "buckets": [64, 8, 8]}))
    assert replica.config.buckets == (8, 64)
    with pytest.raises(ConfigError) as e:
        build_replica(ctx({"model": "m", "buckets": [0]}))
    assert e.value.key == "buckets"
