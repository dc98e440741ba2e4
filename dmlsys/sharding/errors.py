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


class ShardLeft(NotOwner):
    """The shard asked has left the ring (scale-down): it serves and takes nothing any more, and
    every key it held is with the shard that now owns it. Routers drop it from their rings."""


class InputTooLarge(ShardingError, ValueError):
    """A request's input is over a configured cap (``limit`` bytes): HTTP 413. The message names
    the cap and where it is set, and says where a request that large can go (the router)."""

    status = 413

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class BadRequest(ShardingError, ValueError):
    """A request the app cannot read (a malformed PNG, a JSON array that is not a 2-D canvas): HTTP
    400 (or ``status``, e.g. 415 for a media type the door does not take)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
