"""Seeded synthetic streams of expert forecasts and outcomes, for the demo, tests and benchmarks.

Pure Python (no torch, no numpy): the demo runs it client-side.

    >>> experts, features, direction = next(informative_stream(seed=1, n=1))
    >>> [e["name"] for e in experts], sorted(features), direction in ("UP", "DOWN")
    (['good', 'noise0', 'noise1', 'noise2'], ['close', 'rsi'], True)
"""
from __future__ import annotations

import random
from typing import Iterator

Event = tuple[list[dict], dict | None, str]


def informative_stream(seed: int, n: int, *, skill: float = 0.1, n_noise: int = 3,
                       features: bool = True) -> Iterator[Event]:
    """One informative expert, "good", whose prob_up leans toward the true direction by `skill`
    (plus noise of sd 0.15: about 75% accurate at skill 0.1), and `n_noise` experts that are pure
    noise. Features: a random-walk-free close around 50,000 and an rsi in [10, 90], uninformative."""
    rng = random.Random(seed)
    for _ in range(n):
        up = rng.random() < 0.5
        lean = skill if up else -skill
        good = min(max(0.5 + lean + rng.gauss(0.0, 0.15), 0.01), 0.99)
        experts = [{"name": "good", "prob_up": good}]
        experts += [{"name": f"noise{i}", "prob_up": rng.uniform(0.2, 0.8)} for i in range(n_noise)]
        feats = {"close": 50_000.0 + rng.gauss(0.0, 800.0), "rsi": rng.uniform(10.0, 90.0)} if features else None
        yield experts, feats, "UP" if up else "DOWN"
