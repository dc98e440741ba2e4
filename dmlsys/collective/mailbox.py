"""The ordered mailbox: where a rank's messages wait for the step that needs them.

Ranks run the same collective passes in the same order, but not in lockstep: a fast
predecessor's chunk for step 3 can arrive while we still wait for step 1's, and a peer that
already started pass 8 sends before we finished pass 7. So a message is not handed to
whoever happens to be waiting; it is filed under its address, and each step asks for the one
message it needs, by that address:

    ``(seq, tag, source)``: the pass number (every rank counts passes the same way), what the
    message is within the pass (for the ring: step and chunk index), and the sending rank.

Think of a wall of pigeonholes, one per address. ``put`` drops a message into its hole, or,
when someone already stands at that hole waiting, into their hand. ``get`` takes the message
from its hole, or waits there until it comes. Order is the addresses', never arrival's: each
getter receives exactly the message sent to its address, however the messages of one source,
or of many, interleave on the way.

Failure reaches every waiter. ``fail(seq, error)`` wakes each ``get`` of pass ``seq`` with
``error``, and every later ``get`` of that pass raises it at once: a pass that cannot finish
(a timeout, a dead peer, a peer that gave up, ranks that disagree) ends on every step that
waits in it. ``close(error)`` does this for every pass, now and to come.

Bounds: a peer decides what we hold, so ``max_messages`` and ``max_bytes`` cap what waits
unclaimed; a message over them is refused (``put`` returns False) and its pass times out,
naming that peer, rather than this node running out of memory. ``finish(seq)`` ends a pass:
its leftovers and everything older are dropped, and its late stragglers are refused.

The mailbox knows nothing of sockets, signatures or arrays: the process group feeds it and
its paths (direct, ring, shared memory) read it. Everything runs on one event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

from dmlsys.collective.errors import InvalidArgument

__all__ = ["Mailbox", "MailboxStats"]


@dataclasses.dataclass(frozen=True)
class MailboxStats:
    """What a mailbox holds right now."""

    messages: int  # delivered, not yet taken
    nbytes: int  # their size, as the box's ``size`` function counts it
    waiting: int  # gets parked until their message comes
    done_below: int  # passes below this number are finished


class Mailbox:
    """Messages keyed by ``(seq, tag, source)``, held until taken; see the module docstring.

    Example::

        box = Mailbox(max_messages=1024, max_bytes=1 << 20, size=len)
        box.put(0, ("step", 1), 2, b"hello")              # rank 2's message, before anyone asks
        await box.get(0, ("step", 1), 2)                  # -> b"hello"
        box.finish(0)                                     # pass 0 is over
    """

    __slots__ = ("_bytes", "_closed", "_done_below", "_failed", "_held", "_size", "_waiters", "max_bytes",
                 "max_messages")

    def __init__(self, *, max_messages: int = 1 << 16, max_bytes: int = 1 << 30,
                 size: Callable[[Any], int] = lambda message: 0) -> None:
        """``size(message)`` is what a message counts against ``max_bytes``; it is asked only
        of messages that must wait in the box, not of those handed straight to a waiter."""
        if max_messages < 0 or max_bytes < 0:
            raise InvalidArgument(f"mailbox bounds must be >= 0, got max_messages={max_messages}, max_bytes={max_bytes}")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._size = size
        self._held: dict[tuple[int, Hashable, int], tuple[Any, int]] = {}  # address -> (message, nbytes)
        self._bytes = 0
        self._waiters: dict[tuple[int, Hashable, int], asyncio.Future] = {}
        self._failed: dict[int, BaseException] = {}
        self._closed: BaseException | None = None
        self._done_below = 0

    def put(self, seq: int, tag: Hashable, source: int, message: Any) -> bool:
        """Deliver ``message`` to its address: to the ``get`` waiting there, else into the box.

        Returns False, keeping nothing, when the message is refused: its pass is finished, the
        box is closed, its address already holds a message (the first one stays), or keeping it
        would pass ``max_messages`` or ``max_bytes``. The caller decides whether to count that.
        """
        if seq < self._done_below or self._closed is not None:
            return False
        key = (seq, tag, source)
        fut = self._waiters.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(message)
            return True
        if key in self._held or len(self._held) >= self.max_messages:
            return False
        nbytes = self._size(message)
        if self._bytes + nbytes > self.max_bytes:
            return False
        self._held[key] = (message, nbytes)
        self._bytes += nbytes
        return True

    async def get(self, seq: int, tag: Hashable, source: int) -> Any:
        """The message at ``(seq, tag, source)``, waiting for it if it has not come yet.

        Raises:
            BaseException: the error pass ``seq`` failed with (``fail``), or the box's (``close``),
                whether it came before the call or while waiting.
        """
        key = (seq, tag, source)
        held = self._held.pop(key, None)
        if held is not None:
            self._bytes -= held[1]
            return held[0]
        error = self._closed or self._failed.get(seq)
        if error is not None:
            raise error
        fut = asyncio.get_running_loop().create_future()
        self._waiters[key] = fut
        try:
            return await fut
        finally:
            if self._waiters.get(key) is fut:  # cancelled, or woken by fail(): put() popped the others
                del self._waiters[key]

    def held(self, seq: int) -> list[tuple[Hashable, int, Any]]:
        """``(tag, source, message)`` of every message of pass ``seq`` waiting to be taken."""
        if not self._held:  # the common case, once per pass
            return []
        return [(k[1], k[2], m) for k, (m, _) in self._held.items() if k[0] == seq]

    def fail(self, seq: int, error: BaseException) -> None:
        """Pass ``seq`` cannot finish: every ``get`` of it, waiting now or called later until
        ``finish(seq)``, raises ``error``. A later ``fail`` of the same pass replaces ``error``
        for the gets still to come; those already woken keep theirs."""
        self._failed[seq] = error
        for key, fut in list(self._waiters.items()):
            if key[0] == seq and not fut.done():
                fut.set_exception(error)

    def failure(self, seq: int) -> BaseException | None:
        """What pass ``seq`` failed with, or None (also once the pass is finished)."""
        return self._failed.get(seq)

    def finish(self, seq: int) -> None:
        """Pass ``seq`` is over, and every pass before it: drop their messages and failures;
        refuse their stragglers from now on."""
        if seq >= self._done_below:
            self._done_below = seq + 1
        # Once per pass: each sweep only when there is something to sweep.
        if self._failed:
            for s in [s for s in self._failed if s <= seq]:
                del self._failed[s]
        if self._held:
            for key in [k for k in self._held if k[0] <= seq]:
                self._bytes -= self._held.pop(key)[1]
        if self._waiters:
            for key in [k for k, f in self._waiters.items() if k[0] <= seq and f.done()]:
                del self._waiters[key]

    def close(self, error: BaseException) -> None:
        """Fail every pass, now and to come, with ``error``; drop what is held, refuse the rest."""
        self._closed = error
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(error)
        self._held.clear()
        self._bytes = 0

    @property
    def done_below(self) -> int:
        """Passes below this number are finished: ``put`` refuses their messages."""
        return self._done_below

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def statistics(self) -> MailboxStats:
        return MailboxStats(messages=len(self._held), nbytes=self._bytes,
                            waiting=sum(not f.done() for f in self._waiters.values()),
                            done_below=self._done_below)
