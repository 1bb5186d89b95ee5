"""Feature vectors: L2 normalisation and the compact bytes form stored in the database.

Two stored formats, told apart by their first four bytes, so rows written before float16 existed
keep decoding and both kinds can sit in one table while a library is being re-saved:

- **float32** (the original format): the raw little-endian float32 values, nothing else;
- **float16**: the 4-byte marker :data:`FLOAT16_MARKER`, then little-endian float16 values —
  half the bytes. Read as a float32, the marker is a NaN, which a stored (unit, finite) float32
  vector never starts with, so the two formats cannot be confused whatever the dimension.

Which one :func:`to_bytes` writes is the caller's choice (the site's ``VECTOR_DTYPE`` setting, read
by ``services.vectors``). Readers always get float32.
float16 keeps about 3 significant digits per value: cosine similarities move by ~1e-4, far below
the gaps that decide a nearest centre (docs/performance.md measures it on real photos).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

#: The original format: little-endian float32, whatever the machine. Kept under its old name.
VECTOR_DTYPE = np.dtype("<f4")
FLOAT16_DTYPE = np.dtype("<f2")
#: First bytes of a float16 row: "f2", then 0xf0 0x7f, which make the word a float32 NaN.
FLOAT16_MARKER = b"f2\xf0\x7f"
_MARKER_ARRAY = np.frombuffer(FLOAT16_MARKER, dtype=np.uint8)
_HEADER = len(FLOAT16_MARKER)
STORAGE_DTYPES = ("float32", "float16")


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


def to_bytes(vector: np.ndarray, dtype: str) -> bytes:
    """The stored form of one vector, in ``dtype`` (``"float32"`` or ``"float16"``)."""
    if dtype == "float16":
        return FLOAT16_MARKER + np.ascontiguousarray(vector, dtype=FLOAT16_DTYPE).tobytes()
    if dtype == "float32":
        return np.ascontiguousarray(vector, dtype=VECTOR_DTYPE).tobytes()
    raise ValueError(f"Unknown vector storage dtype {dtype!r}; use one of {STORAGE_DTYPES}.")


def is_float16(data: bytes | memoryview) -> bool:
    return bytes(data[:_HEADER]) == FLOAT16_MARKER


def from_bytes(data: bytes | memoryview) -> np.ndarray:
    """One stored vector (either format) as a float32 array.

    float16 rows are re-normalised after widening: rounding moves a unit vector's length by up
    to ~1e-3, and dot products must stay cosines.
    """
    data = bytes(data)
    if data[:_HEADER] == FLOAT16_MARKER:
        return _unit_rows(
            np.frombuffer(data, dtype=FLOAT16_DTYPE, offset=_HEADER).astype(np.float32)[None]
        )[0]
    return np.frombuffer(data, dtype=VECTOR_DTYPE)


def stack(
    rows: Iterable[bytes | memoryview],
    dim: int,
    count: int | None = None,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode stored vectors into one contiguous (n, dim) float32 array.

    Rows are joined a few megabytes at a time and each block is converted by NumPy in one step,
    not row by row (a block mixing old float32 and new float16 rows falls back to decoding each
    row). Blocks that fit in the CPU cache beat both one giant join and a per-row loop: 45 ms
    vs 160 and 140 ms for 100,000 float32 rows of 512-d. With ``out`` — e.g. a slice of a
    preallocated library matrix — the result is written there, so a large library is never held
    twice as float32; ``count`` is checked when given.
    """
    rows = rows if isinstance(rows, list) else list(rows)
    n = len(rows)
    if count is not None and n != count:
        raise ValueError(f"expected {count} vectors, read {n}")
    if out is None:
        out = np.empty((n, dim), dtype=np.float32)
    elif out.shape != (n, dim) or out.dtype != np.float32:
        raise ValueError(f"out has shape {out.shape} {out.dtype}, expected ({n}, {dim}) float32")
    step = max(1, _STACK_BLOCK_BYTES // (4 * max(dim, 1)))
    for start in range(0, n, step):
        _stack_block(rows[start : start + step], dim, out[start : start + step])
    return out


# Bytes of stored rows joined at once by stack(): small enough to stay in the CPU cache.
_STACK_BLOCK_BYTES = 4 * 2**20


def _stack_block(rows: list[bytes | memoryview], dim: int, out: np.ndarray) -> None:
    n = len(rows)
    blob = b"".join(rows)
    f16_row, f32_row = _HEADER + 2 * dim, 4 * dim
    if len(blob) == n * f16_row:
        raw = np.frombuffer(blob, dtype=np.uint8).reshape(n, f16_row)
        if (raw[:, :_HEADER] == _MARKER_ARRAY).all():
            halves = np.frombuffer(blob, dtype=FLOAT16_DTYPE).reshape(n, f16_row // 2)
            out[...] = halves[:, _HEADER // 2 :]
            _unit_rows(out)
            return
    if len(blob) == n * f32_row:
        raw = np.frombuffer(blob, dtype=np.uint8).reshape(n, f32_row)
        if not (raw[:, :_HEADER] == _MARKER_ARRAY).all(axis=1).any():
            out[...] = np.frombuffer(blob, dtype=VECTOR_DTYPE).reshape(n, dim)
            return
    del blob
    # Mixed formats (a library part re-saved) or a wrong dimension: row by row, with its error.
    for index, data in enumerate(rows):
        vec = from_bytes(data)
        if vec.shape[0] != dim:
            raise ValueError(f"stored vector has {vec.shape[0]} dimensions, expected {dim}")
        out[index] = vec


def stored_dim(data: bytes | memoryview) -> int:
    """Dimensions of a stored vector, from its length (no decoding)."""
    if is_float16(data):
        return (len(data) - _HEADER) // FLOAT16_DTYPE.itemsize
    return len(data) // VECTOR_DTYPE.itemsize


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Scale float32 rows to unit length in place (zero rows stay zero)."""
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
    norms[norms == 0] = 1.0
    matrix /= norms[:, None]
    return matrix


# Compact blocks: bfloat16, the upper half of each float32, kept as uint16. Widening is one
# integer shift, which NumPy does at memory speed, while its float16 cast runs ~6× slower than
# the float32 scan itself (measured: docs/performance.md §2). A row's similarity moves by at most
# ~3e-4 (8 significant bits per value; the query stays float32).
BFLOAT16 = np.dtype(np.uint16)
# Rows widened at a time: 256 × 512-d float32 is 512 KB, within the L2 cache.
_WIDEN_BYTES = 2**19


def to_bfloat16(matrix: np.ndarray) -> np.ndarray:
    """float32 rows as bfloat16 bit patterns (uint16), rounded to nearest, ties to even."""
    bits = np.ascontiguousarray(matrix, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(BFLOAT16)


def from_bfloat16(block: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns back to float32 (exact: every bfloat16 is a float32)."""
    return (block.astype(np.uint32) << np.uint32(16)).view(np.float32)


def block_similarities(block: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``block @ query`` for a float32 block, or for a bfloat16 one widened a few hundred rows
    at a time into a cache-sized buffer (never the whole block: that would undo the saving)."""
    if block.dtype != BFLOAT16:
        return block @ query
    n, dim = block.shape
    out = np.empty(n, dtype=np.float32)
    step = max(1, _WIDEN_BYTES // (4 * max(dim, 1)))
    buffer = np.empty((min(step, n), dim), dtype=np.uint32)
    query = np.asarray(query, dtype=np.float32)
    for start in range(0, n, step):
        rows = block[start : start + step]
        wide = buffer[: rows.shape[0]]
        np.left_shift(rows, 16, out=wide, dtype=np.uint32)
        np.dot(wide.view(np.float32), query, out=out[start : start + rows.shape[0]])
    return out
