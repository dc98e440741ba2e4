"""The section-10 application: ingest Fashion-MNIST -> train three models -> select the best two
-> serve both -> aggregate, composed from the workflow library, the trainer, the collective,
serving and the assembly point. See docs/workflow.md.
"""

from .app import (DEFAULT_MODELS, ModelSpec, PipelineConfig, PipelineError, PipelineResult, apply_overrides,
                  build_workflow, run_pipeline, run_pipeline_async, select_top)
from .fleet import FLEETS, LocalFleet, NodeFleet, ServeError
from .workers import WorkerGroups

__all__ = ["DEFAULT_MODELS", "ModelSpec", "PipelineConfig", "PipelineError", "PipelineResult", "apply_overrides",
           "build_workflow", "run_pipeline", "run_pipeline_async", "select_top", "FLEETS", "LocalFleet", "NodeFleet",
           "ServeError", "WorkerGroups"]
