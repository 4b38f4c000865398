"""The writer's counters, shared by its parts and read from any thread."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WriterStats:
    """Counts since the publisher started (plain ints: a read from another thread is safe)."""
    frames_written: int = 0     # profile rows in Tiled
    rows_written: int = 0       # peak rows in Tiled
    snapshots_written: int = 0
    requests: int = 0           # write and read calls made to Tiled
    failures: int = 0           # failed attempts (retried, spooled or dropped)
    spooled: int = 0            # writes that went to the spool
    blocked: int = 0            # caller waits on a full queue
    errors: int = 0             # writes refused for good and dropped, writer-thread errors
    interrupted: int = 0        # runs of an earlier process marked "interrupted"
