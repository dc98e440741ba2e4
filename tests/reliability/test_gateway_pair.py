"""Two gateways on one HTTP address: the spec asks a gateway group's members to share the port
(SO_REUSEPORT) once the door can, and the kernel keeps the port open while one of them is gone."""

import asyncio

from dmlsys.cluster import spec
from dmlsys.serving import roles

GROUP = {"nodes": [{"name": "gateway", "role": "gateway", "replicas": 2},
                   {"name": "replica", "role": "replica", "config": {"model": "m"}}]}


def _config(doc, monkeypatch, door_shares: bool) -> dict:
    keys = roles.GATEWAY_KEYS | {"reuse_port"} if door_shares else roles.GATEWAY_KEYS - {"reuse_port"}
    monkeypatch.setattr(roles, "GATEWAY_KEYS", keys)
    return spec.parse(doc).nodes[0].config


def test_a_gateway_group_shares_its_port_once_the_door_can(monkeypatch):
    assert _config(GROUP, monkeypatch, door_shares=True) == {"reuse_port": True}
    assert _config(GROUP, monkeypatch, door_shares=False) == {}  # an older door: the key would be refused


def test_a_single_gateway_or_an_explicit_choice_is_left_alone(monkeypatch):
    single = {"nodes": [{"name": "gateway", "role": "gateway"}]}
    assert _config(single, monkeypatch, door_shares=True) == {}
    explicit = {"nodes": [{"name": "gateway", "role": "gateway", "replicas": 2, "config": {"reuse_port": False}}]}
    assert _config(explicit, monkeypatch, door_shares=True) == {"reuse_port": False}


def test_with_reuse_port_the_port_answers_while_one_listener_is_gone():
    """The mechanism the door relies on: two listeners on one port; close one and new
    connections still land on the other."""

    async def main():
        async def answer(tag, reader, writer):
            writer.write(tag)
            await writer.drain()
            writer.close()

        first = await asyncio.start_server(lambda r, w: answer(b"a", r, w), "127.0.0.1", 0, reuse_port=True)
        port = first.sockets[0].getsockname()[1]
        second = await asyncio.start_server(lambda r, w: answer(b"b", r, w), "127.0.0.1", port, reuse_port=True)

        async def ask():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            data = await reader.read()
            writer.close()
            return data

        both = {await ask() for _ in range(40)}
        first.close()
        await first.wait_closed()
        after = {await ask() for _ in range(10)}
        second.close()
        await second.wait_closed()
        return both, after

    both, after = asyncio.run(main())
    assert both == {b"a", b"b"} and after == {b"b"}
