"""A live progress view of a run: a rich table (step, state, time, cache) redrawn a few times
a second while the run is going, left on screen when it ends.

The scheduler turns it on when stdout is a terminal (``RunConfig.progress=None``), so logs and
CI output stay clean. Long runs show the running steps and the most recently finished ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from .report import RunReport


@contextlib.asynccontextmanager
async def live_view(report: RunReport, *, rows: int = 20, interval: float = 0.25) -> AsyncIterator[None]:
    from rich.live import Live

    with Live(report.table(limit=rows), auto_refresh=False, transient=False) as live:

        async def refresh() -> None:
            while True:
                await asyncio.sleep(interval)
                live.update(report.table(limit=rows), refresh=True)

        task = asyncio.get_running_loop().create_task(refresh())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            live.update(report.table(limit=rows), refresh=True)
