"""Target 5: bytes per stored vector, and reading a chunk of rows as one contiguous array.

The "row by row" variant is how vectors were read before (``from_bytes`` per row into a
preallocated array); ``vectors.stack`` joins the rows' bytes and converts them in one NumPy call.
"""

from __future__ import annotations

import numpy as np

from bench.common import Context, Row, interleave, median


def row_by_row(rows: list[bytes], dim: int) -> np.ndarray:
    from imagetags.services import vectors

    out = np.empty((len(rows), dim), dtype=np.float32)
    for index, data in enumerate(rows):
        out[index] = vectors.from_bytes(data)
    return out


def run(ctx: Context) -> None:
    from imagetags.services import vectors

    n, dim = (20_000, 512) if ctx.quick else (100_000, 512)
    matrix = vectors.l2_normalize(np.random.default_rng(0).normal(size=(n, dim)))
    rows32 = [vectors.to_bytes(row, "float32") for row in matrix]
    rows16 = [vectors.to_bytes(row, "float16") for row in matrix]
    ctx.say(f"Target 5: decoding {n:,} stored {dim}-d vectors, row by row vs contiguous.")

    def timed(decode, rows: list[bytes]):  # noqa: ANN001, ANN202 - a tiny closure factory
        def run() -> None:
            decode(rows, dim)

        return run

    samples = interleave(
        {
            "float32 row by row": timed(row_by_row, rows32),
            "float32 stack": timed(vectors.stack, rows32),
            "float16 row by row": timed(row_by_row, rows16),
            "float16 stack": timed(vectors.stack, rows16),
        },
        rounds=3,
    )
    ctx.rows.append(
        Row(
            "5",
            "float16 bytes per vector / float32",
            len(rows16[0]) / len(rows32[0]),
            "<= 0.55",
            f"{len(rows16[0])} vs {len(rows32[0])} bytes at {dim}-d (4-byte format marker)",
        )
    )
    slow, fast = median(samples["float16 row by row"]), median(samples["float16 stack"])
    ctx.rows.append(
        Row(
            "5",
            "contiguous decode speed-up vs row by row, float16",
            slow / fast,
            ">= 1.00",
            f"{n:,} rows: {fast * 1000:.0f} ms vs {slow * 1000:.0f} ms; float32: "
            f"{median(samples['float32 stack']) * 1000:.0f} vs "
            f"{median(samples['float32 row by row']) * 1000:.0f} ms",
        )
    )
    decoded = vectors.stack(rows16, dim)
    ctx.facts["float16_max_abs_error"] = float(np.abs(decoded - matrix).max())
    ctx.facts["float16_min_cosine"] = float(np.sum(decoded * matrix, axis=1).min())
