"""What can go wrong when a workflow is declared, run or memoized.

Every error names the step (or cache key, or file) involved and says what to do about it.
``WorkflowError`` is the base: catch it to catch everything this subsystem raises on purpose.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence


class WorkflowError(Exception):
    """Base of every error raised by dmlsys.workflow."""


# ----------------------------------------------------------------------------- declaration
class InvalidWorkflow(WorkflowError):
    """The DAG is malformed; raised by validation before any step runs."""


class CycleError(InvalidWorkflow):
    """The dependencies form a cycle. ``cycle`` lists the steps in order, first == last."""

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle = tuple(cycle)
        super().__init__(
            "dependency cycle: " + " -> ".join(self.cycle)
            + "; remove one of these edges (a step cannot depend on its own result)"
        )


class MissingDependency(InvalidWorkflow):
    def __init__(self, step: str, missing: str) -> None:
        self.step, self.missing = step, missing
        super().__init__(
            f"step {step!r} depends on {missing!r}, which is not a step of this workflow; "
            "add it or fix the name"
        )


class DuplicateStep(InvalidWorkflow):
    def __init__(self, step: str) -> None:
        self.step = step
        super().__init__(f"two steps are named {step!r}; give each step a unique name")


class SignatureMismatch(InvalidWorkflow):
    def __init__(self, step: str, detail: str) -> None:
        self.step = step
        super().__init__(
            f"step {step!r}: its function cannot be called with the declared inputs and params ({detail}); "
            "make the function's parameters match inputs= and params="
        )


class InvalidStep(InvalidWorkflow):
    """A step's own options are inconsistent (e.g. a timeout on an inline step)."""

    def __init__(self, step: str, detail: str) -> None:
        self.step = step
        super().__init__(f"step {step!r}: {detail}")


# ----------------------------------------------------------------------------- running
class StepTimeout(WorkflowError, TimeoutError):
    def __init__(self, step: str, timeout: float) -> None:
        self.step, self.timeout = step, timeout
        super().__init__(f"step {step!r} did not finish within its timeout of {timeout:g}s; raise timeout= or speed it up")


class WorkflowFailed(WorkflowError):
    """One or more steps failed. ``errors`` maps step name -> the exception of its last attempt;
    ``result`` is the partial ``RunResult`` (what finished, and the full report)."""

    def __init__(self, errors: Mapping[str, BaseException], result: Any) -> None:
        self.errors = dict(errors)
        self.result = result
        first = next(iter(self.errors.items()))
        more = f" (and {len(self.errors) - 1} more: {', '.join(list(self.errors)[1:])})" if len(self.errors) > 1 else ""
        super().__init__(f"step {first[0]!r} failed: {type(first[1]).__name__}: {first[1]}{more}")


# ----------------------------------------------------------------------------- memoization
class CacheError(WorkflowError):
    """The memo store could not be used (bad root, corrupt index)."""


class CacheKeyError(CacheError, TypeError):
    """A value that must be fingerprinted (a param, an input, a probe's result) has no canonical
    encoding. Only plain data, numpy/JAX arrays, and dataclasses/tuples/lists/dicts of them do."""

    def __init__(self, step: str, what: str, detail: str) -> None:
        self.step, self.what = step, what
        super().__init__(
            f"step {step!r}: cannot fingerprint {what}: {detail}; pass plain data or arrays, "
            "or set cache=NONE on this step"
        )


class CacheValueError(CacheError, TypeError):
    """A step's result cannot be stored without pickle."""

    def __init__(self, step: str, detail: str) -> None:
        self.step = step
        super().__init__(
            f"step {step!r}: its result cannot be memoized ({detail}); return plain data, numpy/JAX "
            "arrays or containers of them, or set cache=NONE on this step"
        )
