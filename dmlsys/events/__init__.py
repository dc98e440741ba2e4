"""Event-driven processing: per-principal rate and concurrency limits in tiers, a fair bounded
event queue in front of a pool, and functions autoscaled over a shared pool.

Pure cores (``tiers``, ``limiter``, ``queue``, ``autoscaler``, ``pool``): no sockets, no clocks.
Shells: ``gate`` (what the HTTP front door calls) and ``functions`` (events on instances).
See docs/events.md.
"""
