"""Every ORM model of the scaibunker module, imported for Alembic and the app."""

from scaigrid.modules.scaibunker.accounting.models import UsageRecord
from scaigrid.modules.scaibunker.bunkers.models import Bunker, BunkerStatusEvent
from scaigrid.modules.scaibunker.images.models import Image
from scaigrid.modules.scaibunker.network.models import Bridge
from scaigrid.modules.scaibunker.quotas.models import (
    QuotaAssignment,
    QuotaBucketLock,
    QuotaContribution,
    QuotaProfile,
)
from scaigrid.modules.scaibunker.snapshots.models import Snapshot
from scaigrid.modules.scaibunker.workers.models import Worker, WorkerJoinToken

__all__ = [
    "Bridge",
    "Bunker",
    "BunkerStatusEvent",
    "Image",
    "QuotaAssignment",
    "QuotaBucketLock",
    "QuotaContribution",
    "QuotaProfile",
    "Snapshot",
    "UsageRecord",
    "Worker",
    "WorkerJoinToken",
]
