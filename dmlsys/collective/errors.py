"""What collectives raise."""

from __future__ import annotations


class CollectiveError(RuntimeError):
    """A collective could not complete on every rank. ``missing`` lists the ranks to blame
    (dead, partitioned, or never arrived); empty when the ranks disagreed instead."""

    def __init__(self, message: str, *, missing: list[int] | None = None) -> None:
        super().__init__(message)
        self.missing = list(missing or [])
