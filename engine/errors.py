"""Errors the engine raises for the service to map onto gRPC statuses."""


class EngineError(Exception):
    """Base class of engine errors."""


class CheckpointError(EngineError):
    """A checkpoint is missing, malformed or of an unsupported kind.

    The message names the file, tensor or config field at fault.
    """


class WorkerDied(EngineError):
    """A worker process exited or stopped making progress."""


class EngineUnavailable(EngineError):
    """The engine is not ready, is draining, or has no live worker."""


class QueueFull(EngineError):
    """The bounded request queue is full."""


class DuplicateRequest(EngineError):
    """A request with the same id is already queued or generating."""
