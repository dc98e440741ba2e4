"""A real node process fed garbage on its ZeroMQ port stays up, keeps answering RPCs and
/healthz, and counts the bad messages in /metrics."""

from __future__ import annotations

import asyncio
import json
import os
import random
import select
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import zmq

from dmlsys.node import Node
from dmlsys.wire.zmq_transport import ZmqTransport

SCRIPT = Path(__file__).with_name("echo_node.py")

pytestmark = pytest.mark.slow


@pytest.fixture
def node_process():
    """The node process and what it printed; killed by PID at the end, whatever happened."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--name", "b"], stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"node process did not report its address (exit code {proc.poll()})")
        info = json.loads(line)
        assert info["pid"] == proc.pid
        yield info
        assert proc.poll() is None, "the node process died"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 15)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, 9)
                proc.wait()
        proc.stdout.close()


def http_get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def bad_messages(admin: str) -> float:
    for line in http_get(admin + "/metrics")[1].splitlines():
        if line.startswith("dmlsys_errors_total{") and 'kind="bad_message"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def garbage_frames(rng: random.Random) -> list[list[bytes]]:
    msgs = [[rng.randbytes(rng.randint(0, 200)) for _ in range(rng.randint(1, 4))] for _ in range(40)]
    msgs += [
        [b""],  # an empty frame
        [b"\xc1"],  # a byte msgpack never uses
        [b"\x96\x01\x00\x01\xa3s.m\xa1a\xc0", b"unreferenced frame"],  # a valid header, a stray frame
        [b"\x96\x02\x00\x01\xa3s.m\xa1a\xc0"],  # protocol version 2
        [b"\xdd\xff\xff\xff\xff"],  # an array claiming 4 billion elements
        [b""] * 5000,  # more frames than Limits.max_frames
    ]
    return msgs


def test_garbage_on_the_zmq_port_is_counted_and_the_node_keeps_answering(node_process):
    rng = random.Random(0)
    sent = garbage_frames(rng)
    ctx = zmq.Context()
    evil = ctx.socket(zmq.DEALER)
    evil.setsockopt(zmq.LINGER, 0)
    evil.setsockopt(zmq.IDENTITY, b"evil")
    evil.connect(node_process["zmq"])
    try:
        for frames in sent:
            evil.send_multipart(frames)
        # Raw TCP bytes that are not even ZMTP: libzmq drops such connections during the handshake.
        host, port = node_process["zmq"].removeprefix("tcp://").rsplit(":", 1)
        for payload in (rng.randbytes(64), b"\xff" + b"\x00" * 8 + b"\x7f" + rng.randbytes(300), b"GET / HTTP/1.0\r\n\r\n"):
            with socket.create_connection((host, int(port)), timeout=5) as raw:
                raw.sendall(payload)
        deadline = time.monotonic() + 20
        while bad_messages(node_process["admin"]) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bad_messages(node_process["admin"]) == len(sent)
    finally:
        evil.close(0)
        ctx.term()

    assert http_get(node_process["admin"] + "/healthz") == (200, json.dumps({"name": "b", "state": "ready"}))

    async def call():
        node = Node("a", ZmqTransport("a", "tcp://127.0.0.1:0"))
        await node.start()
        try:
            node.transport.add_peer("b", node_process["zmq"])
            return await node.call("b", "echo", "echo", {"still": "here"}, timeout=10)
        finally:
            await node.stop()

    assert asyncio.run(call()) == {"still": "here"}
    assert bad_messages(node_process["admin"]) == len(sent), "the good call is not counted as bad"
