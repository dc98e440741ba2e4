"""dmlsys.workflow: a memoizing DAG scheduler on asyncio.

Declare steps (``Workflow``, ``Step``, ``AsCompleted`` for asynchronous edges), run them with
``Scheduler`` / ``run`` (fan-out up to a concurrency limit, fan-in, retries, timeouts, fail-fast
or continue), and memoize them in a ``MemoStore`` (SQLite index + blobs, no pickle) under
composable cache policies (``DEFAULT``, ``MaxAge``, ``Probe``, ``NONE``). See docs/workflow.md.
"""

from .dag import AsCompleted, Latest, NO_RETRY, Plan, Retry, Step, Workflow, validate
from .errors import (CacheError, CacheKeyError, CacheValueError, CycleError, DuplicateStep, InvalidStep,
                     InvalidWorkflow, MissingDependency, SignatureMismatch, StepTimeout, WorkflowError,
                     WorkflowFailed)
from .memo import cache_key, code_version, fingerprint
from .policy import CODE, DEFAULT, INPUTS, NONE, PARAMS, CachePolicy, MaxAge, Probe, file_stamp
from .report import RunReport, StepRecord
from .scheduler import CONTINUE, FAIL_FAST, RunConfig, RunResult, Scheduler, run
from .store import DEFAULT_ROOT, Entry, MemoStore

__all__ = [
    "AsCompleted", "Latest", "NO_RETRY", "Plan", "Retry", "Step", "Workflow", "validate",
    "CacheError", "CacheKeyError", "CacheValueError", "CycleError", "DuplicateStep", "InvalidStep",
    "InvalidWorkflow", "MissingDependency", "SignatureMismatch", "StepTimeout", "WorkflowError", "WorkflowFailed",
    "cache_key", "code_version", "fingerprint",
    "CODE", "DEFAULT", "INPUTS", "NONE", "PARAMS", "CachePolicy", "MaxAge", "Probe", "file_stamp",
    "RunReport", "StepRecord",
    "CONTINUE", "FAIL_FAST", "RunConfig", "RunResult", "Scheduler", "run",
    "DEFAULT_ROOT", "Entry", "MemoStore",
]
