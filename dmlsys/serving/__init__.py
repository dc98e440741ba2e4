"""Replicated model serving: replicas that batch, a balancer that probes and retries, an HTTP door.

* :mod:`dmlsys.serving.replica`   ``ModelService``: load, warm up, adaptive batching, atomic reload
* :mod:`dmlsys.serving.policies`  the pure balancer core: policies, pool, outlier ejection
* :mod:`dmlsys.serving.balancer`  its shell: probes, queue, retries, membership, rolling update
* :mod:`dmlsys.serving.gateway`   the HTTP front door (KServe v1 JSON) and ``serving`` RPCs
* :mod:`dmlsys.serving.roles`     cluster roles ``replica`` and ``gateway``

Heavy imports (JAX, aiohttp) happen in the modules that need them, not here.
"""
