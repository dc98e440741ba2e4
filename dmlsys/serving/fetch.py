"""A replica makes sure the version it must serve is on its own host before it loads it.

On a cluster, the node's supervisor (``directory.supervisor``) hosts the cluster's ``store``
service (:class:`dmlsys.train.transfer.TransferService`; on a secondary host a relay to the
primary's). ``ensure_model`` asks it which version to serve (the one pinned, or the store's
latest), and when the replica's own store (``ReplicaConfig.store``) lacks that version it
fetches it over the wire, checked and written atomically, before the replica loads it. A
store directory shared by every host (NFS, say: point ``[cluster] store`` at it) already holds
the version, and nothing is fetched.

While the cluster's store does not have the model yet (the primary's workers are still
training it) or cannot be reached, the replica waits, its readiness gate saying why, up to
``wait`` seconds; then it fails with the reason. Without a supervisor (a ``System`` in a
test, a replica run by hand) the replica loads from its own store as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from dmlsys.serving.errors import ModelLoadError

log = logging.getLogger(__name__)

WAIT = 300.0  # seconds a replica waits for a model the cluster's store does not have yet
RETRY = 1.0


def _local_version(store: str, model: str, version: int | None) -> int | None:
    from dmlsys.train.errors import TrainError
    from dmlsys.train.store import ModelStore

    s = ModelStore(store)
    if version is None:
        return s.intact_version(model)
    try:
        return version if version in s.versions(model) else None
    except TrainError:  # ModelNotFound, StoreError: not here
        return None


async def ensure_model(node, store: str, model: str, version: int | None, *, on_wait: Callable[[str], None] | None = None,
                       wait: float = WAIT, retry: float = RETRY) -> int | None:
    """The version to load from ``store``, fetched there first if needed (see the module doc).

    Raises:
        ModelLoadError: the cluster's store never had the model within ``wait`` seconds, or
            every fetch failed; says why.
    """
    from dmlsys.node import NodeError, RemoteError
    from dmlsys.train.errors import ModelNotFound, StoreError
    from dmlsys.train.transfer import TransferError, fetch_model
    from dmlsys.wire.sim import to_thread

    peer = node.directory.supervisor
    if peer is None or peer == node.name or node.directory.get(peer) is None:
        return version
    deadline = time.monotonic() + wait
    want = "latest" if version is None else f"v{version}"
    while True:
        try:
            return await fetch_model(node, peer, store, model, version)
        except RemoteError as e:  # a supervisor without a store service (an older one): local only
            log.info("replica %s: %s has no model store service (%s); loading from %s", node.name, peer, e, store)
            return version
        except (ModelNotFound, TransferError, StoreError, NodeError, OSError) as e:
            why = str(e)
        local = await to_thread(_local_version, store, model, version)
        if local is not None and version is None and "not in the store" not in why:
            # The cluster's store is unreachable but this host has a version: serve it rather than nothing.
            log.warning("replica %s: the cluster's store is unreachable (%s); serving %s v%d from %s",
                        node.name, why, model, local, store)
            return local
        if local is not None and version is not None:
            return version
        if time.monotonic() > deadline:
            raise ModelLoadError(f"model {model!r} ({want}) is not in {store} and could not be fetched from the "
                                 f"cluster's store at {peer} within {wait:g}s: {why}")
        if on_wait is not None:
            on_wait(f"waiting for {model} ({want}) from the cluster's store at {peer}: {why}")
        await asyncio.sleep(retry)
