"""Domain errors of the fusion model and the service.

    FusionError
    ├── ConfigError (ValueError)        a configuration parameter is invalid; names the parameter
    ├── FusionInputError (ValueError)   an event is invalid; names the field; nothing was changed
    │   └── UnknownEventError           RecordOutcome by event_id for an event never predicted
    ├── CheckpointError                 a checkpoint is missing, corrupt or incompatible
    │   ├── CheckpointNotFoundError
    │   └── IncompatibleCheckpointError
    ├── OverloadedError                 a queue is full
    ├── NotReadyError                   the service is still recovering its model
    ├── ShuttingDownError               the service is draining
    ├── DeadlineExpiredError            the caller's deadline passed before the work started
    ├── StorageError                    the data directory cannot be written (disk full, read-only, I/O)
    └── ClientGoneError                 the caller ended a stream midway

The service maps these to gRPC status codes in one place (server/service.py).
"""
from __future__ import annotations


class FusionError(Exception):
    """Root of every error raised on purpose by titan_fusion.server."""


class ConfigError(FusionError, ValueError):
    """A configuration value is invalid. `parameter` is its name, e.g. "fusion.hidden_dim"."""

    def __init__(self, parameter: str, message: str):
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter
        self.message = message

    def __reduce__(self):  # survives pickling (the trainer process sends errors back)
        return type(self), (self.parameter, self.message)


class FusionInputError(FusionError, ValueError):
    """An event is invalid. `field` names it, e.g. "model_outputs[2].prob_up" or "features.rsi".

    Raised before anything is changed: the model, buffers and statistics are as they were.
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):  # survives pickling (the trainer process sends errors back)
        return type(self), (self.field, self.message)


class UnknownEventError(FusionInputError):
    """An outcome names an event_id whose inputs the service does not have."""


class CheckpointError(FusionError):
    """A checkpoint cannot be saved or loaded. The serving model is unchanged."""


class CheckpointNotFoundError(CheckpointError):
    pass


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint is corrupt or was made with another architecture or format."""


class OverloadedError(FusionError):
    """The model owner's queue is full; try again later."""


class ShuttingDownError(FusionError):
    """The service is draining and takes no new work."""


class NotReadyError(FusionError):
    """The service is still loading its checkpoint and replaying its journal."""


class TrainerDiedError(FusionError):
    """The trainer process died (killed, out of memory); the model owner starts a new one and
    rebuilds the model from the newest checkpoint and the journal. Retry."""


class DeadlineExpiredError(FusionError):
    """The caller's deadline passed. Work whose deadline passed before it started is not done; an
    outcome whose deadline passes while it is being learned may still be learned (retrying with the
    same event_id is safe)."""


class StorageError(FusionError):
    """The data directory cannot be written: the disk is full or read-only, or an I/O error. What
    the request would have written was not (an outcome is not journaled, so not acknowledged, and
    not learned); retry once the disk is fixed."""


class ClientGoneError(FusionError):
    """The caller cancelled or broke its stream; what it had sent was kept."""
