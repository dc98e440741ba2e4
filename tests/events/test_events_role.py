"""The events role's shell: deploy at run time, invoke through the pool, metrics per function
(simulated network, virtual time); its config errors; the cluster CLI's API keys; the hotel data."""

from __future__ import annotations

import asyncio
import os
import stat

import numpy as np
import pytest

from dmlsys.events import hotel
from dmlsys.events.roles import build_events
from dmlsys.events.service import EventsConfig, EventsService
from dmlsys.node import ConfigError, Node, RemoteError, Service, rpc
from dmlsys.wire import sim
from dmlsys.wire.sim import SimNetwork


class Echo(Service):
    name = "function"

    @rpc
    async def invoke(self, body):
        await asyncio.sleep(0.01)
        return {"predictions": [len(body["instances"])], "by": self.node.name}


class SimLauncher:
    def __init__(self, net):
        self.net, self.nodes, self.started = net, {}, []

    async def start(self, function, instance):
        await asyncio.sleep(0.3)  # a spare told its model
        node = Node(instance, self.net.transport(instance))
        node.add_service(Echo())
        await node.start()
        self.nodes[instance] = node
        self.started.append(function)
        return instance

    async def stop(self, instance):
        node = self.nodes.pop(instance, None)
        if node is not None:
            await node.stop(0)


def test_deploy_at_run_time_then_events_scale_from_zero_and_metrics_show_slots_per_function():
    async def main():
        net = SimNetwork(1)
        launcher = SimLauncher(net)
        events = Node("events", net.transport("events"))
        events.add_service(EventsService(EventsConfig(http=None, slots=2, tick=0.5), launcher=launcher))
        cli = Node("cli-1", net.transport("cli-1"))
        other = Node("gateway", net.transport("gateway"))
        for n in (events, cli, other):
            await n.start()
        with pytest.raises(RemoteError, match="not allowed|may not"):  # deploy is the administrators'
            await other.call("events", "events", "deploy", {"model": "m"}, timeout=5)
        out = await cli.call("events", "events", "deploy", {"model": "fashion-mlp", "name": "fashion", "max": 2},
                             timeout=5)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        answers = await asyncio.gather(*(other.call("events", "events", "invoke",
                                                    {"function": "fashion", "body": {"instances": [[0.0]] * k}},
                                                    timeout=10) for k in range(1, 6)))
        first = loop.time() - t0
        stats = await cli.call("events", "events", "status", None, timeout=5)
        from prometheus_client import generate_latest

        metrics = generate_latest(events.metrics.registry).decode()
        with pytest.raises(RemoteError, match="not deployed"):
            await other.call("events", "events", "invoke", {"function": "nope", "body": {}}, timeout=5)
        for n in (other, cli, events):
            await n.stop(0)
        return out, answers, first, stats, metrics

    out, answers, first, stats, metrics = sim.run(main())
    assert out["name"] == "fashion" and out["min"] == 0 and out["max"] == 2
    assert [a["predictions"] for a in answers] == [[k] for k in range(1, 6)]
    assert first < 1.0  # waited for the start (0.3 s), not dropped
    assert stats["pool"]["slots_used"] >= 1 and stats["pool"]["instances"]["fashion"]["ready"] >= 1
    assert 'dmlsys_events_instances{function="fashion",node="events",state="ready"}' in metrics
    assert "dmlsys_events_slots_used" in metrics and "dmlsys_events_cold_start_seconds" in metrics


class Ctx:
    def __init__(self, config, tmp):
        self.config, self.state_dir, self.store, self.name, self.role = config, tmp, tmp / "models", "events", "events"


@pytest.mark.parametrize("config, key", [
    ({"slots": -1}, "slots"),
    ({"http": "nope"}, "http"),
    ({"functions": [{"max": 2}]}, "functions[0].model"),
    ({"functions": [{"model": "m", "min": 3, "max": 2}]}, "functions[0].max"),
    ({"tiers": {"anonymous": {"rates": ["often"]}}}, "tiers"),
    ({"panic_window": 90.0}, "panic_window"),
    ({"colour": "blue"}, "colour"),
])
def test_a_bad_events_config_names_the_key(tmp_path, config, key):
    with pytest.raises(ConfigError) as e:
        build_events(Ctx(config, tmp_path))
    assert e.value.key == key


def test_keys_add_ls_revoke_through_the_cluster_cli(tmp_path, capsys):
    from dmlsys.cluster.__main__ import main
    from dmlsys.events.keys import KeyFile
    from dmlsys.events.service import keys_path

    def cli(*argv):
        with pytest.raises(SystemExit) as e:
            main(["--state-dir", str(tmp_path), "keys", *argv])
        return e.value.code, capsys.readouterr()

    code, out = cli("add", "alice", "--tier", "authenticated")
    key = out.out.strip()
    assert code == 0 and key.startswith("dmk_")
    path = keys_path(tmp_path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and key not in path.read_text()  # hashed, private
    assert KeyFile(path).current().authenticate(key).name == "alice"
    code, out = cli("ls")
    assert code == 0 and "alice\tauthenticated" in out.out and "active" in out.out
    code, out = cli("revoke", "alice")
    assert code == 0 and "revoked 'alice'" in out.out
    assert "revoked" in cli("ls")[1].out
    assert cli("revoke", "bob")[0] != 0  # names the missing key, exits non-zero


def test_hotel_prices_follow_the_week_the_season_and_the_holidays():
    def p(day, ahead=30, nights=1, room=0):
        return float(hotel.price(np.array([[day, ahead, nights, room]], float), seed=None)[0])

    assert p(4) > p(2) and p(6) < p(2)  # Friday dearer than Wednesday, Sunday cheaper (day 0 a Monday)
    assert p(196) > p(14)  # mid-July above mid-January
    assert p(hotel.CHRISTMAS) > 1.5 * p(hotel.CHRISTMAS - 42)  # same weekday, six weeks before
    assert p(hotel.THANKSGIVING) > 1.3 * p(hotel.THANKSGIVING - 14)
    assert p(100, ahead=1) > p(100, ahead=90)  # last minute costs more
    assert p(100, room=2) > p(100, room=1) > p(100, room=0)
    x = hotel.features(hotel.bookings(50, seed=3))
    assert x.shape == (50, hotel.N_FEATURES) == (50, len(hotel.FEATURES)) and x.dtype == np.float32
    assert np.all(np.abs(x) <= 2.0)  # scaled inputs
