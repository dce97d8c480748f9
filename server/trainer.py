"""Where the model trains: in the owner's thread (LocalTrainer) or in a child process (TrainerProcess).

    service process                                          trainer process (SCHED_IDLE, own CPU)
    ModelOwner thread ──("learn", [(event, label)...])──▶    TransformerFusion.learn, one by one
                      ◀──(per outcome: error?, samples, version; Snapshot; stats)──┘
                      ──("save", path, extra) / ("load", path)──▶ TransformerFusion.save / load

The service's ModelOwner talks to one trainer through the small interface below and never to the
TransformerFusion itself. LocalTrainer keeps the model in the owner's thread (tests, notebooks, the
`trainer = "thread"` setting). TrainerProcess, the service's default, keeps it in a child process:
a training step then never holds the service's interpreter lock, so Predicts and journal commits
run beside training instead of between its Python statements; with two or more CPUs it runs on
its own CPU, which the service's threads keep off (server/cpus.py). The pipe carries requests one
at a time, in order, so the child applies them in the order the owner sent them: the owner still
serializes every change of the model. After each request the child sends back the model's
immutable inference Snapshot (when it changed) and its training statistics; predictions read that
snapshot in the service process.

Attention statistics (ServingStats) are recorded where Predicts are answered, in the service
process; a checkpoint written by the child carries them (they travel with the save request) and a
loaded checkpoint hands them back.

The child dies with the service: it exits when the pipe closes, and asks the kernel (prctl
PR_SET_PDEATHSIG) for SIGKILL when its parent dies. If the child dies first, the next request
raises TrainerDiedError and the owner starts a new child and rebuilds the model from the newest
checkpoint and the journal (ModelOwner._restart_trainer).
"""
from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import types
from typing import Any, Mapping, Sequence

from .config import FusionConfig
from .errors import TrainerDiedError
from .inference import Event, Schema, ServingStats, Snapshot

log = logging.getLogger("titan_fusion.server.trainer")

# (error or None, samples_trained, version) for each outcome learned, in order
Learned = tuple[BaseException | None, int, int]
START_TIMEOUT_SECONDS = 120.0  # a child imports torch and warms it up before it answers
# A trainer whose call (sending it, the work, the answer) takes this long is wedged (stopped,
# deadlocked, starved of every CPU): a watchdog thread kills it, and the model owner replaces it
# as if it had died. The longest call, 256 outcomes learned unsliced, takes seconds at the defaults.
CALL_TIMEOUT_SECONDS = 300.0
NICE = 10  # the trainer's priority where the platform has no SCHED_IDLE (lower_priority)
_HIDE_MAIN = threading.Lock()


def freeze_start_up() -> int:
    """Collect, then move every object alive now (the imported modules and the compiled code, the
    model as it is then) out of the garbage collector's reach, so that its full passes walk only
    what was made since. Frozen objects are still freed when nothing refers to them; only a cycle
    among them that becomes garbage later stays. In the service process a full pass over its
    ~120,000 start-up objects took 49-57 ms, every few seconds with 32 Predicts in flight, and every
    thread waits for it (docs/PERFORMANCE.md). Only for a process that is the service's alone
    (`titan-fusion serve`, the trainer and its fork server): a library caller's objects are its
    own. Returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def lower_priority() -> None:
    """Lower the calling thread (and the threads it starts) to the trainer's priority: SCHED_IDLE
    where Linux has it, so that a service thread that wakes up on the trainer's CPU takes it at
    once (nice 10 only lowers the trainer's share: under EEVDF a waking thread may still wait for
    the trainer's slice to end); else nice 10."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.nice(NICE)
        except OSError:
            pass


def learn_items(fusion: Any, items: Sequence[tuple[Event, int]], slice_seconds: float | None,
                interrupt: Any = None) -> list[Learned]:
    """Learn `items` in order; with `slice_seconds` (None: all of them), stop after the first item
    that ends past it or while `interrupt.value` is set (a ctypes byte: the owner has work
    waiting; None: never). A failure is returned in its item's place (the journal validated it: it
    is a bug) and the rest go on."""
    out: list[Learned] = []
    started = time.monotonic()
    for event, label in items:
        err: BaseException | None = None
        try:
            fusion.learn(event, label)
        except Exception as e:  # noqa: BLE001 - reported per outcome
            err = e
        out.append((err, fusion.samples_trained, fusion.version))
        if slice_seconds is not None and (time.monotonic() - started > slice_seconds
                                          or interrupt is not None and interrupt.value):
            break
    return out


class _Interruptible:
    """A learn(..., interruptible=True) call ends after its current outcome while the flag is set:
    interrupt() sets it (other threads: the owner has work waiting), clear_interrupt() clears it.
    The flag is a ctypes byte, in shared memory for the trainer process."""

    _interrupt: Any

    def interrupt(self) -> None:
        self._interrupt.value = 1

    def clear_interrupt(self) -> None:
        self._interrupt.value = 0

    @property
    def interrupted(self) -> bool:
        return self._interrupt.value != 0


class LocalTrainer(_Interruptible):
    """The model in the calling thread: every call runs TransformerFusion directly."""

    def __init__(self, fusion: Any):
        self.fusion = fusion
        self._interrupt = ctypes.c_byte(0)

    @property
    def serving_stats(self) -> ServingStats:
        return self.fusion.serving_stats

    @property
    def schema(self) -> Schema:
        return self.fusion.schema

    @property
    def samples_trained(self) -> int:
        return self.fusion.samples_trained

    @property
    def version(self) -> int:
        return self.fusion.version

    def warm_up(self) -> None:
        from .fusion import warm_up
        warm_up()

    def learn(self, items: Sequence[tuple[Event, int]], slice_seconds: float | None = None, *,
              snapshot: bool = True, interruptible: bool = False) -> list[Learned]:
        return learn_items(self.fusion, items, slice_seconds, self._interrupt if interruptible else None)

    stale = False  # snapshot() is always current here

    def refresh(self) -> None:
        pass

    def snapshot(self) -> Snapshot:
        return self.fusion.snapshot()

    def stats(self) -> dict[str, Any]:
        return self.fusion.get_training_stats()

    def save(self, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> None:
        self.fusion.save(path, extra)

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        return self.fusion.load(path)

    def close(self) -> None:
        pass


class TrainerProcess(_Interruptible):
    """The model in a child process, behind the LocalTrainer interface. Called by one thread (the
    model owner); the properties read what the child last reported."""

    def __init__(self, config: FusionConfig, n_models: int, *, cpus: frozenset[int] | None = None,
                 start_timeout: float = START_TIMEOUT_SECONDS):
        ctx = multiprocessing.get_context("forkserver")
        # The fork server imports torch and the model once; each trainer is a fork of it (fast).
        ctx.set_forkserver_preload([__name__, "titan_fusion.server._trainer_preload"])
        self._conn, child = ctx.Pipe()
        self._interrupt = ctx.RawValue("b", 0)  # shared memory: set here by interrupt(), read by the child
        self._proc = ctx.Process(target=_child_main, args=(child, config, n_models, cpus, self._interrupt),
                                 name="titan-fusion-trainer", daemon=True)
        with _HIDE_MAIN:
            # multiprocessing re-imports the caller's __main__ in the fork server and the child
            # (running a script's unguarded top level again); the trainer needs nothing from it.
            main = sys.modules["__main__"]
            sys.modules["__main__"] = types.ModuleType("__main__")
            try:
                self._proc.start()
            finally:
                sys.modules["__main__"] = main
        child.close()
        self._serving = ServingStats(config.attention_window)
        self._n_models = n_models
        self._snapshot: Snapshot | None = None
        self._stats: dict[str, Any] = {}
        self._schema: Schema | None = None
        self._samples = self._version = 0
        self.stale = False  # the child has learned since the snapshot it last sent
        self._lock = threading.Lock()
        self._call_since: float | None = None  # when the call in progress began (for the watchdog)
        self._silenced = False  # the watchdog killed the child
        self._closed = threading.Event()
        if not self._conn.poll(start_timeout):
            self.close()
            raise TrainerDiedError(f"the trainer process did not start within {start_timeout:g} s")
        self._receive()
        threading.Thread(target=self._watch, name="trainer-watchdog", daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def serving_stats(self) -> ServingStats:
        return self._serving

    @property
    def schema(self) -> Schema:
        return self._schema

    @property
    def samples_trained(self) -> int:
        return self._samples

    @property
    def version(self) -> int:
        return self._version

    def warm_up(self) -> None:
        pass  # the child warmed torch up before its first answer

    def learn(self, items: Sequence[tuple[Event, int]], slice_seconds: float | None = None, *,
              snapshot: bool = True, interruptible: bool = False) -> list[Learned]:
        """Learn `items`; with `snapshot` False the child skips building and sending the new
        snapshot (about 0.7 ms: worth it while catching up), and `stale` turns true until refresh()."""
        out = self._call("learn", list(items), slice_seconds, snapshot, interruptible)
        self.stale = not snapshot
        return out

    def refresh(self) -> None:
        """Fetch the current snapshot after learn(..., snapshot=False)."""
        self._call("refresh")
        self.stale = False

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def stats(self) -> dict[str, Any]:
        return {**self._stats, **self._serving.training_stats(self._n_models)}  # recorded here, not in the child

    def save(self, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> None:
        self._call("save", str(path), dict(extra or {}), self._serving.state())

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        extra, serving = self._call("load", str(path))
        self._serving.load(serving)
        return extra

    def close(self) -> None:
        """Stop the child (it exits when the pipe closes) and wait for it briefly."""
        self._closed.set()
        try:
            self._conn.close()
        except OSError:
            pass
        self._proc.join(5.0)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5.0)

    # ------------------------------------------------------------------ the pipe
    def _call(self, op: str, *args: Any) -> Any:
        with self._lock:
            self._call_since = time.monotonic()
            try:
                try:
                    self._conn.send((op, args))
                except (OSError, EOFError, ValueError) as e:
                    raise self._gone(f"{type(e).__name__}: {e}") from None
                return self._receive()
            finally:
                self._call_since = None

    def _watch(self) -> None:
        """Kill the child when the call in progress (sending it, the child's work, receiving the
        answer) has taken longer than CALL_TIMEOUT_SECONDS; the call then fails as for a death."""
        while not self._closed.wait(min(1.0, CALL_TIMEOUT_SECONDS / 4)):
            since = self._call_since
            if since is not None and time.monotonic() - since > CALL_TIMEOUT_SECONDS:
                self._silenced = True
                self._proc.kill()
                return

    def _gone(self, why: str) -> TrainerDiedError:
        if self._silenced:
            return TrainerDiedError(f"the trainer process answered nothing for {CALL_TIMEOUT_SECONDS:g} s "
                                    "(stopped or wedged); killed")
        return TrainerDiedError(f"the trainer process is gone ({why})")

    def _receive(self) -> Any:
        try:
            ok, result, state = self._conn.recv()
        except (OSError, EOFError, ValueError) as e:
            raise self._gone(f"exit code {self._proc.exitcode}; {type(e).__name__}") from None
        snapshot, self._stats, self._schema, self._samples, self._version = state
        if snapshot is not None:
            self._snapshot = snapshot
        if not ok:
            raise result
        return result


# ---------------------------------------------------------------------- the child
def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (the fork server, which exits with the
    service) dies. Elsewhere the closed pipe is the only signal."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _portable(e: BaseException) -> BaseException:
    """The exception itself if it survives pickling (FusionError subclasses do), else a RuntimeError
    that says what it was."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


def _child_main(conn: Any, config: FusionConfig, n_models: int, cpus: frozenset[int] | None,
                interrupt: Any) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the service stops us
    lower_priority()  # before torch starts any thread: they inherit it
    if cpus:  # server/cpus.py: the service's threads keep off these (but gRPC core's)
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as e:
            log.warning("the trainer cannot keep to CPUs %s: %s", sorted(cpus), e)
    import torch

    from .fusion import TransformerFusion, warm_up
    torch.set_num_threads(1)  # bit-reproducible training, one core
    fusion = TransformerFusion(config, n_models=n_models)
    warm_up()  # a no-op in cost when the fork server preloaded it
    freeze_start_up()  # torch's ~290,000 objects (frozen already when the fork server preloaded them):
    # a full collection walked them in 124-133 ms here
    sent: Snapshot | None = None

    def state(with_snapshot: bool = True) -> tuple:
        nonlocal sent
        new = None
        if with_snapshot:
            snap = fusion.snapshot()
            new = None if snap is sent else snap.fold()  # folded here, not in the service process
            sent = snap
        return (new, fusion.get_training_stats(), fusion.schema, fusion.samples_trained, fusion.version)

    conn.send((True, None, state()))
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return  # the service closed the pipe or died
        with_snapshot = True
        try:
            if op == "learn":
                items, slice_seconds, with_snapshot, interruptible = args
                result: Any = [(None if err is None else _portable(err), n, v)
                               for err, n, v in learn_items(fusion, items, slice_seconds,
                                                            interrupt if interruptible else None)]
            elif op == "refresh":
                result = None
            elif op == "save":
                path, extra, serving = args
                fusion.serving_stats.load(serving)
                fusion.save(path, extra)
                result = None
            elif op == "load":
                (path,) = args
                extra = fusion.load(path)
                result = (extra, fusion.serving_stats.state())
            else:
                raise ValueError(f"unknown trainer request {op!r}")
            reply = (True, result, state(with_snapshot))
        except Exception as e:  # noqa: BLE001 - raised again in the service process
            reply = (False, _portable(e), state())
        try:
            conn.send(reply)
        except (OSError, EOFError):
            return
