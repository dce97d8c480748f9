"""Named checkpoints inside the data directory: `<data_dir>/checkpoints/<name>/`.

Callers give names, never paths: a name is ASCII letters, digits, '.', '_' and '-', at most 64
characters, the first a letter, a digit or '_' (never '.' or '-'); the resolved directory must sit directly in the checkpoints
directory and must not be a link. Each checkpoint records a generation number (newest = highest,
independent of the wall clock) and the last journal sequence number it has applied.
Automatic checkpoints are named "auto-<generation>" and only the newest `keep` of them are kept.
"""
from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import MODEL_FILE, STATE_FILE
from .errors import CheckpointError, CheckpointNotFoundError, FusionInputError, StorageError

if TYPE_CHECKING:  # or a trainer (server/trainer.py), which has the same save and load
    from .fusion import TransformerFusion

log = logging.getLogger("titan_fusion.server.store")
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
AUTO_PREFIX = "auto-"
# a checkpoint write that failed because of the disk, not the model: StorageError (UNAVAILABLE)
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT})


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    samples_trained: int
    train_steps: int
    created_at: str  # RFC 3339, UTC
    size_bytes: int
    generation: int
    applied_seq: int  # last journal sequence number included
    extra: dict = field(default_factory=dict, repr=False, compare=False)  # what the service saved beside the model


def check_name(name: Any, field: str = "name", *, saving: bool = False) -> str:
    """A plain checkpoint name. Saving under the automatic checkpoints' prefix is refused: their
    retention would delete it (restoring one by its name is fine)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise FusionInputError(field, f"must be a plain checkpoint name (letters, digits, '.', '_', '-'; at most 64; "
                               f"starting with a letter, a digit or '_'), got {name!r}")
    if saving and name.startswith(AUTO_PREFIX):
        raise FusionInputError(field, f"names starting with {AUTO_PREFIX!r} are reserved for automatic checkpoints, "
                               f"got {name!r}")
    return name


class CheckpointStore:
    def __init__(self, root: str | Path, keep: int = 5):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        for stale in self.root.glob(".*.tmp-*"):  # a save interrupted by a crash: never renamed in
            log.warning("removing %s, left by an interrupted checkpoint write", stale.name)
            shutil.rmtree(stale, ignore_errors=True)
        for old in self.root.glob(".*.old-*"):  # an overwrite interrupted between its two renames
            target = self.root / old.name[1:old.name.rindex(".old-")]
            if target.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                log.warning("restoring %s from %s, left by an interrupted overwrite", target.name, old.name)
                old.rename(target)

    def path_for(self, name: str) -> Path:
        check_name(name)
        path = self.root / name
        if path.is_symlink() or path.resolve().parent != self.root.resolve():
            raise FusionInputError("name", f"checkpoint {name!r} is not a directory inside the data directory")
        return path

    def _info(self, path: Path) -> CheckpointInfo:
        state = json.loads((path / STATE_FILE).read_text())
        extra = state.get("extra") or {}
        counters = state.get("counters") or {}
        size = sum(f.stat().st_size for f in (path / MODEL_FILE, path / STATE_FILE) if f.exists())
        return CheckpointInfo(path.name, int(counters.get("outcomes", 0)), int(counters.get("steps", 0)),
                              str(extra.get("created_at", "")), size, int(extra.get("generation", 0)),
                              int(extra.get("applied_seq", 0)), dict(extra))

    def list(self) -> list[CheckpointInfo]:
        """Readable checkpoints, newest first (by generation). Unreadable ones are skipped."""
        infos = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or not path.is_dir() or path.is_symlink():
                continue
            try:
                infos.append(self._info(path))
            except (OSError, ValueError, TypeError) as e:
                log.warning("skipping unreadable checkpoint %s: %s", path.name, e)
        return sorted(infos, key=lambda i: (i.generation, i.name), reverse=True)

    def save(self, fusion: TransformerFusion, name: str | None, applied_seq: int,
             extra: dict | None = None) -> CheckpointInfo:
        """Save `fusion` as `name` (None: an automatic checkpoint), then prune old automatic ones.
        `extra` (JSON-able) is kept beside the model and comes back in CheckpointInfo.extra."""
        generation = max((i.generation for i in self.list()), default=0) + 1
        auto = name is None
        name = f"{AUTO_PREFIX}{generation:08d}" if auto else name
        path = self.path_for(name)
        created = datetime.fromtimestamp(time.time(), timezone.utc).isoformat(timespec="milliseconds")
        try:
            fusion.save(path, extra={**(extra or {}), "generation": generation, "applied_seq": applied_seq,
                                     "created_at": created, "name": name})
        except OSError as e:  # atomic (server/checkpoint.py): nothing is left, unless the directory's
            # fsync after the rename failed (a restore then deletes what it left: ModelOwner)
            if e.errno in STORAGE_ERRNOS:
                raise StorageError(f"checkpoint {name!r} cannot be written in {self.root}: {e}") from e
            raise
        if auto:
            for old in [i for i in self.list() if i.name.startswith(AUTO_PREFIX)][self.keep:]:
                shutil.rmtree(self.root / old.name, ignore_errors=True)
        return self._info(path)

    def discard(self, name: str) -> bool:
        """Delete checkpoint `name`; True if it is gone."""
        path = self.path_for(name)
        shutil.rmtree(path, ignore_errors=True)
        return not path.exists()

    def load(self, fusion: TransformerFusion, name: str) -> CheckpointInfo:
        """Load checkpoint `name` into `fusion` (untouched on error)."""
        path = self.path_for(name)
        if not path.is_dir():
            raise CheckpointNotFoundError(f"no checkpoint named {name!r}")
        fusion.load(path)
        return self._info(path)

    def load_newest_valid(self, fusion: TransformerFusion) -> CheckpointInfo | None:
        """Load the newest checkpoint that loads; log and skip corrupt or incompatible ones."""
        for info in self.list():
            try:
                return self.load(fusion, info.name)
            except CheckpointError as e:
                log.error("checkpoint %s is unusable (%s); trying the previous one", info.name, e)
        return None
