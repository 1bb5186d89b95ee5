"""Feature vectors: L2 normalisation and the compact bytes form stored in the database."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

VECTOR_DTYPE = np.dtype("<f4")  # little-endian float32, whatever the machine


def l2_normalize(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), as float32.

    For unit vectors Euclidean distance and cosine similarity rank neighbours identically, so the
    patent's "vector difference" and our dot products agree.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim == 1:
        norm = float(np.linalg.norm(matrix))
        return matrix / norm if norm > 0 else matrix
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return matrix / norms


def to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=VECTOR_DTYPE).tobytes()


def from_bytes(data: bytes | memoryview) -> np.ndarray:
    return np.frombuffer(bytes(data), dtype=VECTOR_DTYPE)


def stack(rows: Iterable[bytes | memoryview], dim: int, count: int | None = None) -> np.ndarray:
    """Decode stored vectors into one contiguous (n, dim) float32 array.

    With ``count`` the array is allocated once and filled in place, so reading a large library
    never holds two copies of it.
    """
    if count is None:
        rows = list(rows)
        count = len(rows)
    out = np.empty((count, dim), dtype=np.float32)
    n = 0
    for n, data in enumerate(rows, start=1):  # noqa: B007 - n is used after the loop
        vec = from_bytes(data)
        if vec.shape[0] != dim:
            raise ValueError(f"stored vector has {vec.shape[0]} dimensions, expected {dim}")
        out[n - 1] = vec
    if n != count:
        raise ValueError(f"expected {count} vectors, read {n}")
    return out
