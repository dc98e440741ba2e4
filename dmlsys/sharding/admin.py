"""What the cluster's supervisor asks of shards: hand keys over before a scale-down, and how many
keys and bytes each holds (``status``). Calls from a node that knows the shards by name.

Scale-down (``python -m dmlsys.cluster scale shard N``): every member about to be stopped is
asked to ``shard.leave`` with the whole list of leavers, at once; each pushes its keys, with
their state, to their owners on the ring without any leaver, and the receivers drop the leavers
from their rings on the spot. Only then does the supervisor stop them. A leaver that could not
hand everything over (its peers unreachable) makes the scale-down fail, naming it and its count
of keys, and nothing is stopped: its keys are still on it, and running ``scale`` again retries.

Scale-up needs nothing from here: a new member is in the directory the supervisor serves, every
shard's ring gains it within the directory's refresh (a second), and the old owners push it
exactly the keys whose owner it became.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dmlsys.node import NodeError
from dmlsys.sharding.errors import ShardingError

LEAVE_TIMEOUT = 60.0  # seconds a leaver may take to push its keys


async def hand_over(node, names: list[str], *, timeout: float = LEAVE_TIMEOUT) -> dict[str, int]:
    """Ask every shard in ``names`` to leave; {name: keys it handed over... or 0}. Raises
    ``ShardingError`` naming each shard that still holds keys (or did not answer)."""
    async def one(name: str) -> tuple[str, Any]:
        try:
            return name, await node.call(name, "shard", "leave", {"gone": sorted(names)}, timeout=timeout)
        except NodeError as e:
            return name, e

    results = dict(await asyncio.gather(*(one(n) for n in names)))
    stuck = {n: r for n, r in results.items() if not (isinstance(r, int) and r == 0)}
    if stuck:
        why = "; ".join(f"{n} did not answer ({r})" if isinstance(r, Exception) else f"{n} still holds {r} key(s)"
                        for n, r in sorted(stuck.items()))
        raise ShardingError(f"shards could not hand their keys over, so none was stopped: {why}; their keys stay "
                            f"with them (try the scale-down again once the other shards are ready)")
    return results


async def loads(node, names: list[str], *, timeout: float = 1.0) -> dict[str, dict[str, int]]:
    """{name: {"keys": n, "bytes": snapshot size}} of each shard that answered in ``timeout``."""
    async def one(name: str):
        try:
            status = await node.call(name, "node", "status", None, timeout=timeout)
            shard = status["services"]["shard"]
            return name, {"keys": int(shard["keys"]), "bytes": int(shard["bytes"])}
        except (NodeError, KeyError, TypeError, ValueError):
            return name, None

    return {n: load for n, load in await asyncio.gather(*(one(n) for n in names)) if load is not None}
