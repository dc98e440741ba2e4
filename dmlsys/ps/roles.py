"""Cluster role ``ps``: a parameter-server shard.

    [[nodes]]
    name = "ps"
    role = "ps"
    replicas = 2
    [nodes.config]
    checkpoint_every = 200   # log records between checkpoints (each push is logged, fsynced, then acked)
    drop_timeout = 30.0      # seconds a silent worker may hold up waiting reads before it is dropped
    fsync = true             # false only for throwaway jobs: an ack then survives a process crash, not a power cut

The node hosts one :class:`~dmlsys.ps.server.PsService`; its jobs live under
``<state_dir>/ps/<node name>/<job>/`` (checkpoint and write-ahead log), where a restarted node
finds them. Every bad config value raises ``ConfigError(key, what was expected)``.

Cluster role ``ps-worker``: a node that trains through parameter servers (``train.run`` with
``shards`` and ``consistency``, see :mod:`dmlsys.ps.worker`)::

    [[nodes]]
    name = "psworker"
    role = "ps-worker"
    replicas = 2
    [nodes.config]
    data_dir = "/usr/share/datasets/fashion-mnist"   # optional
    single_thread = false                            # true: XLA on one core (several workers per host)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dmlsys.node import ConfigError, Service
from dmlsys.ps.server import PsConfig, PsService

PS_KEYS = {"checkpoint_every", "drop_timeout", "fsync"}
PS_WORKER_KEYS = {"data_dir", "single_thread"}


def ps_config(config: dict[str, Any], state_dir: str | Path) -> PsConfig:
    """Validate a ``ps`` node's ``[nodes.config]`` table."""
    extra = sorted(set(config) - PS_KEYS)
    if extra:
        raise ConfigError(extra[0], f"unknown key (known: {', '.join(sorted(PS_KEYS))})")
    every = config.get("checkpoint_every", 200)
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ConfigError("checkpoint_every", f"an integer >= 1, got {every!r}")
    timeout = config.get("drop_timeout", 30.0)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 86400:
        raise ConfigError("drop_timeout", f"seconds in (0, 86400], got {timeout!r}")
    fsync = config.get("fsync", True)
    if not isinstance(fsync, bool):
        raise ConfigError("fsync", f"true or false, got {fsync!r}")
    return PsConfig(str(state_dir), checkpoint_every=every, drop_timeout=float(timeout), fsync=fsync)


def build_ps(ctx) -> list[Service]:
    """Role factory (``ROLES["ps"] = "dmlsys.ps.roles:build_ps"``): one parameter-server shard."""
    return [PsService(ps_config(dict(ctx.config), Path(ctx.state_dir) / "ps" / ctx.name))]


def build_ps_worker(ctx) -> list[Service]:
    """Role factory (``ROLES["ps-worker"] = "dmlsys.ps.roles:build_ps_worker"``)."""
    import os

    from dmlsys.ps.worker import PsTrainingService

    config = dict(ctx.config)
    extra = sorted(set(config) - PS_WORKER_KEYS)
    if extra:
        raise ConfigError(extra[0], f"unknown key (known: {', '.join(sorted(PS_WORKER_KEYS))})")
    data_dir = config.get("data_dir")
    if data_dir is not None and (not isinstance(data_dir, str) or not data_dir):
        raise ConfigError("data_dir", f"a directory holding the Fashion-MNIST IDX files, got {data_dir!r}")
    if not isinstance(config.get("single_thread", False), bool):
        raise ConfigError("single_thread", f"true or false, got {config['single_thread']!r}")
    if config.get("single_thread"):
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    return [PsTrainingService(str(ctx.store), data_dir=data_dir)]
