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


def _pins():
    from dmlsys.serving.versions import VersionPins

    async def reprobe(pool, name):
        pass

    return VersionPins(None, reprobe=reprobe)


def test_a_gateway_follows_the_clusters_pins_and_ignores_an_older_document():
    pins = _pins()
    assert pins.apply({"pinned": {"m": 2}, "rolling": [], "seq": 3})
    assert pins.pinned == {"m": 2}
    assert not pins.apply({"pinned": {"m": 1}, "rolling": [], "seq": 2})  # a reply that crossed a newer push
    assert pins.pinned == {"m": 2}
    assert pins.apply({"pinned": {"m": 2}, "rolling": ["m"], "seq": 4})
    assert "m" in pins._shared_rolling  # while the cluster rolls m out, every version may serve


def test_a_rollout_run_on_one_gateway_is_reported_and_not_undone_by_the_next_sync():
    pins = _pins()
    pins.apply({"pinned": {"m": 1}, "rolling": [], "seq": 1})
    pins.begin_rollout("m")
    pins.end_rollout("m", 2)
    assert pins.changed == {"m": 2}
    pins.apply({"pinned": {"m": 1}, "rolling": [], "seq": 1})  # the cluster has not heard yet
    assert pins.pinned["m"] == 2
    pins.reported({"m": 2})
    assert pins.changed == {}


def test_the_supervisor_keeps_one_pin_per_model_for_every_gateway(tmp_path):
    from dmlsys.cluster.supervisor import Supervisor

    sup = Supervisor(spec.parse(GROUP), tmp_path)
    first = sup.sync_pins({"pinned": {"m": 3}})  # the first gateway to report a model pins it
    assert first["pinned"] == {"m": 3}
    second = sup.sync_pins({"pinned": {"m": 4}})  # another that saw v4 first follows v3
    assert second["pinned"] == {"m": 3} and second["seq"] == first["seq"]
    moved = sup.sync_pins({"pinned": {"m": 5}, "changed": {"m": 5}})  # a rollout asked of a gateway directly
    assert moved["pinned"] == {"m": 5} and moved["seq"] > first["seq"]
    sup.rolling.add("m")
    assert sup.sync_pins({"changed": {"m": 6}})["pinned"] == {"m": 5}  # not while the cluster rolls it out
