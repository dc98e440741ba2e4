"""Replicated model serving: replicas that batch, a balancer that probes and retries, an HTTP door.

* :mod:`dmlsys.serving.replica`     ``ModelService``: load, warm up, adaptive batching, atomic reload
* :mod:`dmlsys.serving.runtime`     a loaded, compiled model version
* :mod:`dmlsys.serving.instances`   request bodies to arrays, and the JSON answer
* :mod:`dmlsys.serving.messages`    what the gateway and a replica send each other; large bytes as frames
* :mod:`dmlsys.serving.balancer`    ``Balancer``: composes the pieces below, and retries
* :mod:`dmlsys.serving.membership`  which replicas serve each model; probes; peer loss
* :mod:`dmlsys.serving.policies`    the pure core: policies, pool, outlier ejection
* :mod:`dmlsys.serving.admission`   in-flight slots and the queue in front of them
* :mod:`dmlsys.serving.coalescing`  same-turn predicts to one replica as one message
* :mod:`dmlsys.serving.versions`    one version per model
* :mod:`dmlsys.serving.rollout`     rolling update
* :mod:`dmlsys.serving.gateway`     the HTTP front door (KServe v1 JSON) and ``serving`` RPCs
* :mod:`dmlsys.serving.http`        the small HTTP/1.1 server of the door and of a replica's own endpoint
* :mod:`dmlsys.serving.errors`      one error class per answer a client gets
* :mod:`dmlsys.serving.roles`       cluster roles ``replica`` and ``gateway``

Heavy imports (JAX) happen in the modules that need them, not here.
"""
