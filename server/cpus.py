"""Which CPUs the trainer process and the serving process run on (setting `trainer_cpus`).

A trainer that learns at full rate keeps one core busy. When the kernel may run it on any core, a
Predict's threads (gRPC's poller, a handler) keep landing on the core it holds and wait there for
the scheduler: on the Intel 2-vCPU machine of docs/PERFORMANCE.md's earlier rounds, a busy process
at the trainer's nice 10 raised Predict p99 2.7-2.9x. With that process on its own core and the
service kept off it, 0.94-1.10x (`make bench`, "beside a plain CPU loop"; it also doubled
Predicts/s with 8 and 32 in flight); on the AMD machine of its later rounds, with gRPC core's own
threads allowed on that core too (below), 0.81-0.97x.

    "auto"   with two or more CPUs available: the trainer gets the last one, the service the rest
             (one CPU: nothing is pinned)
    "off"    nothing is pinned
    "3", "6-7", "2,5"   the trainer gets these CPUs (Linux cpulist syntax), the service the rest of
             the CPUs it may use; they must be among those, and leave it at least one

The service's threads keep to the service's CPUs (the Python ones: the gRPC poller and handlers,
the model owner; and any other), except gRPC core's own C++ threads, recognised by their names
(GRPC_THREADS): the event engine that reads and writes the sockets without the interpreter lock,
its lifeguard and timer. They may run on every CPU, the trainer's included, where at normal
priority they take the CPU from the trainer (SCHED_IDLE) for as long as they work. With 32
Predicts in flight they spent about 18 us of CPU a call, which the service's own CPU no longer
pays: +18-23% Predicts/s on the 2-vCPU machine (docs/PERFORMANCE.md). A gRPC release that names
its threads otherwise leaves them on the service's CPUs, as before.

Only the trainer process (trainer = "process") is placed; with trainer = "thread" nothing is.
Where the platform has no CPU affinity (macOS), nothing is pinned.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

AUTO, OFF = "auto", "off"
# gRPC core's threads (C++; none of them holds the interpreter lock), by the names grpcio 1.85 gives
# them as Linux shows them (15 characters at most): the event engine's pool, the lifeguard that
# grows it, the timer threads. Any other thread keeps the service's CPUs, so a release that renames
# them turns this off (tests/test_cpus.py then fails).
GRPC_THREADS = ("event_engine", "lifeguard", "grpc_global_tim")


def parse_cpu_list(text: str) -> frozenset[int]:
    """'0-2,5' -> {0, 1, 2, 5}; raises ValueError saying what is wrong."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"expected \"auto\", \"off\" or a CPU list such as \"3\", \"6-7\" or \"2,5\"; "
                             f"{part!r} is not a CPU number or range")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"the range {part!r} runs backwards")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def check(setting: str) -> None:
    """Raises ValueError unless `setting` is "auto", "off" or a CPU list (the settings' validation)."""
    if setting not in (AUTO, OFF):
        parse_cpu_list(setting)


@dataclass(frozen=True)
class Split:
    service: frozenset[int]
    trainer: frozenset[int]


def available() -> frozenset[int] | None:
    """The CPUs this process may run on, or None where the platform cannot pin."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return frozenset(os.sched_getaffinity(0))


def split(setting: str, cpus: frozenset[int] | None) -> Split | None:
    """Where the trainer and the service run, given the setting and the CPUs available (`cpus`);
    None: leave both where they are. Raises ValueError when an explicit list cannot be honoured."""
    if setting == OFF or cpus is None:
        return None
    if setting == AUTO:
        if len(cpus) < 2:
            return None
        trainer = frozenset({max(cpus)})
    else:
        trainer = parse_cpu_list(setting)
        if not trainer <= cpus:
            raise ValueError(f"CPUs {fmt(trainer - cpus)} are not available to the service "
                             f"(it may use {fmt(cpus)})")
        if not cpus - trainer:
            raise ValueError(f"it would leave the service no CPU (it may use {fmt(cpus)})")
    return Split(service=cpus - trainer, trainer=trainer)


def affinities() -> dict[int, frozenset[int]]:
    """Each thread of this process (by thread id) and the CPUs it may run on."""
    out: dict[int, frozenset[int]] = {}
    for tid in _threads():
        try:
            out[tid] = frozenset(os.sched_getaffinity(tid))
        except OSError:  # the thread has ended meanwhile
            pass
    return out


def pin_process(cpus: frozenset[int], grpc_cpus: frozenset[int] | None = None) -> dict[int, frozenset[int]]:
    """Every thread of this process onto `cpus`, except gRPC core's own threads (recognised by the
    names gRPC gives them: GRPC_THREADS) onto `grpc_cpus` when it is given. Threads started later
    inherit the CPUs of the thread that starts them. Returns each thread's previous CPUs, for
    restore()."""
    before = affinities()
    for tid in before:
        mine = grpc_cpus is not None and thread_name(tid).startswith(GRPC_THREADS)
        try:
            os.sched_setaffinity(tid, grpc_cpus if mine else cpus)
        except OSError:  # the thread has ended meanwhile
            pass
    return before


def restore(before: dict[int, frozenset[int]], default: frozenset[int]) -> None:
    """Undo pin_process: each thread back to what it had; threads started since to `default`."""
    for tid in _threads():
        try:
            os.sched_setaffinity(tid, before.get(tid, default))
        except OSError:
            pass


def thread_name(tid: int) -> str:
    """A thread's name as the kernel keeps it (/proc/self/task/TID/comm); "" where it cannot be read."""
    try:
        with open(f"/proc/self/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: this thread only
        return [0]


def fmt(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))
