"""titan-fusion server: the fusion model (in-process) and the gRPC service around it."""
from .config import FusionConfig
from .errors import (CheckpointError, ConfigError, FusionError, FusionInputError,
                     IncompatibleCheckpointError)
from .fusion import Event, Prediction, TransformerFusion

__all__ = ["TransformerFusion", "FusionConfig", "Event", "Prediction", "FusionError", "ConfigError",
           "FusionInputError", "CheckpointError", "IncompatibleCheckpointError"]
