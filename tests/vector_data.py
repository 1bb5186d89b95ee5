"""Unit vectors with neighbour structure, for measuring vector-search backends.

Uniform random vectors have no near neighbours (every pair is at cosine ~0) and defeat every ANN
engine; features of real images cluster. These stand in for them: each vector sits at cosine
``cosine`` from one of ``topics`` random centres, so its neighbours are its topic's members.
"""

from __future__ import annotations

import numpy as np


def structured_vectors(
    n: int, dim: int, *, topics: int = 300, cosine: float = 0.6, seed: int = 0
) -> np.ndarray:
    """(n, dim) float32 unit rows, each at cosine ``cosine`` from a random one of ``topics``
    random unit centres (the same centres for the same ``seed``, whatever ``n``)."""
    centers = np.random.default_rng(seed).normal(size=(topics, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, n])
    topic = centers[rng.integers(topics, size=n)]
    noise = rng.normal(size=(n, dim))
    noise -= np.sum(noise * topic, axis=1, keepdims=True) * topic  # orthogonal to the centre
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    vectors = cosine * topic + np.sqrt(1.0 - cosine**2) * noise
    return vectors.astype(np.float32)


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over query rows of the share of the true ``k`` nearest ids among the ``k`` found."""
    hits = [np.intersect1d(f[:k], t[:k]).shape[0] / k for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits))
