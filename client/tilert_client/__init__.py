"""Python SDK and CLI for the tilert text-generation service.

from tilert_client import Client

with Client("localhost:50051") as client:
    for event in client.stream("Hello", max_tokens=32):
        ...
"""

from tilert_client._version import __version__
from tilert_client.aio import AsyncClient, AsyncGenerateStream
from tilert_client.client import Client, GenerateStream
from tilert_client.errors import (
    AbortedError,
    AlreadyExistsError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ProtocolError,
    RequestCancelledError,
    ResourceExhaustedError,
    TilertError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)
from tilert_client.events import (
    Completion,
    Event,
    Finished,
    FinishReason,
    Started,
    Timing,
    TokenChunk,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from tilert_client.info import HealthStatus, ModelInfo, ServerInfo

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "AsyncClient",
    "AsyncGenerateStream",
    "Client",
    "Completion",
    "DataLossError",
    "DeadlineExceededError",
    "Event",
    "FailedPreconditionError",
    "FieldViolation",
    "FinishReason",
    "Finished",
    "GenerateStream",
    "HealthStatus",
    "InternalError",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ProtocolError",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "ServerInfo",
    "Started",
    "TilertError",
    "Timing",
    "TokenChunk",
    "TokenLogprob",
    "TopLogprob",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "Usage",
    "__version__",
]
