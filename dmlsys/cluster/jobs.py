"""Work the supervisor does between bringing up phases of nodes (e.g. train before serving)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dmlsys.cluster.supervisor import Supervisor


async def before_phase(sup: "Supervisor", phase: str) -> None:
    """Called before each phase ("base", then "serving") of ``up``."""
