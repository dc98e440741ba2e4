"""The HTTP side: the front door serves HTTPS with the spec's certificate, and an admin port
bound off loopback shows only what a probe needs."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess

import aiohttp
import pytest

from dmlsys.assembly import System, ZmqTransports
from dmlsys.node import Node
from dmlsys.node.admin import PUBLIC_STATUS
from dmlsys.wire.zmq_transport import ZmqTransport


@pytest.fixture
def certificate(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make a test certificate)")
    cert, key = tmp_path / "door.pem", tmp_path / "door.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_the_front_door_serves_https_with_the_configured_certificate(certificate, tmp_path):
    cert, key = certificate

    async def main():
        system = System(ZmqTransports(), store=tmp_path / "store")
        system.add("gateway", "gateway", config={"http": "127.0.0.1:0", "tls_cert": str(cert), "tls_key": str(key)})
        async with system:
            url = system.node("gateway").service("serving").url
            assert url.startswith("https://127.0.0.1:")
            trusted = ssl.create_default_context(cafile=str(cert))
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{url}/v1/models", ssl=trusted) as response:
                    assert response.status == 200 and "models" in await response.json()
                with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port gets no answer
                    async with session.get(url.replace("https", "http") + "/v1/models") as response:
                        await response.read()

    asyncio.run(main())


def test_a_gateway_given_half_a_certificate_is_a_configuration_error(tmp_path):
    from dmlsys.node import ConfigError

    system = System(ZmqTransports(), store=tmp_path / "store")
    with pytest.raises(ConfigError, match="tls_key"):
        system.add("gateway", "gateway", config={"http": "127.0.0.1:0", "tls_cert": "door.pem"})


@pytest.mark.parametrize("host, full", [("127.0.0.1", True), ("0.0.0.0", False)])
def test_admin_status_shows_internals_on_loopback_only(host, full):
    async def main():
        node = Node("n", ZmqTransport("n", "tcp://127.0.0.1:0"), admin=(host, 0))
        await node.start()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{node._admin.port}/status") as response:
                    status = await response.json()
        finally:
            await node.stop(drain_timeout=0)
        if full:
            assert {"pid", "zmq", "metrics"} <= set(status)
        else:
            assert set(status) == set(PUBLIC_STATUS) and status["state"] in ("ready", "alive")

    asyncio.run(main())
