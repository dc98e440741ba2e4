"""The cluster: specs, the supervisor, and the ``python -m dmlsys.cluster`` CLI.

Errors: ``ClusterError`` is the root of everything this package raises (``SpecError``,
``RecipeError``, ``CliError``)."""

from dmlsys.cluster.errors import CliError, ClusterError, RecipeError, SpecError

__all__ = ["ClusterError", "SpecError", "RecipeError", "CliError"]
