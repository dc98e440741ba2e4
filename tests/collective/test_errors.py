"""One error hierarchy: everything dmlsys.collective raises derives from CollectiveError,
which the package exports."""

from __future__ import annotations

import ast
import builtins
import inspect
from pathlib import Path

import dmlsys.collective
from dmlsys.collective import errors

PACKAGE = Path(dmlsys.collective.__file__).parent
# Raised by the package but not its own, with the reason.
ALLOWED = {
    "ConfigError",  # the node layer's config error, which every role factory raises and the cluster reports
    "AssertionError",
}


def raised_names(path: Path) -> set[str]:
    """Names of the classes raised in a module (``raise X(...)`` and ``raise X``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(target, ast.Name):
                names.add(target.id)
    return names


def test_every_error_class_derives_from_the_exported_root():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert classes and all(issubclass(c, errors.CollectiveError) for c in classes)
    assert dmlsys.collective.CollectiveError is errors.CollectiveError


def test_no_module_raises_a_builtin_error_or_a_foreign_one():
    offenders = {}
    for path in sorted(PACKAGE.glob("*.py")):
        bad = {n for n in raised_names(path) - ALLOWED
               if isinstance(getattr(builtins, n, None), type) and issubclass(getattr(builtins, n), BaseException)}
        if bad:
            offenders[path.name] = sorted(bad)
    assert not offenders, offenders
