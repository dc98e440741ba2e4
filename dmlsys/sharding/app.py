"""A sharded app: the four user-given functions the router and the shards run.

    split(request)              -> [(key, part), ...]    on the router: cut the request up
    handle(key, part, state)    -> (result, new_state)   on the key's shard (state None: no state yet;
                                                         new_state None: keep no state for the key)
    merge([result, ...])        -> merged                on the router, results in split order
    cleanup(merged)             -> answer                on the router: drop what the split made meaningless

``stateful`` apps keep per-key state on the key's owner shard, which alone serves the key;
stateless ones may be served by any shard (the router's retry then lands on the next one).

``split`` decides the keys, so it decides the shards: a key is routed through the hash ring, and
parts with the same key go to the same shard (where that key's state lives). Everything crossing
the wire (parts, results, states) must be what dmlsys.wire encodes: msgpack values and numpy
arrays. Apps are named in configs as ``"module:function"``, a function returning a ``ShardedApp``.

An app may also be reachable over HTTP (``http``, an ``HttpDoor``): ``POST /v1/models/{name}:{verb}``
on the router's door, its body turned into a request by ``parse(body, content_type)`` and the
answer into JSON by ``render(answer)``. The canvas app (:mod:`dmlsys.sharding.canvas`) is ``:tag``.

Two apps come with the package: ``identity`` (the split -> merge round trip, for tests and as
the template) and ``counter`` (a running sum per key: the smallest stateful app).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from dmlsys.sharding.errors import AppError


def _keep(merged: Any) -> Any:
    return merged


@dataclasses.dataclass(frozen=True)
class HttpDoor:
    """How an app is reached over HTTP: ``POST /v1/models/{app name}:{verb}``.

    ``parse(body, content_type) -> request`` raises ``BadRequest`` (400, or its ``status``) for
    a body it cannot read; ``render(answer) -> JSON-able`` shapes the reply."""

    verb: str
    parse: Callable[[bytes, str], Any]
    render: Callable[[Any], Any] = _keep


@dataclasses.dataclass(frozen=True)
class ShardedApp:
    name: str
    split: Callable[[Any], list[tuple[str, Any]]]
    handle: Callable[[str, Any, Any], tuple[Any, Any]]
    merge: Callable[[list[Any]], Any]
    cleanup: Callable[[Any], Any] = _keep
    # Stateful apps keep per-key state on the key's owner, and only the owner serves the key.
    # Stateless ones (tiles of an image) may be served by any shard: the ring only spreads them.
    stateful: bool = False
    http: HttpDoor | None = None


def load_app(target: str, options: dict[str, Any] | None = None) -> ShardedApp:
    """The app a config names as ``"module:function"``, called with ``options`` as keyword
    arguments (a config's ``app_options`` table). Raises AppError saying what is wrong."""
    module, sep, function = target.partition(":")
    if not sep or not module or not function:
        raise AppError(f"a sharded app is named \"module:function\", got {target!r}")
    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise AppError(f"cannot load sharded app {target!r}: {e}") from None
    try:
        inspect.signature(fn).bind(**(options or {}))
    except TypeError as e:
        raise AppError(f"sharded app {target!r} does not take the options {sorted(options or {})}: {e}") from None
    app = fn(**(options or {}))
    if not isinstance(app, ShardedApp):
        raise AppError(f"{target} returned {type(app).__name__}, not a ShardedApp")
    return app


# -- identity: a list cut into runs of ``chunk`` items, each echoed by its shard ----------------


def identity_split(request: dict) -> list[tuple[str, Any]]:
    """``{"items": [...], "chunk": n}`` -> one part per run of n items, keyed by its index."""
    items, chunk = request["items"], int(request.get("chunk", 1))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [(f"part-{i // chunk}", items[i:i + chunk]) for i in range(0, len(items), chunk)]


def identity_handle(key: str, part: Any, state: Any) -> tuple[Any, Any]:
    return part, state


def identity_merge(results: list[list]) -> list:
    return [x for r in results for x in r]


def identity() -> ShardedApp:
    return ShardedApp("identity", identity_split, identity_handle, identity_merge)


# -- counter: per-key running sums; a request adds to several keys at once ----------------------


def counter_split(request: dict) -> list[tuple[str, Any]]:
    """``{"add": {key: amount, ...}}`` -> one part per key."""
    return [(str(k), float(v)) for k, v in sorted(request["add"].items())]


def counter_handle(key: str, amount: float, state: Any) -> tuple[Any, Any]:
    total = (state or 0.0) + amount
    return [key, total], total


def counter_merge(results: list) -> dict:
    return {k: v for k, v in results}


def counter() -> ShardedApp:
    return ShardedApp("counter", counter_split, counter_handle, counter_merge, stateful=True)
