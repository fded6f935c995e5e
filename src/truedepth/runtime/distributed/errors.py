"""What tensor parallelism reports when it cannot run, and how long it waits for a rank."""

from ...utils.errors import UserError

DEFAULT_TIMEOUT_S = 300.0  # long enough for a slow rank to finish loading a 7B model


class TPError(UserError):
    """A model, plan or launch that tensor parallelism cannot handle; the message names the fix."""


class RankFailureError(UserError, RuntimeError):
    """A collective failed because another rank died or stopped responding (seen by one rank, not all:
    unlike a TPError it is not the same on every rank). Still a RuntimeError for callers that caught one."""
