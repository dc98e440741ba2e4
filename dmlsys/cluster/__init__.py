"""The cluster: specs, roles, the supervisor, and the ``python -m dmlsys.cluster`` CLI."""
