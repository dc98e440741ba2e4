"""What the sharding package raises: one small hierarchy, each error naming the thing involved."""

from __future__ import annotations


class ShardingError(RuntimeError):
    """Base of every error this package raises."""


class EmptyRing(ShardingError):
    """A lookup on a placement with no members: there is nobody to own the key."""


class MembershipError(ShardingError, ValueError):
    """A member added twice, removed while unknown, or removed out of order from a jump hash."""


class PartFailed(ShardingError):
    """One part of a split request could not be served, so the whole request fails: never a
    partial answer. ``part`` is the part's index in the split, ``shard`` the last shard tried."""

    def __init__(self, message: str, *, part: int, shard: str | None) -> None:
        super().__init__(message)
        self.part = part
        self.shard = shard


class NotOwner(ShardingError):
    """A shard was asked for a key that the ring gives to another shard (the caller's ring is
    stale, or the key is moving): ask ``owner``."""


class AppError(ShardingError, ValueError):
    """A sharded app named in a config could not be loaded, or broke its contract."""
