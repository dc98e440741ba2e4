"""Helpers for the workflow tests (not a conftest: imported explicitly): random DAGs, recording steps."""

from __future__ import annotations

import threading

import xxhash
from hypothesis import strategies as st

from dmlsys.workflow import DEFAULT, NONE, Step, Workflow


@st.composite
def dags(draw, max_steps: int = 12):
    """(n, deps, declaration order): deps[i] is a set of indices < i, so the graph is acyclic."""
    n = draw(st.integers(1, max_steps))
    deps = [sorted(draw(st.sets(st.integers(0, i - 1), max_size=min(i, 4)))) if i else [] for i in range(n)]
    order = draw(st.permutations(range(n)))
    kinds = draw(st.lists(st.sampled_from(["inline", "thread", "async"]), min_size=n, max_size=n))
    return n, deps, order, kinds


class Recorder:
    """Makes step functions whose value is a hash of (name, params, inputs), and logs calls."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def _body(self, name: str, args: tuple, salt: object) -> str:
        with self.lock:
            self.events.append(("start", name))
        value = xxhash.xxh64_hexdigest((f"{name}|{salt}|" + "|".join(args)).encode())
        with self.lock:
            self.events.append(("end", name))
        return value

    def make(self, name: str, kind: str):
        if kind == "async":
            async def fn(*args, salt=0):
                return self._body(name, args, salt)
        else:
            def fn(*args, salt=0):
                return self._body(name, args, salt)
        return fn

    def calls(self) -> list[str]:
        return [n for e, n in self.events if e == "start"]


def build(n, deps, order, kinds, rec: Recorder, cached: bool = False, salts: dict | None = None) -> Workflow:
    salts = salts or {}
    steps = []
    for i in order:
        name = f"s{i}"
        steps.append(Step(name, rec.make(name, kinds[i]), [f"s{d}" for d in deps[i]],
                          params={"salt": salts.get(name, 0)}, inline=kinds[i] == "inline",
                          cache=DEFAULT if cached else NONE, version="1"))
    return Workflow("random", steps)
