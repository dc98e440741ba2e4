"""Sharded services: where a key lives, a router that splits, scatters, gathers and merges, and
stateful shards whose keys move with their state.

* :mod:`dmlsys.sharding.ring`    the pure placement core: ``HashRing`` (virtual nodes with weights),
  ``JumpHash`` (numbered, append-only members), ``BoundedLoads`` (no member over its cap)
* :mod:`dmlsys.sharding.app`     ``ShardedApp``: the user's split, handle, merge and clean-up
* :mod:`dmlsys.sharding.router`  ``RouterService`` (role ``router``)
* :mod:`dmlsys.sharding.shard`   ``ShardService`` (role ``shard``) and its ``SnapshotStore``
* :mod:`dmlsys.sharding.cache`   the router's bounded TTL cache of sub-results
* :mod:`dmlsys.sharding.roles`   the role factories ``build_router`` and ``build_shard``
* :mod:`dmlsys.sharding.door`    the router's HTTP door (``POST /v1/models/{app}:{verb}``), ``router.http``'s
  core, and ``check_input``: the 413 a capped replica answers
* :mod:`dmlsys.sharding.png`     8-bit greyscale PNG with numpy and zlib (the canvas over HTTP)
* :mod:`dmlsys.sharding.admin`   what the supervisor asks of shards: hand keys over (scale-down), keys and bytes
* :mod:`dmlsys.sharding.canvas`  the course's scenario: tag the garments on a huge Fashion-MNIST canvas
* :mod:`dmlsys.sharding.errors`  what the package raises

See docs/sharding.md.
"""

from dmlsys.sharding.app import ShardedApp
from dmlsys.sharding.errors import (AppError, BadRequest, EmptyRing, InputTooLarge, MembershipError, NotOwner, PartFailed,
                                   ShardingError, ShardLeft)
from dmlsys.sharding.ring import (DEFAULT_VNODES, BoundedLoads, HashRing, JumpHash, Move, Placement, key_hash,
                                  key_hashes)

__all__ = ["AppError", "BadRequest", "InputTooLarge", "NotOwner", "ShardLeft", "ShardedApp", "BoundedLoads", "DEFAULT_VNODES", "EmptyRing", "HashRing", "JumpHash", "MembershipError", "Move",
           "PartFailed", "Placement", "ShardingError", "key_hash", "key_hashes"]
