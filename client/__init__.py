"""titan-fusion's thin client: needs grpcio and protobuf only (no torch, no numpy).

>>> from titan_fusion.client import FusionClient
>>> fusion = FusionClient("localhost:50051")  # instead of TransformerFusion(config, n_models=4)
>>> fusion.close()

See `titan_fusion.client.client` for the fallback and retry semantics and
`titan_fusion.client.errors` for the exception tree.
"""
import logging as _logging

from titan_fusion.client.client import (
    CHANNEL_OPTIONS,
    KEEPALIVE_OPTIONS,
    MAX_MESSAGE_BYTES,
    MESSAGE_SIZE_OPTIONS,
    SERVER_KEEPALIVE_OPTIONS,
    FusionClient,
    tls_credentials,
)
from titan_fusion.client.convert import BulkResult, CheckpointInfo, OutcomeAck, Prediction
from titan_fusion.client.errors import (
    ClientClosedError,
    DeadlineExceededError,
    FailedPreconditionError,
    FusionClientError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServerError,
    TransportError,
    UnauthenticatedError,
    UnavailableError,
)

# A library logs, the application decides where it goes.
_logging.getLogger("titan_fusion.client").addHandler(_logging.NullHandler())

__all__ = [
    "FusionClient",
    "tls_credentials",
    "Prediction",
    "OutcomeAck",
    "CheckpointInfo",
    "BulkResult",
    "KEEPALIVE_OPTIONS",
    "SERVER_KEEPALIVE_OPTIONS",
    "MESSAGE_SIZE_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "CHANNEL_OPTIONS",
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
]
