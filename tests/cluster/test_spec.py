"""Cluster specs, in process: every bad spec names the file, the key and what was expected;
good specs resolve to the members ``up`` will start; free ports avoid the ephemeral range."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.cluster.spec import SpecError, _ephemeral_low, free_port, load, parse, resolve_member

GOOD = {"cluster": {"name": "t"}, "nodes": [{"name": "gw", "role": "gateway"}]}


def spec(**changes):
    data = {"cluster": dict(GOOD["cluster"]), "nodes": [dict(n) for n in GOOD["nodes"]]}
    for key, value in changes.items():
        if key.startswith("node_"):
            data["nodes"][0][key[5:]] = value
        elif key.startswith("cluster_"):
            data["cluster"][key[8:]] = value
        else:
            data[key] = value
    return data


@pytest.mark.parametrize("data, key, words", [
    (spec(extra={}), "extra", "unknown top-level table"),
    (spec(cluster_nmae="x"), "cluster.nmae", "unknown key"),
    (spec(cluster_name=3), "cluster.name", "string"),
    (spec(cluster_http="localhost"), "cluster.http", "HOST:PORT"),
    (spec(nodes=[]), "nodes", "at least one"),
    (spec(node_name="9lives"), "nodes[0].name", "not a valid node name"),
    (spec(node_role=None), "nodes.gw.role", "string"),
    (spec(node_host="mars"), "nodes.gw.host", "unknown host 'mars'"),
    (spec(node_replicas=-1), "nodes.gw.replicas", "from 0 to 64"),
    (spec(node_replicas=True), "nodes.gw.replicas", "from 0 to 64"),
    (spec(node_zmq="http://x:1"), "nodes.gw.zmq", "tcp://"),
    (spec(node_config=[1]), "nodes.gw.config", "table"),
    (spec(node_colour="red"), "nodes[0].colour", "unknown key"),
    (spec(nodes=[{"name": "a", "role": "echo"}, {"name": "a", "role": "echo"}]), "nodes.a.name", "duplicate"),
    (spec(nodes=[{"name": "a", "role": "echo", "replicas": 2}, {"name": "a-1", "role": "echo"}]),
     "nodes.a-1.name", "duplicate node name 'a-1'"),
    (spec(hosts={"h1": {"address": "10.0.0.1"}}, nodes=[{"name": "a", "role": "echo", "host": "h1"}]),
     "cluster.supervisor", "explicit tcp://ADDRESS:PORT"),
    (spec(hosts={"h1": {"address": "10.0.0.1"}}, cluster_supervisor="tcp://10.0.0.9:7000",
          nodes=[{"name": "a", "role": "echo", "host": "h1"}]), "cluster.supervisor", "the address of one of the hosts"),
    (spec(hosts={"h1": {"address": "10.0.0.1", "capacity": 1}, "h2": {"address": "10.0.0.2", "capacity": 1}},
          cluster_supervisor="tcp://10.0.0.1:7000",
          nodes=[{"name": "a", "role": "echo", "replicas": 3, "hosts": ["h1", "h2"]}]), "hosts", "no room"),
    (spec(node_hosts=["local"]), "nodes.gw.hosts", "a group's key"),
    (spec(node_replicas=2, node_hosts=["mars"]), "nodes.gw.hosts", "unknown host 'mars'"),
    (spec(node_replicas=2, node_placement="random"), "nodes.gw.placement", '"spread" or "pack"'),
    (spec(hosts={"h1": {"address": "10.0.0.1"}, "h2": {"address": "10.0.0.2"}}, cluster_supervisor="tcp://10.0.0.1:7000",
          nodes=[{"name": "a", "role": "echo", "replicas": 2, "hosts": ["h1", "h2"], "zmq": "tcp://10.0.0.1:7001"}]),
     "nodes.a.zmq", "left out for a group placed on several hosts"),
])
def test_a_bad_spec_names_the_file_the_key_and_what_was_expected(data, key, words):
    with pytest.raises(SpecError) as info:
        parse(data, "my.toml")
    e = info.value
    assert (e.path, e.key) == ("my.toml", key), str(e)
    assert words in e.expected, str(e)
    assert str(e).startswith(f"my.toml: {key}: ")


def test_unreadable_and_malformed_files_are_named(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster\nname = 1")
    with pytest.raises(SpecError, match=r"bad\.toml: \(syntax\): not valid TOML"):
        load(bad)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["cluster", "hosts", "nodes", "other"]),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                                    max_leaves=8)))
def test_any_document_parses_or_raises_spec_error(data):
    try:
        parse(data, "x.toml")
    except SpecError as e:
        assert str(e).startswith("x.toml: ")


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True), st.integers(1, 4)),
                min_size=1, max_size=4, unique_by=lambda t: t[0]))
def test_groups_expand_to_numbered_members_with_distinct_picked_ports(groups):
    data = {"nodes": [{"name": n, "role": "echo", "replicas": k} for n, k in groups]}
    parsed = parse(data)
    members = [resolve_member(node, name) for node in parsed.nodes for name in node.member_names()]
    assert [m.name for m in members] == [f"{n}-{i}" for n, k in groups for i in range(k)]
    ports = [m.address.rsplit(":", 1)[1] for m in members]
    assert "0" not in ports and all(m.admin.startswith("127.0.0.1:") for m in members)


def test_free_ports_are_bindable_and_below_the_ephemeral_range():
    low = _ephemeral_low()
    for _ in range(20):
        port = free_port()
        assert 1024 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_single_host_nodes_without_zmq_get_unix_sockets_and_explicit_addresses_are_kept(tmp_path):
    parsed = parse({"nodes": [{"name": "a", "role": "echo"}, {"name": "b", "role": "echo", "zmq": "tcp://127.0.0.1:0"},
                              {"name": "g", "role": "echo", "replicas": 2}]})
    assert not parsed.multi_host
    a, b, g = parsed.nodes
    assert resolve_member(a, "a", ipc_dir=tmp_path).address == f"ipc://{tmp_path.resolve()}/a"
    assert resolve_member(g, "g-1", ipc_dir=tmp_path).address == f"ipc://{tmp_path.resolve()}/g-1"
    assert resolve_member(b, "b", ipc_dir=tmp_path).address.startswith("tcp://127.0.0.1:")  # said so: kept
    assert resolve_member(a, "a").address.startswith("tcp://127.0.0.1:")  # no ipc dir: a free port
    deep = tmp_path / ("d" * 120)  # past AF_UNIX's 107 bytes: a TCP port instead
    assert resolve_member(a, "a", ipc_dir=deep).address.startswith("tcp://127.0.0.1:")


def test_multi_host_specs_are_recognised():
    parsed = parse({"hosts": {"h1": {"address": "10.0.0.1"}},
                    "cluster": {"supervisor": "tcp://127.0.0.1:5000"},
                    "nodes": [{"name": "a", "role": "echo", "host": "h1", "zmq": "tcp://10.0.0.1:5001"}]})
    assert parsed.multi_host


def test_a_group_spans_hosts_and_every_host_computes_the_same_placement():
    data = {"cluster": {"name": "t", "supervisor": "tcp://10.0.0.1:7000"},
            "hosts": {"alpha": {"address": "10.0.0.1", "capacity": 2}, "beta": {"address": "10.0.0.2"}},
            "nodes": [{"name": "gateway", "role": "gateway", "host": "alpha"},
                      {"name": "replica", "role": "replica", "replicas": 3, "hosts": ["alpha", "beta"]}]}
    s = parse(data)
    assert s.primary == "alpha" and s.multi_host
    assert s.placement() == {"gateway": "alpha", "replica-0": "alpha", "replica-1": "beta", "replica-2": "beta"}
    member = resolve_member(s.node_spec("replica"), "replica-1", host="beta", host_address="127.0.0.1")  # picked there
    assert member.host == "beta" and member.address.startswith("tcp://127.0.0.1:")
