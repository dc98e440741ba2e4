"""A simulated network in one process: seeded faults, virtual time, a replayable trace.

``SimNetwork`` hands out ``SimTransport`` endpoints. Each delivery is scheduled on the event loop
after a delay drawn from a seeded RNG, so links reorder naturally; links can also drop and
duplicate, and the network can be partitioned and endpoints crashed and restarted.

Run it on ``VirtualTimeLoop`` (``sim.run(main())``): the loop's clock jumps to the next timer
whenever nothing is ready, so a 30 s timeout costs microseconds of wall time, and because
nothing depends on the wall clock or on threads, the same seed gives the same trace.

    net = SimNetwork(seed=7, drop=0.1)
    a, b = net.transport("a"), net.transport("b")
    net.partition({"a"}, {"b"})    # nothing crosses until net.heal()
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import selectors
from typing import Any, Awaitable, Callable, Iterable, Sequence, TypeVar

import xxhash

from dmlsys.wire.transport import Receiver, Route, Transport, TransportError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class Link:
    """Behaviour of one direction of a link. Delays are seconds of virtual time."""

    delay: float = 0.001
    jitter: float = 0.001  # uniform extra delay in [0, jitter): this is what reorders; 0 keeps FIFO
    drop: float = 0.0
    duplicate: float = 0.0

    def __post_init__(self) -> None:
        if self.delay < 0 or self.jitter < 0:
            raise ValueError(f"Link delay and jitter must be >= 0, got {self.delay}, {self.jitter}")
        for name in ("drop", "duplicate"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"Link.{name} is a probability in [0, 1], got {p}")


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """One trace entry: what happened to one frame list on one link."""

    time: float
    src: str
    dst: str
    event: str  # "deliver" | "drop" | "duplicate" | "partitioned" | "down"
    digest: str


class SimNetwork:
    def __init__(self, seed: int = 0, *, link: Link | None = None) -> None:
        self.rng = random.Random(seed)
        self.default_link = link or Link()
        self.trace: list[Delivery] = []
        self._links: dict[tuple[str, str], Link] = {}
        self._endpoints: dict[str, SimTransport] = {}
        self._down: set[str] = set()
        self._groups: list[set[str]] | None = None
        self._crash_hooks: dict[str, list[Callable[[], None]]] = {}
        self._last_arrival: dict[tuple[str, str], float] = {}  # per link, for FIFO without jitter

    def transport(self, name: str) -> "SimTransport":
        """An endpoint named ``name``; a restarted endpoint reuses its name."""
        endpoint = SimTransport(self, name)
        self._endpoints[name] = endpoint
        self._down.discard(name)
        return endpoint

    # -- faults ---------------------------------------------------------------------------

    def set_link(self, src: str, dst: str, link: Link) -> None:
        self._links[(src, dst)] = link

    def partition(self, *groups: Iterable[str]) -> None:
        """Only endpoints in the same group can talk; endpoints in no group talk to no one."""
        self._groups = [set(g) for g in groups]

    def heal(self) -> None:
        self._groups = None

    def crash(self, name: str) -> None:
        """The endpoint goes dark: nothing in flight to it arrives, nothing it sends leaves."""
        self._down.add(name)
        for hook in self._crash_hooks.pop(name, []):
            hook()

    def on_crash(self, name: str, hook: Callable[[], None]) -> None:
        self._crash_hooks.setdefault(name, []).append(hook)

    def is_down(self, name: str) -> bool:
        return name in self._down

    # -- delivery -------------------------------------------------------------------------

    def _reachable(self, src: str, dst: str) -> bool:
        if self._groups is None:
            return True
        return any(src in g and dst in g for g in self._groups)

    def _transmit(self, src: str, dst: str, frames: Sequence[Any], route: Route) -> None:
        loop = asyncio.get_running_loop()
        payload = [bytes(_buffer(f)) for f in frames]  # the wire copies; no aliasing between nodes
        digest = xxhash.xxh3_64_hexdigest(b"".join(payload))
        now = loop.time()
        if src in self._down or dst in self._down:
            self.trace.append(Delivery(now, src, dst, "down", digest))
            return
        if not self._reachable(src, dst):
            self.trace.append(Delivery(now, src, dst, "partitioned", digest))
            return
        link = self._links.get((src, dst), self.default_link)
        if self.rng.random() < link.drop:
            self.trace.append(Delivery(now, src, dst, "drop", digest))
            return
        copies = 2 if self.rng.random() < link.duplicate else 1
        for copy in range(copies):
            when = now + link.delay + self.rng.random() * link.jitter
            if not link.jitter:
                # A link without jitter is FIFO, like a TCP connection. The loop's timer heap does
                # not keep insertion order among equal times, so step each arrival past the last.
                when = max(when, self._last_arrival.get((src, dst), -1.0) + 1e-9)
                self._last_arrival[(src, dst)] = when
            loop.call_at(when, self._arrive, src, dst, payload, route, digest, copy)

    def _arrive(self, src: str, dst: str, payload: list[bytes], route: Route, digest: str, copy: int) -> None:
        now = asyncio.get_running_loop().time()
        endpoint = self._endpoints.get(dst)
        if endpoint is None or dst in self._down or src in self._down or endpoint._closed:
            self.trace.append(Delivery(now, src, dst, "down", digest))
            return
        if not self._reachable(src, dst):
            self.trace.append(Delivery(now, src, dst, "partitioned", digest))
            return
        self.trace.append(Delivery(now, src, dst, "duplicate" if copy else "deliver", digest))
        if endpoint._receiver is not None:
            endpoint._receiver(payload, route)


class SimTransport(Transport):
    def __init__(self, net: SimNetwork, name: str) -> None:
        self.name = name
        self.address = f"sim://{name}"
        self._net = net
        self._receiver: Receiver | None = None
        self._closed = False

    def set_receiver(self, receiver: Receiver) -> None:
        self._receiver = receiver

    async def start(self) -> None:
        pass

    def add_peer(self, name: str, address: str) -> None:
        pass  # every name is reachable by name in the simulation

    def send(self, peer: str, frames: Sequence[Any]) -> None:
        if self._closed:
            raise TransportError(f"transport of {self.name!r} is closed")
        self._net._transmit(self.name, peer, frames, self.name)

    def reply(self, route: Route, frames: Sequence[Any]) -> None:
        self.send(route, frames)

    async def close(self) -> None:
        self._closed = True


def _buffer(frame: Any) -> Any:
    return getattr(frame, "buffer", frame)


# -- virtual time ---------------------------------------------------------------------------


class _VirtualSelector(selectors.DefaultSelector):
    """Polls real file descriptors without waiting; when nothing is ready, advances the clock.

    asyncio asks the selector to wait exactly until the next timer is due; we jump there instead.
    Only when no timer is pending at all (timeout None) do we really block, for the self-pipe
    that wakes the loop from another thread.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None):  # type: ignore[override]
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            return super().select(None)
        self.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is virtual. Do not use threads under it: they run in wall
    time while the loop skips ahead, so their results would arrive "late"."""

    virtual_time = True  # what code that measures durations checks to use loop.time() over the wall clock

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)

    def time(self) -> float:
        return self._virtual.now


async def to_thread(fn: Callable[..., T], *args: Any) -> T:
    """``asyncio.to_thread(fn, *args)``, except on a VirtualTimeLoop: there a thread would run
    in wall time while the clock skips ahead (every deadline would pass while it computes), so
    ``fn`` runs on the loop itself and a simulated run replays exactly. Code that offloads
    blocking work and may also run on the simulated network calls this."""
    if getattr(asyncio.get_running_loop(), "virtual_time", False):
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def run(main: Awaitable[T]) -> T:
    """Run a coroutine to completion on a fresh VirtualTimeLoop, then close the loop."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
