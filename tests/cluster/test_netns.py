"""Two hosts on one machine: Linux network namespaces joined by a veth pair, one `up --host` each,
and an RPC that crosses from one namespace to the other."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.cluster.helpers import ROOT, alive, wait_for

SUBNET = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    tag = f"dml{os.getpid()}"
    a, b = f"{tag}a", f"{tag}b"
    made = _ip("netns", "add", a)
    if made.returncode != 0:
        pytest.skip(f"cannot create network namespaces here (needs root/CAP_SYS_ADMIN): {made.stderr.strip()}")
    try:
        _ip("netns", "add", b)
        _ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        for ns, dev, addr in ((a, f"{tag}va", f"{SUBNET}.1"), (b, f"{tag}vb", f"{SUBNET}.2")):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        link = _ip("-n", a, "addr", "show", f"{tag}va")
        if f"{SUBNET}.1" not in link.stdout:
            pytest.skip(f"could not configure a veth pair between namespaces: {link.stderr.strip()}")
        yield a, b
    finally:
        for ns in (a, b):
            for pid in _ip("netns", "pids", ns).stdout.split():
                if alive(int(pid)):
                    os.kill(int(pid), 9)
            _ip("netns", "del", ns)


def test_rpc_crosses_between_two_hosts(two_hosts, tmp_path):
    ns_a, ns_b = two_hosts
    spec = tmp_path / "two.toml"
    spec.write_text(textwrap.dedent(f"""
        [cluster]
        name = "two-hosts"
        supervisor = "tcp://{SUBNET}.1:7100"
        [hosts.alpha]
        address = "{SUBNET}.1"
        [hosts.beta]
        address = "{SUBNET}.2"
        [[nodes]]
        name = "left"
        role = "echo"
        host = "alpha"
        zmq = "tcp://{SUBNET}.1:7101"
        [[nodes]]
        name = "right"
        role = "echo"
        host = "beta"
        zmq = "tcp://{SUBNET}.2:7102"
    """))
    hosts = {"alpha": (ns_a, tmp_path / "alpha"), "beta": (ns_b, tmp_path / "beta")}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cluster(host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        ns, state = hosts[host]
        result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "dmlsys.cluster",
                                 "--state-dir", str(state), *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert not check or result.returncode == 0, result.stderr
        return result

    try:
        cluster("alpha", "up", str(spec), "--host", "alpha", "--detach")
        # The second host joins with the first one's cluster key (docs/security.md).
        cluster("alpha", "keys", "export", str(tmp_path / "key.txt"))
        cluster("beta", "keys", "import", str(tmp_path / "key.txt"))
        cluster("beta", "up", str(spec), "--host", "beta", "--detach")

        def probe(state_dir: str | None) -> subprocess.CompletedProcess:
            client = textwrap.dedent(f"""
                import asyncio
                from pathlib import Path
                from dmlsys.cluster.keys import load
                from dmlsys.node import Node
                from dmlsys.wire.zmq_transport import ZmqTransport
                async def main():
                    keys = load(Path({state_dir!r})) if {state_dir!r} else None
                    node = Node("cli-probe", ZmqTransport("cli-probe", "tcp://{SUBNET}.1:0", keys=keys))
                    await node.start()
                    node.transport.add_peer("right", "tcp://{SUBNET}.2:7102")
                    try:
                        print(await node.call("right", "echo", "echo", "across", timeout=3))
                    finally:
                        await node.stop(drain_timeout=0)
                asyncio.run(main())
            """)
            return subprocess.run(["ip", "netns", "exec", ns_a, sys.executable, "-c", client], env=env,
                                  capture_output=True, text=True, timeout=60)

        out = probe(str(hosts["alpha"][1]))
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "across"
        # Without the key, across the network too: no answer, and the refusal is in beta's node log.
        out = probe(None)
        assert out.returncode != 0 and "across" not in out.stdout
        assert "refused a connection" in (hosts["beta"][1] / "logs" / "right.log").read_text()
        # A node on beta reaches alpha's node through its own directory, too.
        left = wait_for(lambda: "left" in cluster("beta", "status", "--json").stdout, 10, "beta's status")
        assert left
    finally:
        cluster("beta", "down", check=False)
        cluster("alpha", "down", check=False)
