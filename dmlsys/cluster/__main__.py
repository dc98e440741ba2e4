"""``python -m dmlsys.cluster``: bring a cluster up, look at it, scale it, take it down.

    python -m dmlsys.cluster up                  # cluster/local.toml, in the foreground (Ctrl-C stops it)
    python -m dmlsys.cluster up my.toml --detach # returns once every node is ready
    python -m dmlsys.cluster status [--json]
    python -m dmlsys.cluster scale replica 3
    python -m dmlsys.cluster train fashion-mlp     # a new version, from the spec's recipe
    python -m dmlsys.cluster rollout fashion-mlp [--version 2]
    python -m dmlsys.cluster pipeline --limit 5000 # the end-to-end workflow (see its --help)
    python -m dmlsys.cluster cache ls              # the workflow memo cache
    python -m dmlsys.cluster keys export key.txt   # the cluster key, for `keys import` on another host
    python -m dmlsys.cluster keys add alice --tier authenticated   # an API key for the events door
    python -m dmlsys.cluster deploy fashion-mlp --min 0 --max 4    # a model as an autoscaled function
    python -m dmlsys.cluster down

State lives under ``.dmlsys/`` in the working directory (``--state-dir`` to change it): the
supervisor's ``state.json``, each node's log under ``logs/``, the resolved member list, and the
cluster key under ``keys/`` that every node and this CLI authenticate with (docs/security.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dmlsys.cluster.errors import CliError, ClusterError, SpecError
from dmlsys.cluster import events_cli

DEFAULT_SPEC = "cluster/local.toml"
DEFAULT_STATE_DIR = ".dmlsys"
PASSTHROUGH = {
    "pipeline": "run the end-to-end workflow: ingest, train x3, select, serve, aggregate",
    "cache": "list, inspect, garbage-collect or clear the workflow memo cache",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dmlsys.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", default=os.environ.get("DMLSYS_STATE_DIR", DEFAULT_STATE_DIR),
                        help="where the supervisor keeps state and logs (default: .dmlsys)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start every node of a spec and supervise them")
    up.add_argument("spec", nargs="?", default=DEFAULT_SPEC, help=f"cluster spec TOML (default: {DEFAULT_SPEC})")
    up.add_argument("--detach", action="store_true", help="return once all nodes are ready; supervise in the background")
    up.add_argument("--host", help="start only the nodes placed on this host of the spec")

    status = sub.add_parser("status", help="show the nodes of the running cluster")
    status.add_argument("--json", action="store_true", help='print {"nodes": [...], "http": ...} as JSON')

    down = sub.add_parser("down", help="drain and stop the running cluster")
    down.add_argument("--timeout", type=float, default=60.0, help="seconds to wait before killing (default 60)")

    scale = sub.add_parser("scale", help="change the number of replicas of a node group at run time")
    scale.add_argument("group", help="the [[nodes]] name that has `replicas = N`")
    scale.add_argument("replicas", type=int)

    train = sub.add_parser("train", help="train a new version of a model from its [cluster.train.MODEL] recipe, "
                                         "on the worker nodes if the cluster has any")
    train.add_argument("model")
    train.add_argument("--via", choices=("allreduce", "ps"), default="allreduce",
                       help="allreduce: the worker nodes (ring, data parallel; default); ps: the ps-worker nodes "
                            "through the ps nodes (parameter servers; see cluster/ps.toml)")
    train.add_argument("--consistency", choices=("bsp", "ssp", "asp"), default="bsp",
                       help="with --via ps: bulk synchronous (default), stale synchronous, asynchronous")
    train.add_argument("--staleness", type=int, default=None,
                       help="with --via ps --consistency ssp: clocks a worker may run ahead (default 2)")
    train.add_argument("--epochs", type=int, help="with --via ps: override the recipe's epochs")
    train.add_argument("--limit", type=int, help="with --via ps: train on the first N samples only")
    train.add_argument("--test-limit", type=int, help="with --via ps: test on the first N samples only")

    rollout = sub.add_parser("rollout", help="reload every replica of a model with a new version, one at a time")
    rollout.add_argument("model")
    rollout.add_argument("--version", type=int, help="model store version (default: the latest)")

    for name, what in PASSTHROUGH.items():
        sub.add_parser(name, help=what, add_help=False)  # the rest of the line goes to its own CLI

    keys = sub.add_parser("keys", help="the cluster key: export it for another host, import it there")
    actions = keys.add_subparsers(dest="keys_action", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="write the cluster key to FILE (0600) for `keys import` elsewhere")
    export.add_argument("file")
    export.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    imp = actions.add_parser("import", help="make the key in FILE this state directory's cluster key")
    imp.add_argument("file")
    imp.add_argument("--force", action="store_true", help="replace a different key already here")
    actions.add_parser("show", help="where the cluster key is and its fingerprint (compare hosts with it)")
    events_cli.add_key_actions(actions)  # API keys of the events door: add, ls, revoke
    events_cli.add_deploy(sub)

    k8s = sub.add_parser("k8s", help="render a spec as Kubernetes manifests (StatefulSets, Services, volumes, "
                                     "the key as a Secret); see docs/deploy.md")
    k8s.add_argument("spec", nargs="?", default=DEFAULT_SPEC, help=f"cluster spec TOML (default: {DEFAULT_SPEC})")
    k8s.add_argument("-o", "--output", help="a directory for one file per manifest (default: one List on stdout)")
    k8s.add_argument("--image", default="dmlsys:0.1.0", help="the image built from the Dockerfile (default dmlsys:0.1.0)")
    k8s.add_argument("--namespace", default="default")
    k8s.add_argument("--storage-class", help="for the model store's and the cache's ReadWriteMany volumes")

    node = sub.add_parser("node")  # what the supervisor runs per member; no help: not listed
    node.add_argument("--name", required=True)

    argv = sys.argv[1:] if argv is None else argv
    command = next((i for i, a in enumerate(argv) if a in PASSTHROUGH), None)
    if command is not None and not any(a in sub.choices and a not in PASSTHROUGH for a in argv[:command]):
        if argv[command] == "pipeline":
            from dmlsys.pipeline.cli import main as pipeline_main
            sys.exit(pipeline_main(argv[command + 1:], prog="python -m dmlsys.cluster pipeline"))
        from dmlsys.workflow.cli import main as workflow_main
        sys.exit(workflow_main(argv[command:], prog="python -m dmlsys.cluster"))
    args = parser.parse_args(argv)
    state_dir = Path(args.state_dir)
    if args.command == "node":
        from dmlsys.cluster.nodeproc import main as node_main

        node_main(str(state_dir), args.name)
        return
    logging.basicConfig(level=os.environ.get("DMLSYS_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command != "up":
        logging.getLogger("dmlsys.node").setLevel(logging.WARNING)  # the CLI's own short-lived client node
    handler = {"up": cmd_up, "status": cmd_status, "down": cmd_down, "scale": cmd_scale,
               "rollout": cmd_rollout, "train": cmd_train, "keys": cmd_keys,
               "deploy": events_cli.cmd_deploy, "k8s": cmd_k8s}[args.command]
    try:
        code = handler(args, state_dir)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)


# -- up ---------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace, state_dir: Path) -> int:
    from dmlsys.cluster.spec import load

    try:
        spec = load(args.spec)
    except SpecError as e:
        print(f"error: bad cluster spec: {e}", file=sys.stderr)
        return 2
    running = read_state(state_dir)
    if running and pid_alive(running.get("supervisor", {}).get("pid")):
        print(f"error: a cluster is already running from {state_dir} (supervisor pid "
              f"{running['supervisor']['pid']}); run `python -m dmlsys.cluster down` first", file=sys.stderr)
        return 1
    (state_dir / "state.json").unlink(missing_ok=True)
    from dmlsys.cluster import keys

    keys.secure_state_dir(state_dir)  # umask 077 from here on: what the cluster writes is its user's alone
    try:
        key, made = keys.ensure(state_dir)
    except keys.KeyFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if made:
        print(f"made the cluster key {keys.key_path(state_dir)} (fingerprint {key.fingerprint}); "
              f"other hosts need it: `python -m dmlsys.cluster keys export FILE`", file=sys.stderr)
    if args.detach:
        return up_detached(args, state_dir)
    import uvloop

    return uvloop.run(up_foreground(spec, state_dir, args.host))


async def up_foreground(spec, state_dir: Path, host: str | None) -> int:
    from dmlsys.cluster.recipes import before_phase
    from dmlsys.cluster.supervisor import Supervisor

    sup = Supervisor(spec, state_dir, host=host, before_phase=before_phase)
    loop = asyncio.get_running_loop()
    up_task = loop.create_task(sup.up())

    def on_signal() -> None:
        if not up_task.done():
            up_task.cancel()
        sup.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await up_task
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        print("stopped before the cluster was ready; nothing is left running", file=sys.stderr)
        return 0
    print_table(sup.status_document())
    print_endpoints(sup.status_document())
    sys.stdout.flush()
    await sup.supervise()
    logging.getLogger("dmlsys.supervisor").info("stopping: draining every node")
    await sup.down()
    print("cluster stopped", flush=True)
    return 0


def up_detached(args: argparse.Namespace, state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "supervisor.log"
    cmd = [sys.executable, "-m", "dmlsys.cluster", "--state-dir", str(state_dir), "up", args.spec]
    if args.host:
        cmd += ["--host", args.host]
    with open(log_path, "ab") as log_file:
        start = log_file.tell()
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                 start_new_session=True)
    echo = LogEcho(log_path, start)  # what the supervisor is doing (training, say) while we wait
    while True:
        echo.poll()
        doc = read_state(state_dir)
        if doc and doc.get("supervisor", {}).get("pid") == child.pid and doc["state"] in ("ready", "failed", "waiting"):
            break
        if child.poll() is not None:
            doc = read_state(state_dir)
            break
        time.sleep(0.1)
    echo.poll()
    if doc and doc["state"] == "waiting":  # hosts up in any order: it goes on once the others are up
        print(f"host {args.host}: {doc.get('error') or 'waiting for the primary supervisor (cluster.supervisor)'}; "
              f"it goes on by itself once they are up (`python -m dmlsys.cluster status` shows when). Supervisor pid "
              f"{child.pid}, logs in {state_dir}/")
        return 0
    if not doc or doc["state"] != "ready":
        error = (doc or {}).get("error") or f"the supervisor exited with code {child.poll()}"
        print(f"error: {error}\n(see {log_path})", file=sys.stderr)
        child.wait(timeout=60)
        return 1
    print_table(doc)
    print_endpoints(doc)
    print(f"supervisor pid {child.pid} runs in the background; logs in {state_dir}/; "
          f"stop it with `python -m dmlsys.cluster down`")
    return 0


class LogEcho:
    """Copies the supervisor's log records (not its table) to stderr as they are written."""

    RECORD = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR|CRITICAL) ")

    def __init__(self, path: Path, offset: int) -> None:
        self.path, self.offset, self.partial = path, offset, ""

    def poll(self) -> None:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                f.seek(self.offset)
                text = f.read()
                self.offset = f.tell()
        except OSError:
            return
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            if self.RECORD.match(line):
                print(line, file=sys.stderr, flush=True)


# -- status / down / scale ------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, state_dir: Path) -> int:
    doc = read_state(state_dir)
    if doc is None:
        if args.json:
            print(json.dumps({"nodes": [], "http": None, "state": "down"}))
        else:
            print(f"no cluster has run from {state_dir}")
        return 1
    live = None
    if pid_alive(doc.get("supervisor", {}).get("pid")):
        with contextlib.suppress(Exception):
            live = asyncio.run(ask_supervisor(doc["supervisor"]["zmq"], "status", None, timeout=3.0,
                                              keys=cluster_key(state_dir)))
    if live is not None:
        doc = live
    else:
        doc["state"] = doc.get("state") if pid_alive(doc.get("supervisor", {}).get("pid")) else "down"
        for row in doc["nodes"]:
            if not pid_alive(row.get("pid")):
                row["state"], row["pid"] = "stopped", None
    if args.json:
        print(json.dumps({k: doc.get(k) for k in ("nodes", "http", "state", "cluster", "hosts", "error", "dashboard")},
                         indent=2))
    else:
        print_table(doc)
        if live is not None:
            events_cli.print_pool(doc, state_dir)
    return 0


def cmd_down(args: argparse.Namespace, state_dir: Path) -> int:
    doc = read_state(state_dir)
    if doc is None:
        print(f"no cluster has run from {state_dir}")
        return 0
    from dmlsys.cluster.nodeproc import is_our_process

    supervisor = doc.get("supervisor", {})
    pid = supervisor.get("pid")
    if pid_alive(pid) and not is_our_process(pid, started=supervisor.get("started")):
        print(f"supervisor pid {pid} is gone (that pid now belongs to another process, left alone)")
    elif pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            print(f"supervisor pid {pid} did not stop within {args.timeout:g}s; killing it", file=sys.stderr)
            os.kill(pid, signal.SIGKILL)
    # Anything the supervisor could not stop (it was SIGKILLed, say) is ours to stop, by pid: but
    # only while that pid is still the node we started. After a reboot or a long time the pid
    # may belong to anyone; its start time and command line say whether it is still ours.
    def ours(row: dict) -> bool:
        return pid_alive(row.get("pid")) and is_our_process(row["pid"], started=row.get("started"), name=row["name"])

    rows = (read_state(state_dir) or doc)["nodes"]
    for row in rows:
        if pid_alive(row.get("pid")) and not ours(row):
            print(f"node {row['name']}: pid {row['pid']} now belongs to another process; left alone")
    leftovers = [row for row in rows if ours(row)]
    for row in leftovers:
        os.kill(row["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 10
    while any(ours(r) for r in leftovers) and time.monotonic() < deadline:
        time.sleep(0.1)
    for row in leftovers:
        if ours(row):
            os.kill(row["pid"], signal.SIGKILL)
    print("cluster stopped")
    return 0


def cmd_scale(args: argparse.Namespace, state_dir: Path) -> int:
    doc, rows = tell_supervisor(state_dir, "scale", {"group": args.group, "replicas": args.replicas}, timeout=300.0)
    print_table({"nodes": rows, "cluster": doc.get("cluster")})
    return 0


def cmd_k8s(args: argparse.Namespace, state_dir: Path) -> int:
    """The spec as manifests; the key is this state directory's (made if there is none yet)."""
    from dmlsys.cluster import k8s, keys
    from dmlsys.cluster.spec import load

    try:
        spec = load(args.spec)
        key = keys.load(state_dir)
        if key is None:
            keys.secure_state_dir(state_dir)
            key, _ = keys.ensure(state_dir)
            print(f"made the cluster key {keys.key_path(state_dir)} (fingerprint {key.fingerprint})", file=sys.stderr)
        manifests = k8s.render(spec, key_text=key.to_text(), image=args.image, namespace=args.namespace,
                               storage_class=args.storage_class)
    except (SpecError, keys.KeyFileError) as e:
        raise CliError(str(e)) from None
    if args.output:
        paths = k8s.write(manifests, Path(args.output))
        print(f"wrote {len(paths)} manifests to {args.output}/ (the Secret holds the cluster key: keep it private); "
              f"apply them with `kubectl apply -f {args.output}`")
    else:
        print(json.dumps(k8s.as_list(manifests), indent=2))
    return 0


def cmd_train(args: argparse.Namespace, state_dir: Path) -> int:
    via = getattr(args, "via", "allreduce")
    if via != "ps":
        given = [f"--{k.replace('_', '-')}" for k in ("staleness", "epochs", "limit", "test_limit")
                 if getattr(args, k, None) is not None]
        given += ["--consistency"] if getattr(args, "consistency", "bsp") != "bsp" else []
        if given:
            raise CliError(f"{', '.join(given)}: only with --via ps (the collective trains the recipe as written)")
    doc = running_state(state_dir)
    from dmlsys.node import RemoteError

    try:
        if via == "ps":
            result = asyncio.run(train_ps_with_progress(doc, args.model, cluster_key(state_dir), ps_options(args)))
        else:
            result = asyncio.run(train_with_progress(doc, args.model, cluster_key(state_dir)))
    except RemoteError as e:
        raise CliError(e.message) from None
    if via == "ps":
        mode = result["consistency"] + (f" s={result['staleness']}" if result["consistency"] == "ssp" else "")
        print(f"trained {result['model']} version {result['version']}: test accuracy {result['test_accuracy']:.4f}"
              f" (through parameter servers {', '.join(result['shards'])}, {mode}; "
              f"ps-workers {', '.join(result['workers'])})")
        print(f"serve it with: python -m dmlsys.cluster rollout {result['model']} --version {result['version']}")
        return 0
    print(f"trained {result['model']} version {result['version']}: test accuracy {result['test_accuracy']:.4f}"
          f" ({'workers ' + ', '.join(result['workers']) if result['workers'] else 'in the supervisor'})")
    print(f"serve it with: python -m dmlsys.cluster rollout {result['model']} --version {result['version']}")
    return 0


async def train_with_progress(doc: dict, model: str, keys=None) -> dict:
    """Ask the supervisor to train ``model``; meanwhile show rank 0's epochs as a progress bar."""
    workers = [n for n in doc["nodes"] if n["role"] == "worker" and pid_alive(n.get("pid"))]
    async with client_node({"supervisor": doc["supervisor"]["zmq"], **{n["name"]: n["zmq"] for n in workers}},
                           keys=keys) as node:
        job = asyncio.ensure_future(node.call("supervisor", "cluster", "train", {"model": model}, timeout=7200.0))
        if not workers:  # trained in the supervisor's process: its log has the epochs
            return await job
        await with_progress(node, job, model, workers[0]["name"], f"training {model} on {len(workers)} workers")
        return job.result()


async def with_progress(node, job: asyncio.Future, model: str, rank0: str, label: str) -> None:
    """Wait for ``job`` while showing rank 0's epochs of ``model`` (node ``rank0``) as a progress bar."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dmlsys.collective.job import follow_progress

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("epochs {task.fields[stats]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("train", total=None, stats="")

        async def show() -> None:
            async for reply, epoch in follow_progress(node, rank0, None, every=1.0):
                if reply.get("model") == model:
                    bar.update(task, total=reply.get("epochs_total"), completed=epoch["epoch"],
                               stats=f"loss {epoch['loss']:.4f}  test accuracy {epoch['test_accuracy']:.4f}")

        shower = asyncio.ensure_future(show())
        try:
            await asyncio.wait([job])
        finally:
            shower.cancel()
        if not job.exception():  # the last epochs may have ended after our last look
            done = job.result()
            bar.update(task, total=done["epochs"], completed=done["epochs"],
                       stats=f"test accuracy {done['test_accuracy']:.4f}")


def ps_options(args: argparse.Namespace) -> dict[str, Any]:
    """``train --via ps`` flags -> keyword arguments of ``recipes.train_ps``; CliError names a bad one."""
    if args.consistency != "ssp" and args.staleness not in (None, 0):
        raise CliError(f"--staleness {args.staleness}: only with --consistency ssp")
    staleness = (2 if args.staleness is None else args.staleness) if args.consistency == "ssp" else 0
    if staleness < 0:
        raise CliError(f"--staleness: clocks >= 0, got {staleness}")
    for flag in ("epochs", "limit", "test_limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CliError(f"--{flag.replace('_', '-')}: an integer >= 1, got {value}")
    return {"consistency": args.consistency, "staleness": staleness, "epochs": args.epochs,
            "limit": args.limit, "test_limit": args.test_limit}


async def train_ps_with_progress(doc: dict, model: str, keys=None, options: dict | None = None) -> dict:
    """``train MODEL --via ps``: this CLI drives the job itself (``recipes.train_ps``) on the
    running ``ps-worker`` nodes through the running ``ps`` nodes; rank 0's epochs as a progress bar."""
    from dmlsys.cluster.recipes import train_ps
    from dmlsys.cluster.spec import load
    from dmlsys.ps.errors import PsError

    spec = load(doc["spec"])
    if spec.multi_host:  # the job is driven from here, on this host's nodes; rank 0 would save off the cluster's store
        raise CliError(f"{spec.path}: train --via ps runs on a single-host spec only (its ps and ps-worker nodes "
                       f"on this host, rank 0 saving into this host's store); this spec spans hosts "
                       f"{', '.join(sorted(spec.hosts))} (docs/ps.md)")
    alive = [n for n in doc["nodes"] if pid_alive(n.get("pid"))]
    workers = [n for n in alive if n["role"] == "ps-worker"]
    shards = [n for n in alive if n["role"] == "ps"]
    async with client_node({n["name"]: n["zmq"] for n in workers + shards}, keys=keys) as node:
        job = asyncio.ensure_future(train_ps(node, spec, model, [n["name"] for n in workers],
                                             [n["name"] for n in shards], **(options or {})))
        if workers:
            await with_progress(node, job, model, workers[0]["name"],
                                f"training {model} on {len(workers)} ps-workers, {len(shards)} shards")
        else:
            await asyncio.wait([job])
        if isinstance(job.exception(), (ClusterError, PsError)):  # names the recipe, node or worker
            raise CliError(str(job.exception())) from None
        return job.result()


def cmd_rollout(args: argparse.Namespace, state_dir: Path) -> int:
    """Through the supervisor: it runs the rollout on one gateway and moves every gateway's pin."""
    from dmlsys.node import NodeError

    try:
        _, result = tell_supervisor(state_dir, "rollout", {"model": args.model, "version": args.version},
                                    timeout=900.0)
    except NodeError as e:
        raise CliError(str(e)) from None
    print(json.dumps(result, indent=2))
    return 0


# -- helpers ----------------------------------------------------------------------------------------


async def ask(peer: str, address: str, service: str, method: str, body: Any, *, timeout: float, keys=None) -> Any:
    """One RPC from a short-lived client node named after this process."""
    async with client_node({peer: address}, keys=keys) as node:
        return await node.call(peer, service, method, body, timeout=timeout)


@contextlib.asynccontextmanager
async def client_node(peers: dict[str, str], *, keys=None):
    """A short-lived node named after this process that knows ``peers`` (name -> address); with
    the cluster's ``keys`` it authenticates as the CLI (every ``cli-*`` node is principal "cli")."""
    from dmlsys.assembly import ZmqTransports, build_node
    from dmlsys.node import Member

    name = f"cli-{os.getpid()}"
    node = build_node(Member(name, "client", "tcp://127.0.0.1:0"), ZmqTransports(keys=keys))
    await node.start()
    try:
        for peer, address in peers.items():
            node.transport.add_peer(peer, address)
        yield node
    finally:
        await node.stop(drain_timeout=0)


async def ask_supervisor(address: str, method: str, body: Any, *, timeout: float, keys=None) -> Any:
    return await ask("supervisor", address, "cluster", method, body, timeout=timeout, keys=keys)


def running_state(state_dir: Path) -> dict:
    """The state document of the cluster running from ``state_dir``, or CliError."""
    doc = read_state(state_dir)
    if doc is None or not pid_alive(doc.get("supervisor", {}).get("pid")):
        raise CliError(f"no cluster is running from {state_dir}")
    return doc


def tell_supervisor(state_dir: Path, method: str, body: Any, *, timeout: float) -> tuple[dict, Any]:
    """(state document, reply) of one RPC to the running cluster's supervisor."""
    from dmlsys.node import RemoteError

    doc = running_state(state_dir)
    try:
        return doc, asyncio.run(ask_supervisor(doc["supervisor"]["zmq"], method, body, timeout=timeout,
                                               keys=cluster_key(state_dir)))
    except RemoteError as e:
        raise CliError(e.message) from None


def cluster_key(state_dir: Path):
    """The key this CLI authenticates to the cluster of ``state_dir`` with (None: no key made)."""
    from dmlsys.cluster import keys

    try:
        return keys.load(state_dir)
    except keys.KeyFileError as e:
        raise CliError(str(e)) from None


# -- keys -------------------------------------------------------------------------------------------

KEY_ACTIONS = {}  # action name -> function(args, state_dir); `keys add/ls/revoke` (client API keys) join here


def cmd_keys(args: argparse.Namespace, state_dir: Path) -> int:
    from dmlsys.cluster import keys

    try:
        return KEY_ACTIONS[args.keys_action](args, state_dir)
    except keys.KeyFileError as e:
        raise CliError(str(e)) from None


def keys_export(args: argparse.Namespace, state_dir: Path) -> int:
    from dmlsys.cluster import keys

    key = keys.export(state_dir, Path(args.file), force=args.force)
    print(f"wrote the cluster key (fingerprint {key.fingerprint}) to {args.file}, mode 0600; copy it to the other "
          f"host privately (scp), run `python -m dmlsys.cluster keys import {Path(args.file).name}` there, "
          f"then delete the copy")
    return 0


def keys_import(args: argparse.Namespace, state_dir: Path) -> int:
    from dmlsys.cluster import keys

    key = keys.import_(state_dir, Path(args.file), force=args.force)
    print(f"{keys.key_path(state_dir)} now holds the cluster key (fingerprint {key.fingerprint})")
    return 0


def keys_show(args: argparse.Namespace, state_dir: Path) -> int:
    from dmlsys.cluster import keys

    key = keys.load(state_dir)
    if key is None:
        print(f"no cluster key under {state_dir}/keys (`up` makes one)")
        return 1
    print(f"{keys.key_path(state_dir)}: fingerprint {key.fingerprint}")
    return 0


KEY_ACTIONS.update(export=keys_export, show=keys_show, **events_cli.KEY_ACTIONS)
KEY_ACTIONS["import"] = keys_import


def read_state(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / "state.json").read_text())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still "exists"; treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def print_table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cluster {doc.get('cluster', '')}: {doc.get('state', '')}".strip())
    spread = bool(doc.get("hosts"))  # several hosts: where each node runs, and why one is not ready
    for col in ("name", "role", *(("host",) if spread else ()), "pid", "zmq", "admin", "state"):
        table.add_column(col)
    shards = any("keys" in row for row in doc.get("nodes", []))  # shards hold keys: how many, and bytes on disk
    if shards:
        table.add_column("keys", justify="right")
        table.add_column("bytes", justify="right")
    colors = {"ready": "green", "alive": "yellow", "starting": "yellow", "restarting": "red", "draining": "yellow"}
    for row in doc.get("nodes", []):
        state = row.get("state", "")
        color = colors.get(state, "red" if state in ("unresponsive", "exited") else "")
        cells = [row["name"], row["role"], str(row.get("pid") or "-"), row["zmq"], row.get("admin") or "-",
                 f"[{color}]{state}[/]" if color else state]
        if spread:
            cells.insert(2, row.get("host") or "-")
            cells[-1] += f": {row['why']}" if row.get("why") else ""
        if shards:
            cells += [str(row["keys"]), str(row["bytes"])] if "keys" in row else ["-", "-"]
        table.add_row(*cells)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a log file should not get truncated addresses
    console.print(table)
    for host, view in sorted((doc.get("hosts") or {}).items()):
        if view.get("state") != "up":
            console.print(f"host {host}: {view.get('state')}" + (f" ({view['error']})" if view.get("error") else ""))


def print_endpoints(doc: dict) -> None:
    if doc.get("dashboard"):
        print(f"\ndashboard: {doc['dashboard']}")
    http = doc.get("http")
    if not http or not any(r["role"] == "gateway" for r in doc.get("nodes", [])):
        return
    models = sorted({r["model"] for r in doc.get("nodes", []) if r.get("model")})
    if not models:
        return
    print(f"\nHTTP front door: {http}")
    for model in models:
        print(f"  predict: POST {http}/v1/models/{model}:predict")
    print("  try it:")
    print(f"    curl -s {http}/v1/models/{models[0]}:predict -H 'Content-Type: application/json' \\\n"
          f"      -d \"{{\\\"instances\\\": [$(python3 -c 'print([0]*784)')]}}\"")


if __name__ == "__main__":
    main()
