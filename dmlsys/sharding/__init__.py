"""Sharded services: where a key lives, a router that splits, scatters, gathers and merges, and
stateful shards whose keys move with their state.

* :mod:`dmlsys.sharding.ring`    the pure placement core: ``HashRing`` (virtual nodes with weights),
  ``JumpHash`` (numbered, append-only members), ``BoundedLoads`` (no member over its cap)
* :mod:`dmlsys.sharding.app`     ``ShardedApp``: the user's split, handle, merge and clean-up
* :mod:`dmlsys.sharding.router`  ``RouterService`` (role ``router``)
* :mod:`dmlsys.sharding.shard`   ``ShardService`` (role ``shard``) and its ``SnapshotStore``
* :mod:`dmlsys.sharding.cache`   the router's bounded TTL cache of sub-results
* :mod:`dmlsys.sharding.roles`   the role factories ``build_router`` and ``build_shard``
* :mod:`dmlsys.sharding.errors`  what the package raises

See docs/sharding.md.
"""

from dmlsys.sharding.app import ShardedApp
from dmlsys.sharding.errors import AppError, EmptyRing, MembershipError, NotOwner, PartFailed, ShardingError
from dmlsys.sharding.ring import (DEFAULT_VNODES, BoundedLoads, HashRing, JumpHash, Move, Placement, key_hash,
                                  key_hashes)

__all__ = ["AppError", "NotOwner", "ShardedApp", "BoundedLoads", "DEFAULT_VNODES", "EmptyRing", "HashRing", "JumpHash", "MembershipError", "Move",
           "PartFailed", "Placement", "ShardingError", "key_hash", "key_hashes"]
