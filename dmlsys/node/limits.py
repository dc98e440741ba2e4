"""What one node takes on at once, and for how long, whatever its peers ask.

The wire's ``Limits`` bound what one message may hold; these bound what a node does with the
messages it accepts. Both are checked where a message arrives, and each refusal is answered
with an error that names the limit, so a caller never waits out its timeout to learn of it.
"""

from __future__ import annotations

import dataclasses
import math

BUSY = "NodeBusy"  # the error type a caller's RemoteError carries when a node is at max_in_flight


@dataclasses.dataclass(frozen=True, slots=True)
class NodeLimits:
    """``max_in_flight``: handlers that run as tasks (coroutines) at once on one node; a request
    past it is answered at once with ``NodeBusy: node X busy: N in flight (limit L)``, a one-way
    message past it is dropped and counted (``dmlsys_errors{kind="busy"}``). Inline (plain
    function) handlers finish before the next message is read, so they need no bound.

    ``default_deadline_s``: how long a request that states no deadline (``Node.call`` always
    states one; a hand-made or foreign client may not) may keep its handler running. Past it the
    handler is cancelled and the caller gets ``TimeoutError``.
    """

    max_in_flight: int = 1024
    default_deadline_s: float = 300.0

    def __post_init__(self) -> None:
        if type(self.max_in_flight) is not int or self.max_in_flight < 1:
            raise ValueError(f"NodeLimits.max_in_flight must be an int >= 1, got {self.max_in_flight!r}")
        d = self.default_deadline_s
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not math.isfinite(d) or d <= 0:
            raise ValueError(f"NodeLimits.default_deadline_s must be a finite number of seconds > 0, got {d!r}")


DEFAULT_NODE_LIMITS = NodeLimits()
