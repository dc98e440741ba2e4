"""The assembly point: the role registry, transport factories, and ``System``, which builds
nodes from members with their roles' services and starts and stops them in a defined order.

It sits above every subsystem (it names their role factories, imported only when a node of that
role is built) and below the applications that run them: ``dmlsys.pipeline`` and
``dmlsys.cluster``. See docs/architecture.md.
"""

from dmlsys.assembly.roles import ROLES, EchoService, RoleContext, factory
from dmlsys.assembly.system import System, build_node
from dmlsys.assembly.transports import SimTransports, Transports, ZmqTransports

__all__ = ["ROLES", "EchoService", "RoleContext", "factory", "System", "build_node", "SimTransports", "Transports",
           "ZmqTransports"]
