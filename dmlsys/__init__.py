"""dmlsys: a from-scratch distributed ML systems framework on asyncio and ZeroMQ."""

__version__ = "0.1.0"
