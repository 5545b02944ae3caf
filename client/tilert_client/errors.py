"""One exception class per gRPC status code, raised by every SDK call.

Rich error details (``google.rpc.Status`` in the ``grpc-status-details-bin``
trailer) are decoded when the server sends them: ``details`` holds the unpacked
``google.rpc`` messages, ``InvalidArgumentError.field_violations`` the BadRequest
entries, and ``retry_delay`` the RetryInfo hint of overload errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

_DETAIL_TYPES: dict[str, type[message.Message]] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        error_details_pb2.BadRequest,
        error_details_pb2.DebugInfo,
        error_details_pb2.ErrorInfo,
        error_details_pb2.Help,
        error_details_pb2.LocalizedMessage,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.QuotaFailure,
        error_details_pb2.RequestInfo,
        error_details_pb2.ResourceInfo,
        error_details_pb2.RetryInfo,
    )
}


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class TilertError(Exception):
    """Base of every error this SDK raises for a failed call.

    ``code`` is the grpc.StatusCode, ``message`` the status message and
    ``details`` the decoded rich details (google.rpc messages; an unknown detail
    type stays a ``google.protobuf.Any``).
    """

    default_code = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        details: tuple[Any, ...] = (),
    ) -> None:
        super().__init__(message)
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.message = message
        self.details = details

    @property
    def retry_delay(self) -> float | None:
        """Seconds the server asked to wait before retrying (RetryInfo), if any."""
        for d in self.details:
            if isinstance(d, error_details_pb2.RetryInfo):
                return d.retry_delay.seconds + d.retry_delay.nanos / 1e9
        return None

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class RequestCancelledError(TilertError):
    default_code = grpc.StatusCode.CANCELLED


class UnknownError(TilertError):
    default_code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(TilertError):
    default_code = grpc.StatusCode.INVALID_ARGUMENT

    @property
    def field_violations(self) -> tuple[FieldViolation, ...]:
        return tuple(
            FieldViolation(v.field, v.description)
            for d in self.details
            if isinstance(d, error_details_pb2.BadRequest)
            for v in d.field_violations
        )

    def __str__(self) -> str:
        lines = [super().__str__()]
        lines += [f"  {v.field}: {v.description}" for v in self.field_violations]
        return "\n".join(lines)


class DeadlineExceededError(TilertError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(TilertError):
    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(TilertError):
    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(TilertError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(TilertError):
    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(TilertError):
    default_code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(TilertError):
    default_code = grpc.StatusCode.ABORTED


class OutOfRangeError(TilertError):
    default_code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(TilertError):
    default_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(TilertError):
    default_code = grpc.StatusCode.INTERNAL


class UnavailableError(TilertError):
    default_code = grpc.StatusCode.UNAVAILABLE


class DataLossError(TilertError):
    default_code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(TilertError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class ProtocolError(TilertError):
    """The server answered with an OK status but broke the stream contract
    (no Started first, events after Finished, no Finished at all)."""

    default_code = grpc.StatusCode.UNKNOWN


_BY_CODE: dict[grpc.StatusCode, type[TilertError]] = {
    cls.default_code: cls
    for cls in (
        RequestCancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}


def error_class(code: grpc.StatusCode) -> type[TilertError]:
    return _BY_CODE.get(code, TilertError)


def _unpack(detail: any_pb2.Any) -> Any:
    cls = _DETAIL_TYPES.get(detail.TypeName())
    if cls is None:
        return detail
    out = cls()
    detail.Unpack(out)
    return out


def _rich_details(err: grpc.RpcError) -> tuple[Any, ...]:
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except (ValueError, AttributeError, TypeError):
        # A trailer that contradicts the status line, or an error object that
        # is not a call (e.g. raised before the RPC started): no details.
        return ()
    if status is None:
        return ()
    return tuple(_unpack(d) for d in status.details)


def from_rpc_error(err: grpc.RpcError) -> TilertError:
    """The TilertError for a failed sync or asyncio call (``raise ... from err``)."""
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    text = details_fn() if callable(details_fn) else None
    return error_class(code)(text or "", code=code, details=_rich_details(err))


__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ProtocolError",
    "RequestCancelledError",
    "ResourceExhaustedError",
    "TilertError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "error_class",
    "from_rpc_error",
]
