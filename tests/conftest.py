"""Shared fixtures. torch runs on one thread: that is what makes training bit-reproducible."""
from __future__ import annotations

import pytest

try:
    import torch
except ImportError:  # the client-only tests run without torch
    torch = None
else:
    torch.set_num_threads(1)


@pytest.fixture
def stream():
    """informative_stream(seed, n, ...): one informative expert ("good") and three noise ones."""
    from titan_fusion.server.synthetic import informative_stream
    return informative_stream
