"""The function pool's fairness invariant as a watcher, shared by the tests and
``experiments/simulate.py``: no function waits at zero instances while an idle instance of
another function holds slots (issue 11; docs/events.md, "claims and priorities")."""

from __future__ import annotations

import asyncio

from dmlsys.events.pool import READY


async def watch_starvation(fp, worst: dict[str, float], idle_for: float, every: float = 0.01) -> None:
    """Records in ``worst`` each function's longest run of time with events waiting, no instance
    live (starting or ready), and an idle instance of another function holding slots: ready,
    nothing in flight, its function without an event (in flight or waiting) for ``idle_for``
    seconds. ``fp`` is a running :class:`~dmlsys.events.functions.FunctionPool`. Runs until
    cancelled."""
    loop = asyncio.get_running_loop()
    since: dict = {}
    busy: dict = {}  # function -> last time it had an event in flight or waiting
    while True:
        now = loop.time()
        for f in fp.pool.specs:
            if fp.in_flight[f] + fp.waiting[f] > 0 or f not in busy:
                busy[f] = now
        idle = {i.function for i in fp.pool.instances.values()
                if i.state == READY and i.in_flight == 0 and now - busy[i.function] > idle_for}
        for f in fp.pool.specs:
            if fp.waiting[f] > 0 and not fp.pool.live(f) and idle - {f}:
                worst[f] = max(worst.get(f, 0.0), now - since.setdefault(f, now))
            else:
                since.pop(f, None)
        await asyncio.sleep(every)
