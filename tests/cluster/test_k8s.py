"""Kubernetes manifests from a spec (issue 14, item 4): valid against the Kubernetes schema
offline, and running what the package runs.

The schema check is ``kubernetes-validate``'s (the API's OpenAPI schemas, bundled: no cluster,
no network), strict: an unknown field fails as a typo would on a real API server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmlsys.cluster import k8s
from dmlsys.cluster.errors import SpecError
from dmlsys.cluster.spec import ResolvedCluster, parse
from dmlsys.wire.curve import ClusterKey

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30"

SPEC = {
    "cluster": {"name": "shop", "store": ".dmlsys/models"},
    "nodes": [
        {"name": "gateway", "role": "gateway", "config": {"http": "127.0.0.1:8000"}},
        {"name": "replica", "role": "replica", "replicas": 3, "config": {"model": "fashion-mlp"}},
        {"name": "worker", "role": "worker", "replicas": 2},
    ],
}


@pytest.fixture(scope="module")
def key():
    return ClusterKey.generate()


@pytest.fixture(scope="module")
def manifests(key):
    return k8s.render(parse(SPEC, "shop.toml"), key_text=key.to_text(), image="dmlsys:test")


def by_kind(manifests, kind):
    return {m["metadata"]["name"]: m for m in manifests if m["kind"] == kind}


def test_every_manifest_is_valid_against_the_kubernetes_schema(manifests):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (the test extra)")
    for m in manifests:
        kv.validate(m, K8S_VERSION, strict=True)


def test_the_schema_check_catches_a_wrong_manifest(manifests):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (the test extra)")
    broken = json.loads(json.dumps(by_kind(manifests, "StatefulSet")["replica"]))
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, K8S_VERSION, strict=True)
    typo = json.loads(json.dumps(by_kind(manifests, "StatefulSet")["replica"]))
    typo["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, K8S_VERSION, strict=True)


def test_each_group_is_a_statefulset_with_stable_names_through_a_headless_service(manifests):
    sets, services = by_kind(manifests, "StatefulSet"), by_kind(manifests, "Service")
    assert set(sets) == {"gateway", "replica", "worker"}
    assert sets["replica"]["spec"]["replicas"] == 3 and sets["gateway"]["spec"]["replicas"] == 1
    resolved = json.loads(by_kind(manifests, "ConfigMap")["shop-resolved"]["data"]["resolved.json"])
    addresses = {m["name"]: m["address"] for m in resolved["members"]}
    for s in sets.values():
        headless = services[s["spec"]["serviceName"]]
        assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
        assert headless["spec"]["selector"] == s["spec"]["selector"]["matchLabels"]
        labels = s["spec"]["template"]["metadata"]["labels"]
        assert all(labels[k] == v for k, v in headless["spec"]["selector"].items())
    # A pod NAME-i is reached as NAME-i.NAME: the member of that name, at that DNS name.
    for i in range(3):
        assert addresses[f"replica-{i}"] == f"tcp://replica-{i}.replica:{k8s.ZMQ_PORT}"
    assert addresses["gateway"] == f"tcp://gateway.gateway:{k8s.ZMQ_PORT}"


def test_a_pod_starts_its_node_once_its_own_dns_name_resolves(manifests):
    for s in by_kind(manifests, "StatefulSet").values():
        inits = {c["name"]: c for c in s["spec"]["template"]["spec"]["initContainers"]}
        name = s["metadata"]["name"]
        own = f"$(POD_NAME).{name}" if name != "gateway" else "gateway.gateway"
        assert inits["dns"]["command"][-1] == f"until getent hosts {own}; do sleep 1; done"


def test_probes_ask_the_admin_port_for_readyz_and_healthz(manifests):
    resolved = json.loads(by_kind(manifests, "ConfigMap")["shop-resolved"]["data"]["resolved.json"])
    for s in by_kind(manifests, "StatefulSet").values():
        c = s["spec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        assert ports["admin"] == k8s.ADMIN_PORT
    assert {m["admin"] for m in resolved["members"]} == {f"0.0.0.0:{k8s.ADMIN_PORT}"}


def test_the_front_door_is_a_service_and_the_store_and_cache_are_volumes(manifests):
    door = by_kind(manifests, "Service")["gateway-http"]
    assert door["spec"]["selector"]["dmlsys/node"] == "gateway"
    assert door["spec"]["ports"][0]["targetPort"] == k8s.HTTP_PORT
    claims = by_kind(manifests, "PersistentVolumeClaim")
    assert set(claims) == {"shop-store", "shop-cache"}
    for s in by_kind(manifests, "StatefulSet").values():
        mounts = {m["name"]: m["mountPath"] for m in s["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert mounts["store"] == k8s.STORE_DIR and mounts["cache"] == k8s.CACHE_DIR


def test_the_key_is_a_secret_copied_in_at_0600(manifests, key):
    secret = by_kind(manifests, "Secret")["shop-key"]
    assert ClusterKey.from_text(secret["stringData"]["cluster.key"].strip()).fingerprint == key.fingerprint
    init = by_kind(manifests, "StatefulSet")["replica"]["spec"]["template"]["spec"]["initContainers"][0]
    assert "install -m 600" in init["command"][-1] and f"{k8s.STATE_DIR}/keys/cluster.key" in init["command"][-1]


def test_the_container_command_is_a_node_the_package_builds(manifests, key, tmp_path):
    """The command parses (``--help`` through the real CLI), names a member of the ConfigMap's
    resolved cluster for every pod, and that member's node builds from it with the key."""
    from dmlsys.cluster import keys
    from dmlsys.cluster.nodeproc import build_node

    resolved = by_kind(manifests, "ConfigMap")["shop-resolved"]["data"]["resolved.json"]
    cluster = ResolvedCluster.from_dict(json.loads(resolved))
    state = tmp_path / "state"
    keys.private_dir(state)
    keys.private_dir(state / "keys")
    fd = os.open(keys.key_path(state), os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(by_kind(manifests, "Secret")["shop-key"]["stringData"]["cluster.key"])
    checked = set()
    for s in by_kind(manifests, "StatefulSet").values():
        command = s["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[:3] == ["python", "-m", "dmlsys.cluster"]
        help_run = subprocess.run([sys.executable, *command[1:], "--help"], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT), "POD_NAME": "x"}, timeout=60, check=False)
        assert help_run.returncode == 0 and "--name" in help_run.stdout, help_run.stderr
        for ordinal in range(s["spec"]["replicas"]):
            pod = f"{s['metadata']['name']}-{ordinal}"
            name = [a.replace("$(POD_NAME)", pod) for a in command][command.index("--name") + 1]
            node = build_node(cluster, name, state)  # builds the role's services from its config; binds nothing
            assert node.name == name
            checked.add(name)
    assert checked == {m.name for m in cluster.members}


def test_the_cli_writes_one_file_per_manifest_and_keeps_the_secret_private(tmp_path):
    spec = tmp_path / "shop.toml"
    spec.write_text('[cluster]\nname = "shop"\n[[nodes]]\nname = "replica"\nrole = "replica"\nreplicas = 2\n'
                    '[nodes.config]\nmodel = "m"\n')
    result = subprocess.run([sys.executable, "-m", "dmlsys.cluster", "--state-dir", str(tmp_path / "st"), "k8s",
                             str(spec), "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files[0] == "00-secret-shop-key.json" and any("statefulset-replica" in f for f in files)
    assert (tmp_path / "out" / files[0]).stat().st_mode & 0o077 == 0
    assert json.loads((tmp_path / "out" / files[0]).read_text())["kind"] == "Secret"


def test_a_name_that_is_not_a_dns_label_is_refused_naming_it():
    spec = parse({"cluster": {"name": "shop"}, "nodes": [{"name": "my_replica", "role": "replica"}]}, "x.toml")
    with pytest.raises(SpecError, match="nodes.my_replica.name"):
        k8s.render(spec, key_text="k")


def test_the_dockerfile_runs_as_the_user_the_manifests_name():
    text = (ROOT / "Dockerfile").read_text()
    assert f"USER {k8s.USER}" in text
    assert "pip install" in text
