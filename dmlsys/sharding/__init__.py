"""Sharded services: where a key lives, and (next) a router that splits, scatters and merges.

* :mod:`dmlsys.sharding.ring`    the pure placement core: ``HashRing`` (virtual nodes with weights),
  ``JumpHash`` (numbered, append-only members), ``BoundedLoads`` (no member over its cap)
* :mod:`dmlsys.sharding.errors`  what the package raises

See docs/sharding.md.
"""

from dmlsys.sharding.errors import EmptyRing, MembershipError, PartFailed, ShardingError
from dmlsys.sharding.ring import (DEFAULT_VNODES, BoundedLoads, HashRing, JumpHash, Move, Placement, key_hash,
                                  key_hashes)

__all__ = ["BoundedLoads", "DEFAULT_VNODES", "EmptyRing", "HashRing", "JumpHash", "MembershipError", "Move",
           "PartFailed", "Placement", "ShardingError", "key_hash", "key_hashes"]
