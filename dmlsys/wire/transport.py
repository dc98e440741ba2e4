"""The one seam between services and the network.

Every node talks through a ``Transport``. Two implementations share this interface:
``ZmqTransport`` (real sockets, real processes, real hosts) and ``SimTransport`` (an in-process
network with seeded faults and virtual time), so the same service code runs under both.

A transport moves opaque frame lists; it knows names and addresses but nothing of the codec.
Delivery is at most once and unordered across peers: what a sender needs beyond that
(replies, deadlines, retries) is the node's business, not the transport's.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Sequence

# Where a reply goes: a ZeroMQ routing identity, or a peer name in the simulation. Opaque to
# everyone but the transport that produced it.
Route = Any
# receiver(frames, route) or, from a transport that authenticates its peers,
# receiver(frames, route, principal): the name the sender proved to hold the key of.
Receiver = Callable[..., None]


class TransportError(RuntimeError):
    """A frame list could not be handed to the network (unknown peer, full queue, closed)."""


class Transport(abc.ABC):
    """Moves frame lists between named endpoints.

    Lifecycle: ``set_receiver`` then ``await start()``; ``send``/``reply`` any time after;
    ``await close()`` once. ``send`` and ``reply`` never block: they queue or raise.
    """

    name: str
    address: str  # where peers reach this endpoint (known after start())

    @abc.abstractmethod
    def set_receiver(self, receiver: Receiver) -> None:
        """Called on the event loop for every inbound frame list, with the route to reply on."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    def add_peer(self, name: str, address: str) -> None:
        """Teach this endpoint where ``name`` lives; connections are made lazily on first send."""

    @abc.abstractmethod
    def send(self, peer: str, frames: Sequence[Any]) -> None:
        """Queue ``frames`` for the named peer. Raises TransportError for an unknown peer."""

    @abc.abstractmethod
    def reply(self, route: Route, frames: Sequence[Any]) -> None:
        """Queue ``frames`` back along the route an inbound message arrived on."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    authenticated = False  # True: every inbound message comes with its sender's principal

    def counters(self) -> dict[str, int]:
        """Events of this endpoint's own by kind, e.g. bulk messages sealed or rejected (``dmlsys_transport_events``)."""
        return {}

    def set_refusal_observer(self, observer: Callable[[str, str], None]) -> None:
        """``observer(address, reason)`` on the event loop for each connection this endpoint
        refused. Only transports that authenticate refuse anyone; the rest ignore this."""

    def peers(self) -> dict[str, str]:
        return {}

    def is_local(self, peer: str) -> bool:
        """True when ``peer`` provably runs on this host (so that shared memory reaches it).
        Only the transport knows what its addresses mean; one that cannot tell says False."""
        return False
