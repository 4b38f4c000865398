"""One exception base for the service. Errors on bad input are also ValueErrors."""


class ScatterflowError(Exception):
    """Base of all scatterflow service errors."""


class ConfigError(ScatterflowError, ValueError):
    """Invalid configuration; the message is one line naming the key."""


class RejectedInput(ScatterflowError, ValueError):
    """A message, document or frame refused at ingest. `reason` is the metrics label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class LimitExceeded(ScatterflowError, ValueError):
    """A size a run asks for is above its ceiling in ``limits``: the run is refused ("limits")."""
