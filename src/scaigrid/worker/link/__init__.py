"""The worker's channel to the controller: connection, registration, heartbeat, task dispatch.

Public surface:

* :class:`LinkClient` keeps one outbound WebSocket to the controller (SPEC §10.3-10.5).
* :class:`HandlerSpec`, :class:`Task`, :class:`TaskFailed` describe and run task kinds.
* :func:`build_handlers` (in :mod:`scaigrid.worker.link.handlers`) wires the task contract to
  the bunker supervisor.
"""

from scaigrid.worker.link.client import LinkAuthRejected, LinkClient, LinkConfigError, WorkerStatus
from scaigrid.worker.link.tasks import HandlerSpec, Task, TaskFailed

__all__ = [
    "HandlerSpec",
    "LinkAuthRejected",
    "LinkClient",
    "LinkConfigError",
    "Task",
    "TaskFailed",
    "WorkerStatus",
]
