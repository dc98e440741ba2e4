"""Real processes: the cluster CLI brings nodes up, restarts what dies, and leaves nothing behind."""

import os
import signal
import socket
import time


from tests.cluster.helpers import alive, wait_for

ECHO_SPEC = """
[cluster]
name = "t"
[[nodes]]
name = "solo"
role = "echo"
[[nodes]]
name = "e"
role = "echo"
replicas = 2
"""


def test_up_detach_status_down_leaves_no_process(cli):
    spec = cli.write_spec(ECHO_SPEC)
    out = cli("up", spec, "--detach").stdout
    assert "ready" in out
    status = cli.status()
    assert {n["name"] for n in status["nodes"]} == {"solo", "e-0", "e-1"}
    for node in status["nodes"]:
        assert set(node) >= {"name", "role", "pid", "zmq", "admin", "state"}
        assert node["state"] == "ready" and alive(node["pid"])
        # One host: nodes talk over Unix sockets in the state directory; admin stays on loopback.
        assert node["zmq"] == f"ipc://{cli.cwd.resolve()}/.dmlsys/sock/{node['name']}"
        assert node["admin"].startswith("http://127.0.0.1:")
    pids = cli.pids()
    cli("down")
    wait_for(lambda: not any(alive(p) for p in pids), 10, "every process to exit")
    assert cli.status()["state"] == "down"
    assert not (cli.cwd / ".dmlsys" / "sock").exists()  # no socket file left behind


def test_sigkilled_node_is_restarted_and_ready_again(cli):
    cli("up", cli.write_spec(ECHO_SPEC), "--detach")
    victim = next(n for n in cli.status()["nodes"] if n["name"] == "e-1")
    os.kill(victim["pid"], signal.SIGKILL)

    def restarted():
        node = next(n for n in cli.status()["nodes"] if n["name"] == "e-1")
        return node if node["state"] == "ready" and node["pid"] not in (None, victim["pid"]) else None

    node = wait_for(restarted, 30, "e-1 to be restarted and ready")
    assert node["restarts"] == 1
    log = (cli.cwd / ".dmlsys" / "supervisor.log").read_text()
    assert "e-1" in log and "restarting" in log


def test_scale_adds_and_removes_group_members(cli):
    cli("up", cli.write_spec(ECHO_SPEC), "--detach")
    cli("scale", "e", "3")
    names = {n["name"]: n for n in cli.status()["nodes"]}
    assert names["e-2"]["state"] == "ready"
    cli("scale", "e", "1")
    names = {n["name"] for n in cli.status()["nodes"]}
    assert names == {"solo", "e-0"}
    bad = cli("scale", "solo", "2", check=False)
    assert bad.returncode != 0 and "not a group" in bad.stderr


def test_bad_spec_names_file_and_key(cli):
    spec = cli.write_spec('[cluster]\nname = "t"\n[[nodes]]\nname = "x"\nrole = "echo"\nreplicas = "two"\n', "bad.toml")
    result = cli("up", spec, "--detach", check=False)
    assert result.returncode == 2
    assert "bad.toml" in result.stderr and "nodes.x.replicas" in result.stderr
    assert not (cli.cwd / ".dmlsys" / "state.json").exists()


def test_unknown_role_fails_up_and_leaves_nothing_running(cli):
    spec = cli.write_spec('[[nodes]]\nname = "ok"\nrole = "echo"\n[[nodes]]\nname = "x"\nrole = "wizard"\n')
    result = cli("up", spec, "--detach", check=False)
    assert result.returncode == 1
    assert "wizard" in result.stderr and "'x'" in result.stderr
    time.sleep(0.5)
    assert not any(alive(p) for p in cli.pids())


def test_port_in_use_names_node_and_port(cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spec = cli.write_spec(f'[[nodes]]\nname = "n1"\nrole = "echo"\nzmq = "tcp://127.0.0.1:{port}"\n')
        result = cli("up", spec, "--detach", check=False)
    assert result.returncode == 1
    assert "'n1'" in result.stderr and str(port) in result.stderr


def test_second_up_in_same_directory_is_refused(cli):
    spec = cli.write_spec(ECHO_SPEC)
    cli("up", spec, "--detach")
    again = cli("up", spec, "--detach", check=False)
    assert again.returncode == 1 and "already running" in again.stderr


def test_foreground_up_stops_cleanly_on_sigterm(cli):
    import subprocess
    import sys

    spec = cli.write_spec(ECHO_SPEC)
    proc = subprocess.Popen([sys.executable, "-m", "dmlsys.cluster", "up", spec], cwd=cli.cwd, env=cli.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: cli.status().get("state") == "ready", 60, "the cluster to be ready")
        pids = cli.pids()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "cluster stopped" in out
    assert not any(alive(p) for p in pids)


def test_a_node_whose_picked_port_is_taken_before_it_binds_starts_on_new_ports(tmp_path, monkeypatch):
    """Ports are picked by the supervisor and bound by the node a moment later; if something
    takes one in between, the node exits with 'cannot bind' and the supervisor starts it again
    on new ports instead of failing `up`."""
    import asyncio
    import socket

    from dmlsys.cluster import supervisor as sup_mod
    from dmlsys.cluster.spec import parse, resolve_member

    monkeypatch.chdir(tmp_path)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    calls: list[str] = []

    def first_pick_is_taken(node, name, **kw):
        member = resolve_member(node, name, **kw)
        calls.append(name)
        if len(calls) == 1:
            member = sup_mod.Member(member.name, member.role, member.address, f"127.0.0.1:{taken}", member.host,
                                    member.config)
        return member

    monkeypatch.setattr(sup_mod, "resolve_member", first_pick_is_taken)
    monkeypatch.setattr(sup_mod.Supervisor, "_check_ports", lambda self: None)  # the race comes after it
    spec = parse({"cluster": {"name": "rebind"}, "nodes": [{"name": "solo", "role": "echo"}]}, "spec.toml")

    async def main():
        sup = sup_mod.Supervisor(spec, tmp_path / ".dmlsys")
        try:
            await sup.up()
            proc = sup.procs["solo"]
            return proc.state, proc.rebinds, proc.member.admin
        finally:
            await sup.down()

    try:
        state, rebinds, admin = asyncio.run(main())
    finally:
        blocker.close()
    assert state == "ready" and rebinds == 1 and admin != f"127.0.0.1:{taken}"
    assert calls == ["solo", "solo"]
