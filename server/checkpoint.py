"""Checkpoint directories: written atomically, read safely.

A checkpoint is a directory holding
- `fusion_model.pt`: tensors and plain types only (a dict of state_dicts, buffers, RNG states),
  read with `torch.load(weights_only=True)`, so a file carrying a pickled payload cannot run code;
- `fusion_state.json`: format version, config, counters, statistics, history, and the SHA-256 of
  `fusion_model.pt`, so that a truncated or corrupt checkpoint is detected before it is used.

Writing goes to a temporary sibling directory; files and the directory are fsynced, then renamed
into place, so a crash leaves either the old checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import CheckpointNotFoundError, IncompatibleCheckpointError

MODEL_FILE = "fusion_model.pt"
STATE_FILE = "fusion_state.json"
FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(path: str | os.PathLike, tensors: dict[str, Any], state: dict[str, Any]) -> Path:
    """Atomically write `tensors` (torch.save) and `state` (JSON) as a checkpoint directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    import torch  # here: the service process reads checkpoints' names and JSON without torch

    torch.save(tensors, buf)
    model_bytes = buf.getvalue()
    state = dict(state, format_version=FORMAT_VERSION,
                 checksums={MODEL_FILE: hashlib.sha256(model_bytes).hexdigest()})
    state_bytes = json.dumps(state, indent=1, sort_keys=True, allow_nan=True).encode()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_file(tmp / MODEL_FILE, model_bytes)
        _write_file(tmp / STATE_FILE, state_bytes)
        _fsync_dir(tmp)
        if path.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rmdir(old)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read and verify a checkpoint directory: (tensors, state). Raises a CheckpointError."""
    path = Path(path)
    model_path, state_path = path / MODEL_FILE, path / STATE_FILE
    if not model_path.is_file() or not state_path.is_file():
        raise CheckpointNotFoundError(f"no checkpoint at {path} (needs {MODEL_FILE} and {STATE_FILE})")
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as e:
        raise IncompatibleCheckpointError(f"{state_path.name} is unreadable: {e}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"unsupported checkpoint format {state.get('format_version') if isinstance(state, dict) else None!r}, "
            f"expected {FORMAT_VERSION}")
    model_bytes = model_path.read_bytes()
    expected = (state.get("checksums") or {}).get(MODEL_FILE)
    actual = hashlib.sha256(model_bytes).hexdigest()
    if expected != actual:
        raise IncompatibleCheckpointError(f"{MODEL_FILE} is corrupt or truncated: checksum mismatch")
    try:
        import torch

        tensors = torch.load(io.BytesIO(model_bytes), map_location="cpu", weights_only=True)
    except Exception as e:  # an UnpicklingError for a payload that is not plain tensors and types
        raise IncompatibleCheckpointError(f"{MODEL_FILE} refused by the safe loader: {type(e).__name__}: {e}") from None
    if not isinstance(tensors, dict):
        raise IncompatibleCheckpointError(f"{MODEL_FILE} does not hold a dict")
    return tensors, state
