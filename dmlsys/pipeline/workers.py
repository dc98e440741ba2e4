"""``trainer="workers"``: each model trained data-parallel on its own group of worker nodes.

For each model, ``size`` nodes of the cluster's ``worker`` role (collective + train services),
built in this process by the assembly point, and a client node that runs their jobs with
``train_on_workers``: the three trainings run at once, each over its own group (ring allreduce
between its ranks). All ranks share this process's CPU: it shows the collective trainer at
work, not a speed-up; on 2 cores the threads trainer is faster.
"""

from __future__ import annotations

from typing import Any, Sequence

from dmlsys.assembly import System, Transports, ZmqTransports
from dmlsys.collective.job import train_on_workers


class WorkerGroups:
    def __init__(self, store: str, data_dir: str, size: int, *, transports: Transports | None = None) -> None:
        self.size = size
        self.data_dir = data_dir
        self.system = System(transports or ZmqTransports(), store=store)
        self.groups: dict[str, list[str]] = {}
        self.client: Any = None

    async def start(self, models: Sequence[str]) -> None:
        for model in models:
            self.groups[model] = [f"worker-{model}-{i}" for i in range(self.size)]
            for name in self.groups[model]:
                self.system.add(name, "worker", config={"data_dir": self.data_dir})
        self.client = self.system.add("pipeline-trainer", "client")
        await self.system.start()

    async def train(self, model_spec: str, **job: Any) -> dict[str, Any]:
        return await train_on_workers(self.client, self.groups[model_spec], **job)

    async def stop(self) -> None:
        await self.system.stop(drain_timeout=5.0)
