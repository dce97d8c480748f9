"""titan-fusion server: the fusion model (in-process) and the gRPC service around it."""
from .config import FusionConfig
from .errors import (CheckpointError, ConfigError, FusionError, FusionInputError,
                     IncompatibleCheckpointError)
from .fusion import TransformerFusion
from .inference import Event, Prediction, Snapshot

__all__ = ["TransformerFusion", "FusionConfig", "Event", "Prediction", "Snapshot", "FusionError", "ConfigError",
           "FusionInputError", "CheckpointError", "IncompatibleCheckpointError"]
