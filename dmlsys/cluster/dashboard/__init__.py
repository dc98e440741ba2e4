"""The cluster's web dashboard, served by the supervisor (``[cluster] dashboard = "HOST:PORT"``).

:mod:`.series` is its pure core (rates and quantiles from running totals); :mod:`.server` the
aiohttp app that gathers what the nodes expose and streams it to the page under ``static/``
(plain HTML, CSS and one script: no build step). See docs/deploy.md, "The dashboard".
"""

from dmlsys.cluster.dashboard.server import Dashboard

__all__ = ["Dashboard"]
