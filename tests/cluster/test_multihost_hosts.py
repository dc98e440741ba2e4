"""The primary's bookkeeping of the other hosts (cluster/hosts.py), with the clock passed in."""

from dmlsys.cluster.hosts import Hosts


def _report(host="beta", names=("replica-0",), **extra):
    members = [{"name": n, "role": "replica", "address": f"tcp://10.0.0.2:{7000 + i}", "host": host}
               for i, n in enumerate(names)]
    rows = [{"name": n, "role": "replica", "state": "ready", "pid": 100 + i} for i, n in enumerate(names)]
    return {"host": host, "supervisor": "tcp://10.0.0.2:7100", "members": members, "rows": rows, **extra}


def test_a_silent_host_is_lost_once_its_members_leave_and_every_node_hears_of_each():
    hosts = Hosts(["beta"])
    view, joined = hosts.report(_report(names=("replica-0", "worker-1")), now=10.0)
    assert joined and view.state == "up" and [m.name for m in hosts.members()] == ["replica-0", "worker-1"]
    assert hosts.expire(now=12.9, timeout=3.0) == []
    lost = hosts.expire(now=13.5, timeout=3.0)
    assert [v.name for v in lost] == ["beta"] and hosts.members() == []
    assert "no report from its supervisor for 3.5s" in lost[0].error
    assert [e["name"] for e in hosts.events_since(0)] == ["replica-0", "worker-1"]
    assert hosts.expire(now=20.0, timeout=3.0) == []  # lost once, told once
    rows = {r["name"]: r for r in hosts.rows({"replica-0": "beta", "worker-1": "beta"})}
    assert rows["replica-0"]["state"] == "lost" and rows["replica-0"]["pid"] is None


def test_a_lost_host_that_reports_again_rejoins_and_counts_its_joins():
    hosts = Hosts(["beta"])
    hosts.report(_report(), now=0.0)
    hosts.expire(now=5.0, timeout=3.0)
    view, joined = hosts.report(_report(), now=6.0)
    assert joined and view.state == "up" and view.joins == 2 and view.error is None


def test_members_assigned_to_a_host_that_never_joined_say_so():
    hosts = Hosts(["beta", "gamma"])
    rows = {r["name"]: r for r in hosts.rows({"replica-1": "gamma", "gateway": "alpha"})}
    assert rows == {"replica-1": rows["replica-1"]} and rows["replica-1"]["state"] == "waiting for host gamma"


def test_a_host_that_says_bye_is_stopped_not_lost_and_its_nodes_deaths_reach_the_others():
    hosts = Hosts(["beta"])
    hosts.report(_report(lost=[{"name": "replica-0", "reason": "exited with code -9"}]), now=0.0)
    assert hosts.events_since(0) == [{"name": "replica-0", "reason": "exited with code -9"}]
    view, joined = hosts.report(_report(bye=True), now=1.0)
    assert view.state == "stopped" and not joined
    assert hosts.expire(now=100.0) == [] and hosts.members() == []


def test_the_primary_says_which_host_has_not_joined_and_why_a_node_there_is_not_ready(tmp_path, capsys):
    from dmlsys.cluster.__main__ import print_table
    from dmlsys.cluster.spec import parse
    from dmlsys.cluster.supervisor import Supervisor

    spec = parse({"cluster": {"name": "t", "supervisor": "tcp://10.0.0.1:7000"},
                  "hosts": {"alpha": {"address": "10.0.0.1"}, "beta": {"address": "10.0.0.2"}},
                  "nodes": [{"name": "gateway", "role": "gateway", "host": "alpha"},
                            {"name": "replica", "role": "replica", "replicas": 1, "hosts": ["beta"],
                             "config": {"model": "m"}}]}, "two.toml")
    sup = Supervisor(spec, tmp_path, host="alpha")
    assert sup.primary and sup.served_models() == {"m"}
    sup.assignment = spec.placement()
    assert sup._hosts_not_ready() == ["host beta has not joined (run `python -m dmlsys.cluster up two.toml "
                                      "--host beta` there)"]
    row = {"name": "replica-0", "role": "replica", "state": "alive", "pid": 7, "zmq": "tcp://10.0.0.2:9",
           "why": "model: waiting for m (latest) from the cluster's store at supervisor: not in the store"}
    sup.hosts.report({"host": "beta", "members": [], "rows": [row]}, now=0.0)
    assert sup._hosts_not_ready() == ["replica-0 on beta is alive (model: waiting for m (latest) from the "
                                      "cluster's store at supervisor: not in the store)"]
    sup.hosts.expire(now=10.0)
    doc = sup.status_document()
    assert doc["hosts"]["beta"]["state"] == "lost"
    print_table(doc)
    out = capsys.readouterr().out
    assert "host beta: lost (no report from its supervisor" in out and "replica-0" in out
