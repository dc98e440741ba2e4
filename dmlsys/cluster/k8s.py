"""A cluster spec as Kubernetes manifests: ``python -m dmlsys.cluster k8s SPEC [-o DIR]``.

What the supervisor does on one machine, Kubernetes does here, so no supervisor runs:

* Each ``[[nodes]]`` entry is a **StatefulSet** behind a **headless Service** of the same name.
  A StatefulSet's pods are ``NAME-0``, ``NAME-1``, ...: the names ``up`` gives a group's members,
  so a pod runs the member its own name says (``--name $(POD_NAME)``); a single node is a set of
  one that runs the member ``NAME``. Every member's address is its stable DNS name
  (``tcp://replica-0.replica:7000``), listed in the resolved cluster (a **ConfigMap**, the
  ``resolved.json`` the supervisor would write), so members find each other by DNS. The headless
  Service publishes pods before they are ready: peers reach a member while it loads. A node
  binds its own name, so an init container waits until that name resolves.
* The kubelet restarts what dies (liveness on the node's admin ``/healthz``) and a Service sends
  work only to ready pods (readiness on ``/readyz``): the supervisor's probes and restarts.
* The front door (a gateway's, an events node's or a router's ``http``) is a **Service**.
* The model store and the data/memo cache are **PersistentVolumeClaims** shared by every pod
  (``ReadWriteMany``): a replica finds its model on the volume, where on hosts of its own it
  would ask the supervisor's store service.
* The cluster key is a **Secret**; an init container copies it into the node's state directory
  at mode 0600, the only mode a node accepts a key file with (docs/security.md).

Limits: the member list is fixed at render time. ``kubectl scale`` beyond the spec's
``replicas`` starts pods no other member knows; change ``replicas`` and render again instead
(the ConfigMap changes; ``kubectl rollout restart`` picks it up).

``render`` is a pure function of the spec (no cluster, no files); ``write`` puts each manifest in
its own file; the CLI reads the key from the state directory or makes one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dmlsys.cluster.errors import SpecError
from dmlsys.cluster.spec import ClusterSpec, NodeSpec

IMAGE = "dmlsys:0.1.0"
STATE_DIR = "/var/lib/dmlsys"  # each pod's own state directory (an emptyDir): resolved.json, keys/
STORE_DIR = "/var/lib/dmlsys-store"  # the model store volume
CACHE_DIR = "/var/cache/dmlsys"  # Fashion-MNIST and the workflow memo cache
ZMQ_PORT, ADMIN_PORT, HTTP_PORT = 7000, 9000, 8000
USER = 10001  # the image's user (Dockerfile)
DOORS = ("gateway", "events", "router")  # roles whose config.http is the cluster's front door
DNS_LABEL = re.compile(r"^[a-z]([a-z0-9-]{0,40}[a-z0-9])?$")  # room for "-http", "-NN" and the pod hash


def node_args(name: str, group: bool) -> list[str]:
    """The container's command: the node process the supervisor would start (cluster/nodeproc.py)."""
    return ["python", "-m", "dmlsys.cluster", "--state-dir", STATE_DIR, "node",
            "--name", "$(POD_NAME)" if group else name]


def render(spec: ClusterSpec, *, key_text: str, image: str = IMAGE, namespace: str = "default",
           store_size: str = "2Gi", cache_size: str = "2Gi", storage_class: str | None = None) -> list[dict[str, Any]]:
    """Every manifest of ``spec``: Secret, ConfigMap, volume claims, then per node entry its
    headless Service and StatefulSet, and a front-door Service per door."""
    for key, name in (("cluster.name", spec.name), *((f"nodes.{n.name}.name", n.name) for n in spec.nodes)):
        if not DNS_LABEL.match(name):
            raise SpecError(spec.path, key, f"{name!r} names Kubernetes objects and DNS names here: lowercase letters, "
                                            "digits and -, starting with a letter, at most 42 characters")
    prefix = spec.name
    labels = {"app.kubernetes.io/part-of": "dmlsys", "dmlsys/cluster": spec.name}
    meta = lambda name, **extra: {"name": name, "namespace": namespace, "labels": {**labels, **extra}}
    members = [_member(n, name) for n in spec.nodes for name in n.member_names()]
    resolved = {"name": spec.name, "members": members, "store": STORE_DIR, "state_dir": STATE_DIR,
                "http": None, "supervisor": f"tcp://supervisor:{ZMQ_PORT}"}  # none runs: nodes keep the list above
    out: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": meta(f"{prefix}-key"), "type": "Opaque",
         "stringData": {"cluster.key": key_text + "\n"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(f"{prefix}-resolved"),
         "data": {"resolved.json": json.dumps(resolved, indent=2, sort_keys=True)}},
    ]
    for claim, size in ((f"{prefix}-store", store_size), (f"{prefix}-cache", cache_size)):
        pvc: dict[str, Any] = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta(claim),
                               "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": size}}}}
        if storage_class:
            pvc["spec"]["storageClassName"] = storage_class
        out.append(pvc)
    for node in spec.nodes:
        selector = {"dmlsys/cluster": spec.name, "dmlsys/node": node.name}
        ports = [{"name": "zmq", "port": ZMQ_PORT, "targetPort": ZMQ_PORT},
                 {"name": "admin", "port": ADMIN_PORT, "targetPort": ADMIN_PORT}]
        out.append({"apiVersion": "v1", "kind": "Service", "metadata": meta(node.name, **{"dmlsys/node": node.name}),
                    "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": selector,
                             "ports": ports}})
        out.append(_statefulset(spec, node, meta(node.name, **{"dmlsys/node": node.name}), selector, image))
        if node.role in DOORS and node.config.get("http"):
            out.append({"apiVersion": "v1", "kind": "Service",
                        "metadata": meta(f"{node.name}-http", **{"dmlsys/node": node.name}),
                        "spec": {"type": "ClusterIP", "selector": selector,
                                 "ports": [{"name": "http", "port": 80, "targetPort": HTTP_PORT}]}})
    return out


def _member(node: NodeSpec, name: str) -> dict[str, Any]:
    config = dict(node.config)
    if node.role in DOORS and config.get("http"):
        config["http"] = f"0.0.0.0:{HTTP_PORT}"  # reached through its Service, from other pods
    # The admin port listens on every interface: the kubelet probes the pod's address. Off loopback
    # a node's /status answers only what a probe needs (dmlsys/node/admin.py PUBLIC_STATUS).
    return {"name": name, "role": node.role, "address": f"tcp://{name}.{node.name}:{ZMQ_PORT}",
            "admin": f"0.0.0.0:{ADMIN_PORT}", "host": "local", "config": config}


def _statefulset(spec: ClusterSpec, node: NodeSpec, metadata: dict, selector: dict, image: str) -> dict[str, Any]:
    prefix = spec.name
    probe = lambda path, period, failures: {
        "httpGet": {"path": path, "port": "admin"}, "periodSeconds": period, "failureThreshold": failures,
        "timeoutSeconds": 2}
    ports = [{"name": "zmq", "containerPort": ZMQ_PORT}, {"name": "admin", "containerPort": ADMIN_PORT}]
    if node.role in DOORS and node.config.get("http"):
        ports.append({"name": "http", "containerPort": HTTP_PORT})
    container = {
        "name": "node", "image": image, "imagePullPolicy": "IfNotPresent",
        "command": node_args(node.name, node.replicas is not None),
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "DMLSYS_DATA", "value": f"{CACHE_DIR}/fashion-mnist"},
                {"name": "DMLSYS_LOG", "value": "INFO"}],
        "ports": ports,
        # A replica may compile its model and a worker load data before it is ready: the startup
        # probe gives it READY_TIMEOUT's three minutes before liveness may restart it.
        "startupProbe": probe("/healthz", 2, 90),
        "readinessProbe": probe("/readyz", 2, 3),
        "livenessProbe": probe("/healthz", 10, 3),
        "volumeMounts": [{"name": "state", "mountPath": STATE_DIR},
                         {"name": "resolved", "mountPath": f"{STATE_DIR}/resolved.json", "subPath": "resolved.json",
                          "readOnly": True},
                         {"name": "store", "mountPath": STORE_DIR},
                         {"name": "cache", "mountPath": CACHE_DIR}],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False,
                            "capabilities": {"drop": ["ALL"]}},
    }
    copy_key = {  # the key at 0600 in a 0700 directory: a node refuses a key others could read
        "name": "key", "image": image, "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", (f"install -d -m 700 {STATE_DIR}/keys && "
                                 f"install -m 600 /etc/dmlsys-key/cluster.key {STATE_DIR}/keys/cluster.key")],
        "volumeMounts": [{"name": "state", "mountPath": STATE_DIR},
                         {"name": "key", "mountPath": "/etc/dmlsys-key", "readOnly": True}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    # A node binds its own DNS name (its member address): wait until the headless Service
    # publishes it, rather than fail the bind and back off in CrashLoopBackOff.
    own = f"$(POD_NAME).{node.name}" if node.replicas is not None else f"{node.name}.{node.name}"
    wait_dns = {
        "name": "dns", "image": image, "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", f"until getent hosts {own}; do sleep 1; done"],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": metadata,
        "spec": {
            "serviceName": node.name, "replicas": 1 if node.replicas is None else node.replicas,
            "podManagementPolicy": "Parallel",  # members start together, as under `up`; no ordinal order
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**metadata["labels"], **selector}},
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "runAsUser": USER, "runAsGroup": USER, "fsGroup": USER},
                    "terminationGracePeriodSeconds": 40,  # the supervisor's STOP_TIMEOUT and a little
                    "initContainers": [copy_key, wait_dns],
                    "containers": [container],
                    "volumes": [{"name": "state", "emptyDir": {}},
                                {"name": "resolved", "configMap": {"name": f"{prefix}-resolved"}},
                                {"name": "key", "secret": {"secretName": f"{prefix}-key", "defaultMode": 0o440}},
                                {"name": "store", "persistentVolumeClaim": {"claimName": f"{prefix}-store"}},
                                {"name": "cache", "persistentVolumeClaim": {"claimName": f"{prefix}-cache"}}],
                },
            },
        },
    }


def write(manifests: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One file per manifest, ``NN-kind-name.json`` (JSON is YAML: ``kubectl apply -f DIR``
    takes them). The Secret's file is the user's alone (0600)."""
    import os

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, m in enumerate(manifests):
        path = out_dir / f"{i:02d}-{m['kind'].lower()}-{m['metadata']['name']}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if m["kind"] == "Secret" else 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(m, indent=2) + "\n")
        paths.append(path)
    return paths


def as_list(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifests as one ``kind: List`` document (for stdout: ``... k8s SPEC | kubectl apply -f -``)."""
    return {"apiVersion": "v1", "kind": "List", "items": manifests}
