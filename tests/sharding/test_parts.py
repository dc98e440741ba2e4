"""The router's result cache, the snapshot store, the role factories' config checks."""

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.assembly.roles import RoleContext
from dmlsys.node import ConfigError
from dmlsys.sharding.cache import ResultCache
from dmlsys.sharding.errors import ShardingError
from dmlsys.sharding.roles import build_router, build_shard
from dmlsys.sharding.shard import SNAPSHOT, SnapshotStore


def test_cache_entries_expire_after_their_ttl():
    c = ResultCache(10, ttl=5.0)
    c.put("a", 1, now=0.0)
    assert c.get("a", now=4.9) == 1
    assert c.get("a", now=5.0) is None and len(c) == 0


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 8), st.lists(st.tuples(st.integers(0, 20), st.floats(0, 3)), max_size=60))
def test_cache_never_holds_more_than_its_bound_and_keeps_the_newest(bound, puts):
    c, now = ResultCache(bound, ttl=1000.0), 0.0
    for key, dt in puts:
        now += dt
        c.put(key, key * 2, now)
        assert len(c) <= bound
    if bound and puts:
        last = puts[-1][0]
        assert c.get(last, now) == last * 2


def test_snapshots_survive_a_new_store_and_a_torn_temporary_file(tmp_path):
    store = SnapshotStore(tmp_path)
    store.save({"a": 1.5, "b": [1, 2]})
    (tmp_path / f".{SNAPSHOT}.999.tmp").write_bytes(b"\x00half-written")  # a crash mid-save
    assert SnapshotStore(tmp_path).load() == ({"a": 1.5, "b": [1, 2]}, {})


def test_an_unreadable_snapshot_names_the_file(tmp_path):
    (tmp_path / SNAPSHOT).write_bytes(b"\xc1 not msgpack")
    with pytest.raises(ShardingError, match=str(tmp_path / SNAPSHOT)):
        SnapshotStore(tmp_path).load()


def ctx(role: str, config: dict, tmp: Path) -> RoleContext:
    return RoleContext(name=f"{role}-0", role=role, config=config, store=tmp / "store", state_dir=tmp)


def test_role_factories_build_their_services(tmp_path):
    [router] = build_router(ctx("router", {"app": "dmlsys.sharding.app:counter", "part_timeout": 1}, tmp_path))
    [shard] = build_shard(ctx("shard", {"app": "dmlsys.sharding.app:counter"}, tmp_path))
    assert router.name == "router" and router.app.name == "counter" and router.config.part_timeout == 1.0
    assert shard.name == "shard" and shard.store.path == tmp_path / "sharding" / "shard-0" / SNAPSHOT
    assert router.config.http is None  # no door unless asked for


def test_the_routers_door_binds_loopback_given_a_port_alone_and_the_app_gets_its_options(tmp_path):
    canvas = {"app": "dmlsys.sharding.canvas:canvas", "app_options": {"model": str(tmp_path / "t.npz")}}
    for given, bound in ((8100, "127.0.0.1:8100"), (":0", "127.0.0.1:0"), ("0.0.0.0:9", "0.0.0.0:9")):
        [router] = build_router(ctx("router", {**canvas, "http": given}, tmp_path))
        assert router.config.http == bound and router.app.http.verb == "tag"
    assert not (tmp_path / "t.npz").exists()  # the router never loads (or fits) the classifier


@pytest.mark.parametrize("config, key", [
    ({"app": "nowhere:app"}, "app"), ({"app": "dmlsys.sharding.app"}, "app"), ({"part_timeout": 0}, "part_timeout"),
    ({"cache_entries": -1}, "cache_entries"), ({"colour": "red"}, "colour"), ({"http": "nowhere"}, "http"),
    ({"app_options": {"model": "x"}}, "app_options"), ({"app_options": "model=x"}, "app_options"),
    ({"max_body_bytes": 0}, "max_body_bytes"),
])
def test_bad_router_config_names_the_key(tmp_path, config, key):
    with pytest.raises(ConfigError) as err:
        build_router(ctx("router", config, tmp_path))
    assert err.value.key == key


def test_bad_shard_config_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="fsync"):
        build_shard(ctx("shard", {"fsync": "yes"}, tmp_path))
