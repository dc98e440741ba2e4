"""After a real ``up``: the key, the sockets and the state are the cluster user's alone, every
node authenticates (the CLI too), and the key can be exported for a second host."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from dmlsys.cluster import keys
from dmlsys.node import Node, PeerUnreachable, RpcTimeout
from dmlsys.wire.zmq_transport import ZmqTransport
from tests.cluster.helpers import Cli, alive, wait_for

SPEC = """
[cluster]
name = "sec"
[[nodes]]
name = "solo"
role = "echo"
[[nodes]]
name = "tcp-node"
role = "echo"
zmq = "tcp://127.0.0.1:0"
"""


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def cli(tmp_path):
    c = Cli(tmp_path)
    yield c
    pids = c.pids()
    c("down", check=False)
    for pid in pids:
        if alive(pid):
            os.kill(pid, 9)


def test_up_makes_a_private_key_and_private_state_and_nodes_admit_only_key_holders(cli):
    cli("up", cli.write_spec(SPEC), "--detach")
    state = cli.cwd / ".dmlsys"
    key = keys.load(state)
    assert key is not None
    assert mode(state) == 0o700 and mode(state / "keys") == 0o700 and mode(keys.key_path(state)) == 0o600
    assert mode(state / "sock") == 0o700 and mode(state / "logs") == 0o700
    for f in ("state.json", "resolved.json", "supervisor.log", "logs/solo.log"):
        assert mode(state / f) == 0o600, f
    for sock in (state / "sock").iterdir():
        assert stat.S_ISSOCK(os.stat(sock).st_mode) and mode(sock) & 0o077 == 0, sock
    nodes = {n["name"]: n for n in cli.status()["nodes"]}  # the CLI itself got in with the key
    assert all(n["state"] == "ready" for n in nodes.values())
    address = nodes["tcp-node"]["zmq"]

    async def call(with_key):
        node = Node("cli-test", ZmqTransport("cli-test", "tcp://127.0.0.1:0", keys=with_key))
        await node.start()
        try:
            node.transport.add_peer("tcp-node", address)
            return await node.call("tcp-node", "echo", "echo", "hello", timeout=1.0)
        finally:
            await node.stop(drain_timeout=0)

    assert asyncio.run(call(key)) == "hello"
    with pytest.raises((RpcTimeout, PeerUnreachable)):
        asyncio.run(call(None))
    log = wait_for(lambda: "refused a connection" in (state / "logs" / "tcp-node.log").read_text()
                   and (state / "logs" / "tcp-node.log").read_text(), 5, "the refusal in the node's log")
    assert "a failed handshake" in log

    # For a second host (import is tested in test_keys.py, and across namespaces in tests/cluster/test_netns.py).
    exported = cli.cwd / "key.txt"
    assert key.fingerprint in cli("keys", "export", str(exported)).stdout
    assert mode(exported) == 0o600 and keys.read(exported) == key
