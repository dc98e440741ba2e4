"""A model saved on a secondary host reaches the cluster's store: the primary pulls it from that
host's ``hoststore`` service (real nodes on loopback; the two-host test runs it in namespaces)."""

import asyncio
import json
import types

import pytest

from dmlsys.assembly import ZmqTransports, build_node
from dmlsys.cluster.hosts import pull_model
from dmlsys.node import Member
from dmlsys.train.store import ModelStore
from dmlsys.train.transfer import TransferError
from tests.serving.helpers import make_store, mlp_params


def _primary(store, beta_address: str):
    """What pull_model reads of the primary supervisor."""
    view = types.SimpleNamespace(state="up", supervisor=beta_address)
    return types.SimpleNamespace(
        hosts=types.SimpleNamespace(views={"beta": view}), keys=None, host="alpha",
        spec=types.SimpleNamespace(hosts={"alpha": "127.0.0.1", "beta": "127.0.0.1"}),
        resolved=lambda: types.SimpleNamespace(store=str(store)))


def test_the_primary_pulls_a_version_checks_it_and_refuses_a_different_model_under_its_number(tmp_path):
    from dmlsys.cluster.hosts import host_store_service

    beta_store = make_store(tmp_path / "beta", versions=2)  # rank 0 saved v2 on beta
    alpha_store = make_store(tmp_path / "alpha", versions=1)  # the cluster's store has v1 (the same as beta's)

    async def main():
        beta = build_node(Member("supervisor", "supervisor", "tcp://127.0.0.1:0"), ZmqTransports(),
                          services=[host_store_service(str(beta_store))])
        await beta.start()
        try:
            sup = _primary(alpha_store, beta.transport.address)
            assert await pull_model(sup, "beta", "tiny", 2) is True
            assert await pull_model(sup, "beta", "tiny", 2) is False  # here already, the same parameters
            ModelStore(alpha_store).save("tiny", mlp_params(9), {"arch": {"kind": "mlp", "hidden": [16]}})  # v3
            ModelStore(beta_store).save("tiny", mlp_params(8), {"arch": {"kind": "mlp", "hidden": [16]}})  # v3 too
            with pytest.raises(TransferError, match=r"'tiny' v3 saved on host beta differs .*params_sha"):
                await pull_model(sup, "beta", "tiny", 3)
            sup.hosts.views["beta"].state = "lost"
            with pytest.raises(TransferError, match="host beta is not up"):
                await pull_model(sup, "beta", "tiny", 1)
        finally:
            await beta.stop(drain_timeout=0)

    asyncio.run(main())
    card = json.loads((alpha_store / "tiny" / "2" / "card.json").read_text())
    assert card == json.loads((beta_store / "tiny" / "2" / "card.json").read_text())
    ModelStore(alpha_store).load("tiny", 2)  # params_sha checked over the parameters
    assert not [p for p in (alpha_store / "tiny").iterdir() if p.name.startswith(".")]  # no temporary left
