"""The bench's own measuring tools (server/bench.py): what it reads from /proc must mean what its
table says. The bench itself is run by `make bench`, never by the tests (timings are not asserted)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest

from titan_fusion.server.bench import cpu_seconds

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc (Linux)")


def test_cpu_seconds_counts_a_process_s_cpu_time_not_its_sleep() -> None:
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)  # both past the interpreter's start-up (CPU too)
        spin0, sleep0, t0 = cpu_seconds(spin.pid), cpu_seconds(sleeper.pid), time.monotonic()
        time.sleep(1.0)
        wall = time.monotonic() - t0
        assert 0.2 * wall <= cpu_seconds(spin.pid) - spin0 <= wall + 0.05  # a CPU's worth at most
        assert cpu_seconds(sleeper.pid) - sleep0 < 0.05  # asleep all along: nothing
    finally:
        for p in (spin, sleeper):
            p.kill()
            p.wait()


def test_cpu_seconds_of_a_process_that_is_gone_is_nan() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert math.isnan(cpu_seconds(p.pid))
