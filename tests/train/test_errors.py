"""One error hierarchy: dmlsys.train's errors derive from TrainError, which the package exports."""

from __future__ import annotations

import builtins
import inspect
from pathlib import Path

import dmlsys.train
from dmlsys.train import errors
from tests.collective.test_errors import raised_names

PACKAGE = Path(dmlsys.train.__file__).parent
# Modules that still raise builtin errors, and which: each entry is a to-do, not a licence.
NOT_YET = {
    "__main__.py": set(),
}


def test_every_error_class_derives_from_the_exported_root():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert classes and all(issubclass(c, errors.TrainError) for c in classes)
    assert all(getattr(dmlsys.train, c.__name__) is c for c in classes)


def test_no_module_raises_a_builtin_error_beyond_the_known_ones():
    offenders = {}
    for path in sorted(PACKAGE.glob("*.py")):
        bad = {n for n in raised_names(path) - NOT_YET.get(path.name, set())
               if isinstance(getattr(builtins, n, None), type) and issubclass(getattr(builtins, n), BaseException)}
        bad -= {"AttributeError"} if path.name == "__init__.py" else set()  # the module __getattr__ protocol
        if bad:
            offenders[path.name] = sorted(bad)
    assert not offenders, offenders
