import pytest

from tests.node.helpers import Net


@pytest.fixture(params=["sim", "zmq"])
def net(request) -> Net:
    """The same scenario over the simulated network and over real ZeroMQ sockets."""
    return Net(request.param)
