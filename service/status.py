"""One place that maps failures to gRPC statuses, with google.rpc details."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tilert.engine.errors import (
    CheckpointError,
    DuplicateRequest,
    EngineUnavailable,
    QueueFull,
    WorkerDied,
)


class InvalidRequest(ValueError):
    """A request field is invalid; `field` is its path, e.g. "sampling.top_p"."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


def invalid_argument_status(err: InvalidRequest) -> grpc.Status:
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=err.field, description=err.description
                )
            ]
        )
    )
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(err), details=[detail])
    )


_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DuplicateRequest, grpc.StatusCode.ALREADY_EXISTS),
    (EngineUnavailable, grpc.StatusCode.UNAVAILABLE),
    (WorkerDied, grpc.StatusCode.UNAVAILABLE),
    (CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),
]


def code_for(error: BaseException) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    """Ends the RPC with the status that fits `error` (never returns)."""
    if isinstance(error, InvalidRequest):
        await context.abort_with_status(invalid_argument_status(error))
    code = code_for(error)
    message = str(error) if code != grpc.StatusCode.INTERNAL else f"internal error: {error}"
    await context.abort(code, message)
