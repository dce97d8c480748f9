"""Shared fixtures. torch runs on one thread: that is what makes training bit-reproducible."""
from __future__ import annotations

import random

import pytest

try:
    import torch
except ImportError:  # the client-only tests run without torch
    torch = None
else:
    torch.set_num_threads(1)


def synthetic_stream(seed: int, n: int, *, skill: float = 0.1, n_noise: int = 3, features: bool = True):
    """(experts, features, direction) events: expert "good" knows the direction with `skill`
    (its prob_up leans toward the truth by about that much), the others are pure noise."""
    rng = random.Random(seed)
    for _ in range(n):
        up = rng.random() < 0.5
        lean = skill if up else -skill
        good = min(max(0.5 + lean + rng.gauss(0.0, 0.15), 0.01), 0.99)
        experts = [{"name": "good", "prob_up": good}]
        experts += [{"name": f"noise{i}", "prob_up": rng.uniform(0.2, 0.8)} for i in range(n_noise)]
        feats = {"close": 50_000.0 + rng.gauss(0.0, 800.0), "rsi": rng.uniform(10.0, 90.0)} if features else None
        yield experts, feats, "UP" if up else "DOWN"


@pytest.fixture
def stream():
    return synthetic_stream
