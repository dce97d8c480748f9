"""titan-fusion server: the fusion model (in-process) and the gRPC service around it.

    >>> from titan_fusion.server import TransformerFusion, FusionConfig

Names are imported on first use, so that `titan-fusion health` and the other client-side commands
start without importing torch.
"""
from importlib import import_module

_EXPORTS = {
    "TransformerFusion": ".fusion", "FusionConfig": ".config", "Event": ".inference",
    "Prediction": ".inference", "Snapshot": ".inference", "FusionError": ".errors",
    "ConfigError": ".errors", "FusionInputError": ".errors", "CheckpointError": ".errors",
    "IncompatibleCheckpointError": ".errors", "ServiceConfig": ".settings", "create_server": ".service",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
