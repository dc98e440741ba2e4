"""The balancer: each predict to a ready replica of its model, retried once elsewhere if that fails.

The balancer composes small pieces, one job each; this module holds the one job left, retries:

==================  ===============  ==========================================================
module              class            job
==================  ===============  ==========================================================
``membership``      ``Membership``   which replicas serve each model; probes; peer loss; holds
``policies``        ``Pool``         pure core: who is eligible, the policy's pick, ejection
``admission``       ``Admission``    in-flight slots per replica, the FIFO queue, Overloaded
``coalescing``      ``Coalescer``    same-turn predicts to one replica travel as one message
``versions``        ``VersionPins``  one version per model; replicas on another are reloaded
``rollout``         ``Rollout``      rolling update, one replica at a time
here                ``Balancer``     retries, and the contract below
==================  ===============  ==========================================================

**Retries.** A try that times out (``try_timeout``) or cannot be sent counts as a failure of its
replica (enough of them in a row eject it) and is retried once on another replica, if the
request's deadline leaves time. A timed-out try may have run on the dead replica, and that is
fine here: a prediction has no side effects, so running it twice costs only CPU. A refusal
that means nothing ran is retried at once elsewhere, at most ``max_not_ready_retries`` times,
and never counts against the replica: ``NotReady`` (loading or draining: also out of rotation
until its next probe), ``QueueFull`` and ``NodeBusy`` (healthy, only busy), and a reply from a
replica on a version that is not served. ``BadInput`` is never retried: it would fail anywhere.

**Turn affinity.** On the door's hot path (``predict_then``) the predicts of one loop turn ride
along, up to ``turn_affinity`` of them, in the message to the replica that the turn's first pick
went to, as long as that replica stays eligible and nobody is queued; the policy picks again
after that, and in every later turn. A replica's batcher then runs one larger batch, and the
gateway sends and decodes fewer messages: at 4 replicas with 64 clients (2026-12-06, loaded
machine) a message carried ~5 predicts without it, and the gateway's and the replicas' CPU per
request fell by about a third with it. The policy still decides who gets each turn's traffic;
what it no longer does is split one turn's arrivals among replicas. A request key
(consistent hashing) is never ridden along: its owner is the policy's to choose.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import random
from collections.abc import Callable
from typing import Any

from dmlsys.node import PeerUnreachable, RemoteError, RpcTimeout
from dmlsys.serving.admission import Admission
from dmlsys.serving.coalescing import Coalescer
from dmlsys.serving.errors import (
    BUSY_REMOTE,
    RETRIABLE_REMOTE,
    BadInput,
    DeadlineExceeded,
    QueueFull,
    ServingError,
    UnknownModel,
    from_remote,
)
from dmlsys.serving.membership import Membership
from dmlsys.serving.policies import DEFAULT_POLICY, EjectionConfig, Pool, make_policy
from dmlsys.serving.rollout import Rollout
from dmlsys.serving.versions import VersionPins
from dmlsys.wire.codec import WireError


@dataclasses.dataclass(frozen=True)
class BalancerConfig:
    policy: str = DEFAULT_POLICY
    probe_period: float = 0.5
    probe_timeout: float = 1.0
    try_timeout: float = 2.0  # one try; the request's deadline bounds the tries together
    max_in_flight: int = 64  # per replica
    max_queue: int = 1024  # per model
    max_not_ready_retries: int = 3  # refusals by loading/draining/busy replicas: nothing ran, cheap to retry
    models: tuple[str, ...] = ()  # serve only these (empty: every model a replica serves)
    # At most this many predicts of one loop turn ride along in the message to the replica the
    # turn's first pick went to (while it stays eligible), rather than each picked on its own:
    # fewer, larger messages and batches. 1: every predict is picked by the policy.
    turn_affinity: int = 16
    ejection: EjectionConfig = EjectionConfig()

    def __post_init__(self) -> None:
        make_policy(self.policy)  # raises for an unknown name
        for name in ("probe_period", "probe_timeout", "try_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.turn_affinity < 1:
            raise ValueError(f"turn_affinity must be >= 1 (1: every predict picked on its own), got {self.turn_affinity}")
        if self.max_in_flight < 1 or self.max_queue < 0:
            raise ValueError("max_in_flight must be >= 1 and max_queue >= 0")


class Balancer:
    """Sends predicts for a model to its replicas; answers with a replica's reply or a ServingError.

    Contract of :meth:`predict`: every request ends, by its deadline at the latest, with a reply
    from a replica that was ready on the model's served version, or with exactly one typed
    error (``UnknownModel`` 404, ``BadInput`` 400, ``NoReplicaReady``/``Overloaded``/``QueueFull``
    503, ``DeadlineExceeded`` 504, ``ServingError`` 500 for a replica's internal error). A
    request holds at most one replica's in-flight slot at a time, and none once it has ended.

    Lifecycle: ``start()`` (reads the directory, probes every replica once, then every
    ``probe_period``), ``stop()``. ``rollout`` moves a model to a version; ``models`` describes
    what is served.
    """

    def __init__(self, node, config: BalancerConfig = BalancerConfig(), *, rng: random.Random | None = None) -> None:
        self.node = node
        self.config = config
        self.admission = Admission(max_queue=config.max_queue, rng=rng or random.Random(),
                                   retry_after=max(1.0, config.probe_period))
        self.pins = VersionPins(node, reprobe=lambda pool, name: self.membership.probe(pool, name))
        self.membership = Membership(
            node, new_pool=self._new_pool, models=config.models, probe_period=config.probe_period,
            probe_timeout=config.probe_timeout, may_serve=self.pins.may_serve, on_change=self.admission.wake)
        self.coalescer = Coalescer(node)
        self._turn: dict[str, Any] = {}  # model -> the replica its latest pick went to (see turn_affinity)
        self._pools = self.membership.pools  # the same dict, for the hot path
        self._try_timeout = config.try_timeout
        self._rollout = Rollout(node, self.membership, self.pins, poll=min(0.05, config.probe_period))
        self.retries = 0  # tries retried on another replica
        self.failed = 0  # requests that failed after their tries

    def _new_pool(self, model: str) -> Pool:
        c = self.config
        return Pool(model, make_policy(c.policy), max_in_flight=c.max_in_flight, ejection=c.ejection)

    @property
    def pools(self) -> dict[str, Pool]:
        return self.membership.pools

    @property
    def pinned(self) -> dict[str, int]:
        return self.pins.pinned

    @property
    def failures(self) -> int:
        return self.failed + self.admission.refused

    def set_members(self, members) -> None:
        self.membership.set_members(members)

    async def probe_all(self) -> None:
        await self.membership.probe_all()

    async def start(self) -> None:
        await self.membership.start()

    async def stop(self) -> None:
        await self.membership.stop()
        await self.coalescer.stop()
        await self.pins.stop()

    def predict_nowait(self, model: str, body: dict[str, Any], *, deadline: float,
                       key: str | None = None) -> asyncio.Future | None:
        """:meth:`predict` without a task of its own for the common case: a future of what
        ``predict`` returns or raises; or None when nobody is free at once (then await
        ``predict``, which queues). See :meth:`predict_then`."""
        out = asyncio.get_running_loop().create_future()
        if not self.predict_then(model, body, deadline, key, _settle_with, out):
            return None
        return out

    def predict_then(self, model: str, body: dict[str, Any], deadline: float, key: str | None,
                     done: Callable[[Any, Any, Exception | None], None], arg: Any, now: float | None = None) -> bool:
        """:meth:`predict` for the door's hot path: False when no replica has a free slot now
        (then await ``predict``, which queues); else True, and ``done(arg, reply, None)`` or
        ``done(arg, None, error)`` is called exactly once, from a later turn of the loop.
        ``now``: the loop's time, when the caller has just read it.

        The first try is sent here; its outcome is handled by a callback when it is a reply
        from the served version, and otherwise handed to ``predict`` as its first try, which
        goes on exactly as if it had sent it (retries, errors, the contract above). At 64
        clients this spares the door a task, two coroutine frames and three futures per request.
        """
        pool = self._pools.get(model)
        if pool is None:
            return False
        if now is None:
            now = asyncio.get_running_loop().time()
        if deadline <= now:
            return False
        r = self._turn.get(model) if key is None else None
        if (r is not None and 0 < self.coalescer.open(r.name) < self.config.turn_affinity and r.ready
                and not r.draining and now >= r.ejected_until and r.in_flight < pool.max_in_flight
                and pool.replicas.get(r.name) is r and not self.admission.queued(model)):
            r.in_flight += 1  # this turn's message to r has room: ride along (see turn_affinity)
        else:
            r = self.admission.try_acquire(pool, now, key, ())
            if r is None:
                return False
            self._turn[model] = r
        self.coalescer.send_then(r.name, body, min(self._try_timeout, deadline - now), self._first_try_done,
                                 (pool, r, body, deadline, key, done, arg))
        return True

    def _first_try_done(self, try_: tuple, reply: Any, error: Exception | None) -> None:
        pool, r, body, deadline, key, done, arg = try_
        if error is None:
            version = reply.get("version")
            # pinned.get(...) == version is may_serve's common answer, without its call
            if version is None or self.pins.pinned.get(pool.model) == version or self.pins.may_serve(
                    pool, r.name, version):
                if r.failures:
                    pool.record_success(r)
                self.admission.release(pool, r)
                done(arg, reply, None)
                return
        first = asyncio.get_running_loop().create_future()  # the try, as predict takes it
        if error is None:
            first.set_result(reply)
        else:
            first.set_exception(error)
        rest = asyncio.get_running_loop().create_task(self.predict(pool.model, body, deadline=deadline, key=key,
                                                                   first=(r, first)))
        rest.add_done_callback(functools.partial(_settle, done, arg))

    async def predict(self, model: str, body: dict[str, Any], *, deadline: float, key: str | None = None,
                      first: tuple | None = None) -> dict:
        """Send one predict to a replica of ``model``; retry once elsewhere if that replica fails.

        ``body`` is a predict message (:mod:`dmlsys.serving.messages`); ``deadline`` is loop
        time; ``key`` feeds the consistent-hash policy. See the class docstring for what it raises.
        ``first``: (replica, its finished try) from ``predict_nowait``, whose slot this releases.
        """
        pool = self.membership.pools.get(model)
        if pool is None:
            raise UnknownModel(model, list(self.membership.pools))
        loop = asyncio.get_running_loop()
        admission, config = self.admission, self.config
        tried: list[str] = []
        failed_tries = refusals = 0
        last: Exception | None = None
        while True:
            if first is not None:
                (r, done), first = first, None
            else:
                done = None
                r = admission.try_acquire(pool, loop.time(), key, tried)
                if r is None:
                    r = await admission.acquire(pool, deadline, key, tried)
            remaining = deadline - loop.time()
            try:
                if done is not None:
                    reply = done.result()  # raises what the try raised
                else:
                    if remaining <= 0:
                        raise DeadlineExceeded(f"deadline passed before a replica of {model!r} was free")
                    timeout = min(config.try_timeout, remaining) if failed_tries == 0 else remaining
                    reply = await self.coalescer.send(r.name, body, timeout)
                pool.record_success(r)
                version = reply.get("version")
                if (version is not None and refusals < config.max_not_ready_retries
                        and not self.pins.may_serve(pool, r.name, version)):
                    # A replica restarted since its last probe, on another version: ask elsewhere.
                    refusals += 1
                    pool.observe(r.name, ready=False, serving=False, draining=True, version=version)
                    tried.append(r.name)
                    continue
                return reply
            except RemoteError as e:
                typed = from_remote(e.type, e.message)
                if isinstance(typed, BadInput):
                    pool.record_success(r)  # the replica is fine; the request is not
                    raise typed from None
                if e.type in BUSY_REMOTE:  # healthy but full: another replica, else 503 at once
                    if refusals < config.max_not_ready_retries:
                        refusals += 1
                        tried.append(r.name)
                        continue
                    raise QueueFull(f"model {model!r}: every replica tried is busy ({e.message})") from None
                if e.type in RETRIABLE_REMOTE and refusals < config.max_not_ready_retries:
                    refusals += 1  # nothing ran there: mark it and go elsewhere at once
                    pool.observe(r.name, ready=False, serving=r.serving, draining=True, version=r.version)
                    tried.append(r.name)
                    continue
                if e.type == "WireError":  # the replica refused our message: the message's fault, not its
                    raise ServingError(f"replica {r.name} refused the request: {e.message}") from None
                last = typed or ServingError(f"replica {r.name}: {e.type}: {e.message}")
                pool.record_failure(r, loop.time())
            except (RpcTimeout, PeerUnreachable) as e:
                last = e
                pool.record_failure(r, loop.time())
            except WireError as e:  # our own message cannot be sent: what it carries is too large
                raise BadInput(f"the request cannot be sent to a replica: {e}") from None
            finally:
                admission.release(pool, r)
            failed_tries += 1
            tried.append(r.name)
            if failed_tries >= 2 or deadline - loop.time() <= 0:
                self.failed += 1
                if isinstance(last, ServingError):
                    raise last
                raise DeadlineExceeded(f"model {model!r}: {last}")
            self.retries += 1

    async def rollout(self, model: str, version: int | None, *, ready_timeout: float = 300.0) -> dict[str, Any]:
        """Reload every replica of ``model`` to ``version``, one at a time, without failing a request
        (see :mod:`dmlsys.serving.rollout`)."""
        return await self._rollout.run(model, version, ready_timeout=ready_timeout)

    def models(self) -> dict[str, dict[str, Any]]:
        now = asyncio.get_running_loop().time()
        out = {}
        for model, pool in sorted(self.membership.pools.items()):
            ready = [r for r in pool.replicas.values() if r.ready and not r.draining]
            versions = sorted({r.version for r in ready if r.version is not None})
            out[model] = {"name": model, "versions": versions, "version": versions[-1] if versions else None,
                          "ready_replicas": sorted(r.name for r in ready), "replicas": len(pool.replicas),
                          "queued": self.admission.queued(model), **pool.summary(now)}
        return out


def _settle(done: Callable[[Any, Any, Exception | None], None], arg: Any, task: asyncio.Task) -> None:
    """``done`` hears how ``task`` ended (a cancelled task: CancelledError)."""
    if task.cancelled():
        done(arg, None, asyncio.CancelledError())
    elif task.exception() is not None:
        done(arg, None, task.exception())
    else:
        done(arg, task.result(), None)


def _settle_with(out: asyncio.Future, reply: Any, error: Exception | None) -> None:
    """``out`` ends as a ``predict_then`` did (unless its waiter is gone)."""
    if out.done():
        return
    if isinstance(error, asyncio.CancelledError):
        out.cancel()
    elif error is not None:
        out.set_exception(error)
    else:
        out.set_result(reply)
