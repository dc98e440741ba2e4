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

from dmlsys.node import Service
from dmlsys.node.config import (
    DATA_DIR,
    config_bool,
    config_dir,
    config_int,
    config_seconds,
    unknown_keys,
)
from dmlsys.ps.server import PsConfig, PsService
from dmlsys.train import one_core_xla

PS_KEYS = {"checkpoint_every", "drop_timeout", "fsync"}
PS_WORKER_KEYS = {"data_dir", "single_thread"}


def ps_config(config: dict[str, Any], state_dir: str | Path) -> PsConfig:
    """Validate a ``ps`` node's ``[nodes.config]`` table."""
    unknown_keys(config, PS_KEYS)
    return PsConfig(str(state_dir), checkpoint_every=config_int(config, "checkpoint_every", 200),
                    drop_timeout=config_seconds(config, "drop_timeout", 30.0, most=86400.0),
                    fsync=config_bool(config, "fsync", True))


def build_ps(ctx) -> list[Service]:
    """Role factory (``ROLES["ps"] = "dmlsys.ps.roles:build_ps"``): one parameter-server shard."""
    return [PsService(ps_config(dict(ctx.config), Path(ctx.state_dir) / "ps" / ctx.name))]


def build_ps_worker(ctx) -> list[Service]:
    """Role factory (``ROLES["ps-worker"] = "dmlsys.ps.roles:build_ps_worker"``)."""
    from dmlsys.ps.worker import PsTrainingService

    config = dict(ctx.config)
    unknown_keys(config, PS_WORKER_KEYS)
    data_dir = config_dir(config, "data_dir", DATA_DIR)
    if config_bool(config, "single_thread"):  # several workers on one host
        one_core_xla()
    return [PsTrainingService(str(ctx.store), data_dir=data_dir)]
