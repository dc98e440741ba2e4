"""The cluster CLI's event-driven commands: ``deploy``, ``keys add|ls|revoke``, the pool in ``status``.

    python -m dmlsys.cluster deploy fashion-mlp --min 0 --max 4     # a function from a model in the store
    python -m dmlsys.cluster keys add alice --tier authenticated    # an API key, printed once
    python -m dmlsys.cluster keys ls
    python -m dmlsys.cluster keys revoke alice

API keys live in ``STATE_DIR/keys/api-keys.json`` (hashed, 0600), where the ``events`` node reads
them (re-read within a second of a change: a revocation needs no restart). ``--file`` picks
another file. See docs/events.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from dmlsys.cluster.errors import CliError


def add_key_actions(actions) -> None:
    """``keys add|ls|revoke`` beside the cluster key's ``export|import|show``."""
    a = actions.add_parser("add", help="create an API key for NAME in TIER and print it (shown once)")
    a.add_argument("name")
    a.add_argument("--tier", required=True, help="a tier the events node configures (default tiers: "
                                                 "anonymous, authenticated)")
    a.add_argument("--file", help="API key file (default STATE_DIR/keys/api-keys.json)")
    ls = actions.add_parser("ls", help="list API keys: name, tier, created, active or revoked")
    ls.add_argument("--file")
    r = actions.add_parser("revoke", help="revoke NAME's API key (401 from then on, within a second)")
    r.add_argument("name")
    r.add_argument("--file")


def api_keys(args: argparse.Namespace, state_dir: Path) -> int:
    from dmlsys.events import keys
    from dmlsys.events.service import keys_path

    path = args.file or str(keys_path(state_dir))
    if not args.file:
        from dmlsys.cluster.keys import private_dir

        private_dir(Path(path).parent)
    ns = argparse.Namespace(file=path, keys_command=args.keys_action, name=getattr(args, "name", None),
                            tier=getattr(args, "tier", None))
    return keys.run(ns)


KEY_ACTIONS = {"add": api_keys, "ls": api_keys, "revoke": api_keys}


def add_deploy(sub) -> None:
    d = sub.add_parser("deploy", help="serve a model of the store as an autoscaled function of the events node")
    d.add_argument("model")
    d.add_argument("--name", help="the function's name (default: the model's)")
    d.add_argument("--version", type=int, help="model store version (default: the latest)")
    d.add_argument("--min", type=int, default=0, help="instances kept even when idle (default 0: scale to zero)")
    d.add_argument("--max", type=int, default=4, help="most instances (default 4)")
    d.add_argument("--target", type=float, default=1.0, help="events in flight per instance to aim at (default 1)")
    d.add_argument("--priority", type=int, default=0, help="higher keeps its slots when the pool is full")


def events_node(doc: dict) -> dict | None:
    return next((n for n in doc.get("nodes", []) if n.get("role") == "events"), None)


def cmd_deploy(args: argparse.Namespace, state_dir: Path) -> int:
    from dmlsys.cluster.__main__ import ask, cluster_key, running_state
    from dmlsys.node import NodeError, RemoteError

    doc = running_state(state_dir)
    node = events_node(doc)
    if node is None:
        raise CliError(f"the cluster of {doc.get('spec')} has no node with role \"events\"; add one "
                       f"(see cluster/events.toml)")
    body = {"model": args.model, "name": args.name, "version": args.version, "min": args.min, "max": args.max,
            "target": args.target, "priority": args.priority}
    try:
        out = asyncio.run(ask(node["name"], node["zmq"], "events", "deploy", body, timeout=10.0,
                              keys=cluster_key(state_dir)))
    except RemoteError as e:
        raise CliError(e.message) from None
    except NodeError as e:
        raise CliError(f"events node {node['name']}: {e}") from None
    status = pool_status(doc, state_dir) or {}
    url = status.get("url")
    print(f"deployed {out['name']}: model {out['model']}, {out['min']} to {out['max']} instances"
          + (f"; POST {url}/v1/functions/{out['name']}:invoke" if url else ""))
    return 0


def pool_status(doc: dict, state_dir: Path) -> dict | None:
    """The events node's ``status`` (None when there is no events node or it does not answer)."""
    from dmlsys.cluster.__main__ import ask, cluster_key

    node = events_node(doc)
    if node is None or not node.get("zmq"):
        return None
    try:
        return asyncio.run(ask(node["name"], node["zmq"], "events", "status", None, timeout=3.0,
                               keys=cluster_key(state_dir)))
    except Exception:  # noqa: BLE001 - status shows what answers; a silent events node is no error
        return None


def print_pool(doc: dict, state_dir: Path, out=sys.stdout) -> None:
    """A few lines under ``status``'s table: the pool's slots in use per function."""
    st = pool_status(doc, state_dir)
    if st is None:
        return
    pool = st["pool"]
    print(f"\nevents {st.get('url') or '(no HTTP door)'}: pool {pool['slots_used']}/{pool['slots']} slots, "
          f"{st.get('spares', 0)} spare(s)", file=out)
    for f, states in pool["instances"].items():
        cold = pool["cold_start_median_s"].get(f)
        print(f"  {f:<20} ready {states['ready']}  starting {states['starting']}  draining {states['draining']}  "
              f"in flight {pool['in_flight'].get(f, 0)}  waiting {pool['waiting'].get(f, 0)}"
              + (f"  cold start {cold:.2f}s" if cold is not None else ""), file=out)
