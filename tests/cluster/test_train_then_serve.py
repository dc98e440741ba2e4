"""The default flow of `up`: an empty model store is trained first, then served; `train` and
`rollout` put a new version behind the front door."""

import json
import urllib.request

from dmlsys.cluster.spec import free_port

SPEC = """
[cluster]
name = "serve-test"
store = "store"
http = "127.0.0.1:{port}"
[cluster.train.tiny]
arch = {{ kind = "mlp", hidden = [16] }}
epochs = 1
batch_size = 256
[[nodes]]
name = "gateway"
role = "gateway"
[[nodes]]
name = "replica"
role = "replica"
replicas = 1
[nodes.config]
model = "tiny"
"""


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _predict(base: str) -> dict:
    body = json.dumps({"instances": [[0.0] * 784]}).encode()
    req = urllib.request.Request(f"{base}/v1/models/tiny:predict", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_up_trains_a_missing_model_then_serves_it_and_rolls_out_a_new_version(cli):
    port = free_port()
    cli("up", cli.write_spec(SPEC.format(port=port)), "--detach", timeout=300)
    base = cli.status()["http"]
    assert base == f"http://127.0.0.1:{port}"
    assert (cli.cwd / "store" / "tiny" / "1" / "card.json").exists()
    first = _predict(base)
    assert first["model_version"] == 1 and len(first["predictions"][0]["scores"]) == 10

    out = cli("train", "tiny", timeout=300).stdout
    assert "version 2" in out
    cli("rollout", "tiny", "--version", "2", timeout=120)
    assert _predict(base)["model_version"] == 2
    assert _get(f"{base}/v1/models/tiny")["version"] == 2


def test_a_model_without_recipe_fails_up_naming_it(cli):
    spec = SPEC.format(port=free_port()).replace('model = "tiny"', 'model = "nameless"')
    result = cli("up", cli.write_spec(spec), "--detach", check=False, timeout=120)
    assert result.returncode == 1
    assert "nameless" in result.stderr and "cluster.train.nameless" in result.stderr
