"""Event-driven processing: per-principal rate and concurrency limits in tiers, a fair bounded
event queue in front of a pool, and (later) functions autoscaled over a shared pool.

Pure cores live here (``limiter``, ``tiers``, ``queue``, ``autoscaler``): no sockets, no clocks.
See docs/events.md.
"""
