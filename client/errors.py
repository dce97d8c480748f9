"""The exceptions a `FusionClient` raises: one hierarchy, rooted at `FusionClientError`.

    FusionClientError                 anything the client raises about the service
    ├── TransportError                the service could not be reached, or answered too late
    │   ├── UnavailableError          UNAVAILABLE: down, starting, shutting down, unreachable
    │   └── DeadlineExceededError     DEADLINE_EXCEEDED: no answer within the deadline
    ├── ServerError                   the service answered with an error status (any other code)
    │   ├── InvalidArgumentError      INVALID_ARGUMENT: a bad field, named in `details`
    │   ├── NotFoundError             NOT_FOUND: an unknown event_id or checkpoint
    │   ├── FailedPreconditionError   FAILED_PRECONDITION: e.g. an incompatible checkpoint
    │   ├── ResourceExhaustedError    RESOURCE_EXHAUSTED: the service is overloaded
    │   ├── UnauthenticatedError      UNAUTHENTICATED: missing or bad token
    │   ├── PermissionDeniedError     PERMISSION_DENIED: the token may not do this
    │   └── InternalError             INTERNAL: a bug on the server side
    └── ClientClosedError             the client was used after close()

Every exception carries `.code` (a `grpc.StatusCode`) and `.details` (the server's message, or
the transport's). gRPC's own `grpc.RpcError` never leaves the client: `from_rpc_error()` is the one
place where it is translated, and the original error stays attached as `__cause__`.

Only `TransportError`s may be answered by the local fallback (`FusionClient(fallback=True)`) or
retried (`record_outcome(..., event_id=...)`); a `ServerError` always reaches the caller.
Mistakes the client can see without asking the service (an `actual_direction` that is neither
"UP" nor "DOWN", an expert without `prob_up`) raise the built-in `ValueError`/`TypeError`
before any call is made.

>>> import grpc
>>> from titan_fusion.client.errors import (
...     FusionClientError, InvalidArgumentError, ServerError, TransportError, UnavailableError)
>>> issubclass(UnavailableError, TransportError) and issubclass(TransportError, FusionClientError)
True
>>> err = InvalidArgumentError("experts[1].prob_up: must be in [0, 1], got 1.5")
>>> isinstance(err, ServerError), err.code is grpc.StatusCode.INVALID_ARGUMENT
(True, True)
>>> err.details
'experts[1].prob_up: must be in [0, 1], got 1.5'
>>> str(err)
'INVALID_ARGUMENT: experts[1].prob_up: must be in [0, 1], got 1.5'
"""
from __future__ import annotations

import grpc

__all__ = [
    "FusionClientError",
    "TransportError",
    "UnavailableError",
    "DeadlineExceededError",
    "ServerError",
    "InvalidArgumentError",
    "NotFoundError",
    "FailedPreconditionError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "PermissionDeniedError",
    "InternalError",
    "ClientClosedError",
    "from_rpc_error",
]


class FusionClientError(Exception):
    """Root of every error the client raises about the service.

    `code` is the gRPC status code, `details` the message that came with it.
    """

    #: The status code of this class; `ServerError` takes the one it was given.
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", *, code: grpc.StatusCode | None = None) -> None:
        if code is not None:
            self.code = code
        self.details = details
        super().__init__(f"{self.code.name}: {details}" if details else self.code.name)


class TransportError(FusionClientError):
    """The service could not be reached or did not answer in time; the request may not have run."""


class UnavailableError(TransportError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(TransportError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ServerError(FusionClientError):
    """The service answered with an error status. Raised as is for codes without a subclass."""


class InvalidArgumentError(ServerError, ValueError):
    """The service refused the request's content; the message names the field. Also a ValueError,
    as the in-process class's FusionInputError is, so that `except ValueError` around
    `forward()`/`update()` works with either."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ServerError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(ServerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhaustedError(ServerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(ServerError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(ServerError):
    code = grpc.StatusCode.PERMISSION_DENIED


class InternalError(ServerError):
    code = grpc.StatusCode.INTERNAL


class ClientClosedError(FusionClientError):
    """The client was used after `close()` (or closed while a call was in flight).

    Its code is CANCELLED: gRPC's code for a call that the caller gave up on.
    """

    code = grpc.StatusCode.CANCELLED

    def __init__(self, details: str = "the FusionClient is closed", **kwargs) -> None:
        super().__init__(details, **kwargs)


_BY_CODE: dict[grpc.StatusCode, type[FusionClientError]] = {
    cls.code: cls
    for cls in (
        UnavailableError,
        DeadlineExceededError,
        InvalidArgumentError,
        NotFoundError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnauthenticatedError,
        PermissionDeniedError,
        InternalError,
    )
}


def from_rpc_error(err: grpc.RpcError, *, closed: bool = False) -> FusionClientError:
    """Translate a `grpc.RpcError` into this hierarchy (the client's one translation point).

    `closed` says whether the client had been closed: a call cancelled by `close()` then becomes a
    `ClientClosedError` rather than a `ServerError`.

    >>> import grpc
    >>> class Fake(grpc.RpcError):
    ...     def code(self): return grpc.StatusCode.ABORTED
    ...     def details(self): return "try again"
    >>> err = from_rpc_error(Fake())
    >>> type(err).__name__, err.code.name, err.details
    ('ServerError', 'ABORTED', 'try again')
    """
    # A bare RpcError (not a grpc.Call) has neither method: treat it as UNKNOWN.
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else None
    code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    details = details or ""
    if closed and code is grpc.StatusCode.CANCELLED:
        return ClientClosedError(details or ClientClosedError().details)
    cls = _BY_CODE.get(code, ServerError)
    return cls(details, code=code)
