"""Declaring a workflow: steps, their edges, and validation before anything runs (pure).

A **step** is a function (plain or ``async def``) plus what it needs:

* ``inputs`` — which steps' results it receives: a list of step names passed positionally,
  or a dict ``{argument name: step name}``; an entry may be an ``AsCompleted`` edge instead;
* ``params`` — fixed keyword arguments (configuration, hyperparameters);
* ``version``, ``cache`` — memoization (see ``policy``); ``retry``, ``timeout`` — robustness;
* ``inline`` — run a *cheap* sync function directly on the event loop instead of in a thread.

Two ways to declare the same thing::

    wf = Workflow("demo")

    @wf.step(params={"n": 100})
    def load(n): return list(range(n))

    @wf.step(inputs={"xs": "load"}, params={"p": 2})
    def power(xs, p): return [x ** p for x in xs]

    wf.add(Step("total", sum, inputs=["power"], inline=True))

An **asynchronous edge**, ``AsCompleted("a", "b", "c", k=1)``, lets a step start on partial
results: the argument is a dict ``{step name: result}`` of the sources finished so far, in the
order they finished. The step first runs once ``k`` sources have succeeded, then runs again
each time another one arrives (arrivals during a run are coalesced into one rerun), and its
*final* result — the one regular dependents receive — is that of the run that saw every source
that succeeded. Sources that fail only shrink the dict, as long as ``k`` of them succeed.

A **streaming edge**, ``Latest("a")``, passes a step's results on as they come, partial ones
included: the argument is ``a``'s newest result. The step first runs on ``a``'s first result
(a partial result of an ``AsCompleted`` step counts), reruns on each newer one, and is final
once ``a`` is final and it has run on ``a``'s final result. So ``select`` on an async edge
over three trainings can feed ``serve`` with ``Latest("select")``: the first model is served
as soon as it is trained, the best two once the second arrives.

``Workflow.validate()`` returns a ``Plan`` (topological order, dependency and child indices) or
raises an ``InvalidWorkflow`` naming the step: duplicate names, missing dependencies,
signatures that do not accept the declared inputs and params, inconsistent options, and cycles
(``CycleError`` lists the steps of one real cycle in order).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from .errors import CycleError, DuplicateStep, InvalidStep, MissingDependency, SignatureMismatch
from .policy import NONE, CachePolicy


@dataclasses.dataclass(frozen=True, slots=True, init=False)
class AsCompleted:
    """An asynchronous edge: the step may run once ``k`` of ``steps`` have finished, and reruns
    as the rest arrive. The argument it feeds is ``{step name: result}`` in completion order."""

    steps: tuple[str, ...]
    k: int

    def __init__(self, *steps: str, k: int = 1) -> None:
        if not steps:
            raise ValueError("AsCompleted needs at least one source step")
        if len(set(steps)) != len(steps):
            raise ValueError(f"AsCompleted{steps!r} names a step twice")
        if not 1 <= k <= len(steps):
            raise ValueError(f"AsCompleted k={k} must be between 1 and the number of sources ({len(steps)})")
        object.__setattr__(self, "steps", tuple(steps))
        object.__setattr__(self, "k", k)


class Latest(AsCompleted):
    """A streaming edge: the argument is ``step``'s newest result, partial ones included; the
    step reruns on each newer one (see the module docstring)."""

    __slots__ = ()

    def __init__(self, step: str) -> None:
        super().__init__(step, k=1)

    @property
    def step(self) -> str:
        return self.steps[0]


Edge = str | AsCompleted


@dataclasses.dataclass(frozen=True, slots=True)
class Retry:
    """Retry policy: up to ``attempts`` tries in all; before try n+1 wait
    ``min(backoff * factor**(n-1), max_delay)`` seconds. Only exceptions in ``on`` are retried."""

    attempts: int = 1
    backoff: float = 0.0
    factor: float = 2.0
    max_delay: float = 60.0
    on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Retry.attempts must be >= 1, got {self.attempts}")
        if self.backoff < 0 or self.factor < 1 or self.max_delay < 0:
            raise ValueError("Retry needs backoff >= 0, factor >= 1, max_delay >= 0")

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after the ``failed_attempt``-th try (1-based) failed."""
        return min(self.backoff * self.factor ** (failed_attempt - 1), self.max_delay)


NO_RETRY = Retry()


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Step:
    """One node of the DAG. See the module docstring for the meaning of each field."""

    name: str
    fn: Callable[..., Any]
    inputs: Sequence[Edge] | Mapping[str, Edge] = ()
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    version: str | None = None
    cache: CachePolicy = NONE
    retry: Retry = NO_RETRY
    timeout: float | None = None
    inline: bool = False
    # Derived in __post_init__: positional edges, keyword edges, unique dependency names.
    args: tuple[Edge, ...] = dataclasses.field(init=False, repr=False)
    kwargs: tuple[tuple[str, Edge], ...] = dataclasses.field(init=False, repr=False)
    deps: tuple[str, ...] = dataclasses.field(init=False, repr=False)
    is_async: bool = dataclasses.field(init=False, repr=False)
    has_async_edges: bool = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.inputs, Mapping):
            args, kwargs = (), tuple(self.inputs.items())
        elif isinstance(self.inputs, (str, AsCompleted)):
            args, kwargs = (self.inputs,), ()
        else:
            args, kwargs = tuple(self.inputs), ()
        deps: dict[str, None] = {}
        has_async_edges = False
        for edge in args + tuple(e for _, e in kwargs):
            if isinstance(edge, AsCompleted):
                has_async_edges = True
                deps.update(dict.fromkeys(edge.steps))
            else:
                deps[edge] = None
        object.__setattr__(self, "has_async_edges", has_async_edges)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", kwargs)
        object.__setattr__(self, "deps", tuple(deps))
        object.__setattr__(self, "is_async", inspect.iscoroutinefunction(self.fn))

    def replace(self, **changes: Any) -> "Step":
        """A copy with some fields changed (e.g. ``params``)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        fields.update(changes)
        return Step(**fields)


class Workflow:
    """An ordered collection of steps. Build it, then ``validate()`` or hand it to a scheduler."""

    def __init__(self, name: str = "workflow", steps: Iterable[Step] = ()) -> None:
        self.name = name
        self._steps: list[Step] = list(steps)

    def add(self, step: Step) -> Step:
        self._steps.append(step)
        return step

    def step(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
             inputs: Sequence[Edge] | Mapping[str, Edge] = (), params: Mapping[str, Any] | None = None,
             version: str | None = None, cache: CachePolicy = NONE, retry: Retry = NO_RETRY,
             timeout: float | None = None, inline: bool = False) -> Any:
        """Decorator: declare the function as a step (named after it unless ``name=``).
        The function is returned unchanged, so it stays directly callable in tests."""

        def register(f: Callable[..., Any]) -> Callable[..., Any]:
            self.add(Step(name or f.__name__, f, inputs, dict(params or {}), version, cache, retry, timeout, inline))
            return f

        return register(fn) if fn is not None else register

    def replace(self, name: str, **changes: Any) -> "Workflow":
        """A new workflow in which step ``name`` has ``changes`` applied (others shared)."""
        if name not in {s.name for s in self._steps}:
            raise MissingDependency("<replace>", name)
        return Workflow(self.name, [s.replace(**changes) if s.name == name else s for s in self._steps])

    def __iter__(self) -> Iterator[Step]:
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    def __getitem__(self, name: str) -> Step:
        for s in self._steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def validate(self) -> "Plan":
        return validate(self._steps)


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """A validated DAG. ``steps`` are in topological order; indices refer to that order.
    ``deps[i]`` / ``children[i]``: indices of the steps ``i`` needs / that need ``i``."""

    steps: tuple[Step, ...]
    index: Mapping[str, int]
    deps: tuple[tuple[int, ...], ...]
    children: tuple[tuple[int, ...], ...]

    @property
    def order(self) -> list[str]:
        return [s.name for s in self.steps]

    def descendants(self, name: str) -> set[str]:
        """Names of every step that (transitively) depends on ``name``."""
        seen: set[int] = set()
        stack = [self.index[name]]
        while stack:
            for c in self.children[stack.pop()]:
                if c not in seen:
                    seen.add(c)
                    stack.append(c)
        return {self.steps[i].name for i in seen}


_CO_VARARGS, _CO_VARKEYWORDS = inspect.CO_VARARGS, inspect.CO_VARKEYWORDS


def bind_problem(fn: Callable[..., Any], npos: int, kwnames: Iterable[str]) -> str | None:
    """Why ``fn(<npos positional arguments>, **{k: ... for k in kwnames})`` would not bind, or None.

    A plain Python function is read from its code object (a few µs: no ``inspect.Signature`` is
    built), so a graph of 10,000 distinct functions validates nearly as fast as one of a shared
    function; the answer is the one ``inspect.signature(fn).bind`` gives (a hypothesis test
    compares them). Anything else (a ``functools.partial``, a class, a bound method, a wrapper
    with ``__wrapped__`` or ``__signature__``, a builtin) goes through ``inspect``; a builtin
    without a signature is trusted."""
    if type(fn) is not _FunctionType or "__wrapped__" in fn.__dict__ or "__signature__" in fn.__dict__:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return None  # builtins without a signature: trust the declaration
        try:
            sig.bind(*range(npos), **dict.fromkeys(kwnames))
        except TypeError as e:
            return str(e)
        return None
    # The same checks in the same order as inspect.Signature._bind, so the same message.
    code = fn.__code__
    nargs, nposonly, flags = code.co_argcount, code.co_posonlyargcount, code.co_flags
    positional = code.co_varnames[:nargs]
    kwonly = code.co_varnames[nargs:nargs + code.co_kwonlyargcount]
    kwargs = dict.fromkeys(kwnames)
    for p in range(min(npos, nargs)):
        if p >= nposonly and positional[p] in kwargs:
            return f"multiple values for argument {positional[p]!r}"
    if npos > nargs and not flags & _CO_VARARGS:
        return "too many positional arguments"
    first_default = nargs - len(fn.__defaults__ or ())
    for p in range(npos, nargs):
        name = positional[p]
        if name in kwargs:
            if p < nposonly:
                return f"{name!r} parameter is positional only, but was passed as a keyword"
            del kwargs[name]
        elif p < first_default:
            return f"missing a required argument: {name!r}"
    kwdefaults = fn.__kwdefaults__ or {}
    for name in kwonly:
        if name in kwargs:
            del kwargs[name]
        elif name not in kwdefaults:
            return f"missing a required argument: {name!r}"
    if kwargs and not flags & _CO_VARKEYWORDS:
        return f"got an unexpected keyword argument {next(iter(kwargs))!r}"
    return None


_FunctionType = type(bind_problem)


def _check_signature(step: Step, seen: dict[tuple, str | None]) -> None:
    # Many steps share one function and one shape of call (10,000 no-op steps in the benchmark):
    # one check per (function, #positional, keyword names) and validate() call. The memo is
    # per call, not global: a global one would keep every function it saw alive.
    kwnames = tuple(sorted([k for k, _ in step.kwargs] + list(step.params))) if step.kwargs or step.params else ()
    shape = (step.fn, len(step.args), kwnames)
    try:
        problem = seen.get(shape, False)
    except TypeError:  # unhashable callable: just bind every time
        shape, problem = None, False
    if problem is False:
        problem = bind_problem(step.fn, len(step.args), kwnames)
        if shape is not None:
            seen[shape] = problem
    if problem is not None:
        raise SignatureMismatch(step.name, problem)
    if step.params and step.kwargs:
        overlap = set(step.params) & {k for k, _ in step.kwargs}
        if overlap:
            raise SignatureMismatch(step.name, f"{sorted(overlap)} given both as input and as param")


def validate(steps: Sequence[Step]) -> Plan:
    """Check ``steps`` and order them topologically: in the order they were declared if that is
    one (every step after its dependencies), else by Kahn's algorithm, ties in declaration order.

    Raises (each naming the step): DuplicateStep, MissingDependency, SignatureMismatch,
    InvalidStep, CycleError.
    """
    index: dict[str, int] = {}
    for i, s in enumerate(steps):
        if s.name in index:
            raise DuplicateStep(s.name)
        index[s.name] = i
    seen: dict[tuple, str | None] = {}
    for s in steps:
        for d in s.deps:
            if d not in index:
                raise MissingDependency(s.name, d)
        if s.inline and s.is_async:
            raise InvalidStep(s.name, "inline=True is for plain functions; a coroutine already runs on the loop")
        if s.inline and s.timeout is not None:
            raise InvalidStep(s.name, "an inline step cannot be interrupted, so it cannot have a timeout; drop inline=True")
        if s.timeout is not None and not s.timeout > 0:
            raise InvalidStep(s.name, f"timeout must be > 0 seconds, got {s.timeout!r}")
        _check_signature(s, seen)

    n = len(steps)
    deps = [tuple([index[d] for d in s.deps]) for s in steps]
    children: list[list[int]] = [[] for _ in range(n)]
    topological = True
    for i, ds in enumerate(deps):
        for d in ds:
            children[d].append(i)  # in increasing order of i: sorted
            if d >= i:  # a later step, or itself (a cycle)
                topological = False
    if topological:  # declared in a topological order already (the usual case): keep it
        return Plan(steps=tuple(steps), index=index, deps=tuple(deps), children=tuple(map(tuple, children)))
    indegree = [len(d) for d in deps]
    queue = collections.deque([i for i in range(n) if indegree[i] == 0])
    order: list[int] = []
    while queue:
        i = queue.popleft()
        order.append(i)
        for c in children[i]:
            indegree[c] -= 1
            if indegree[c] == 0:
                queue.append(c)
    if len(order) < n:
        raise CycleError(_find_cycle(steps, deps, {i for i in range(n) if indegree[i] > 0}))

    pos = {old: new for new, old in enumerate(order)}
    return Plan(
        steps=tuple(steps[i] for i in order),
        index={steps[i].name: pos[i] for i in order},
        deps=tuple(tuple(pos[d] for d in deps[i]) for i in order),
        children=tuple(tuple(sorted(pos[c] for c in children[i])) for i in order),
    )


def _find_cycle(steps: Sequence[Step], deps: list[tuple[int, ...]], stuck: set[int]) -> list[str]:
    """One cycle among the steps Kahn's algorithm could not order.

    Every stuck step has a stuck dependency (else its indegree would have reached 0), so
    walking from any stuck step to a stuck dependency must revisit a step: the walk from that
    step's first visit is a cycle. It is returned in data-flow order (each step feeds the next),
    with the first step repeated at the end."""
    start = min(stuck)
    path: list[int] = []
    seen: dict[int, int] = {}
    node = start
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(d for d in deps[node] if d in stuck)
    cycle = path[seen[node]:]  # each element depends on the next
    cycle.reverse()  # now each feeds the next
    return [steps[i].name for i in cycle] + [steps[cycle[0]].name]
