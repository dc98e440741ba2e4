"""Sub-results kept by the router so that a retried request resumes instead of starting over.

A plain bounded LRU with a time to live, with the clock passed in (``now``) so it can be tested
without sleeping. An entry is one part's result, keyed by (request id, part index, part key): the
request id is the caller's promise that a retry is the same request, and the part's key guards
against a retry that splits differently. Expired entries are dropped when met and when the cache
is full; the oldest entry goes first when it is over ``max_entries``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

_MISSING = object()


class ResultCache:
    __slots__ = ("max_entries", "ttl", "_entries", "hits", "misses")

    def __init__(self, max_entries: int = 4096, ttl: float = 60.0) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        if not ttl > 0:
            raise ValueError(f"ttl must be > 0 seconds, got {ttl}")
        self.max_entries, self.ttl = max_entries, ttl
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, now: float, default: Any = None) -> Any:
        entry = self._entries.get(key, _MISSING)
        if entry is _MISSING or entry[0] <= now:
            if entry is not _MISSING:
                del self._entries[key]
            self.misses += 1
            return default
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: Hashable, value: Any, now: float) -> None:
        if self.max_entries == 0:
            return
        self._entries[key] = (now + self.ttl, value)
        self._entries.move_to_end(key)
        if len(self._entries) > self.max_entries:
            for k in [k for k, (until, _) in self._entries.items() if until <= now]:
                del self._entries[k]
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
