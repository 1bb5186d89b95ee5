"""Target 3: rebuilds of synthetic libraries through the real path, each in its own process.

For each size, ``bench.rebuild_worker populate`` fills a SQLite library once (kept between runs
in the work directory; ``--fresh`` makes new ones), then ``bench.rebuild_worker rebuild`` runs
``rebuild_clusters(k=150)`` in a fresh process and reports seconds per stage and the process's
peak RSS (``VmHWM``: Python, Django, NumPy and scikit-learn included). Absolute seconds are
what the target is stated in; the load average printed with the table says how busy the
machine was.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from bench.common import Context, Row, run_step

FLATTEN_DIM = 100_352


def worker(ctx: Context, *args: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.rebuild_worker", *args, "--workdir", str(ctx.workdir)]
    return run_step(command, one_blas_thread=args[0] == "suggest")


def library(ctx: Context, n: int, dim: int) -> str:
    name = f"rebuild-{n}x{dim}"
    marker = ctx.workdir / f"{name}.populated"
    if ctx.fresh or not marker.exists():
        ctx.say(f"Populating a synthetic {n:,} × {dim}-d library ({name}.sqlite3).")
        result = worker(ctx, "populate", "--name", name, "--n", str(n), "--dim", str(dim))
        marker.write_text(json.dumps(result))
    return name


def rebuild(ctx: Context, n: int, dim: int, memory_mb: float | None = None) -> dict[str, Any]:
    name = library(ctx, n, dim)
    args = ["rebuild", "--name", name, "--dim", str(dim), "--k", "150"]
    if memory_mb is not None:
        args += ["--memory-mb", str(memory_mb)]
    mode = "streamed" if memory_mb is not None else "default"
    ctx.say(f"Rebuilding {n:,} × {dim}-d, K=150 ({mode}).")
    result = worker(ctx, *args)
    ctx.facts.setdefault("rebuilds", []).append({**result, "memory_mb": memory_mb})
    return result


def _note(result: dict[str, Any]) -> str:
    return (
        f"{result['seconds']:.1f} s (read {result['read_seconds']:.1f}, fit "
        f"{result['fit_seconds']:.1f}, write {result['write_seconds']:.1f}), "
        f"{'streamed' if result['streamed'] else 'in memory'}, peak RSS "
        f"{result['peak_rss_mb']:.0f} MB"
    )


def suggestion_cost(ctx: Context, n: int) -> None:
    """suggest(vector) on the clustering just built: the part of a suggestion that grows with
    the library (the forward pass does not)."""
    for method in (None, "cluster"):
        ctx.say(f"suggest(vector) on the {n:,}-image library, method {method or 'default'}.")
        args = ["suggest", "--name", f"rebuild-{n}x512", "--dim", "512"]
        result = worker(ctx, *args, *(["--method", method] if method else []))
        ctx.facts.setdefault("suggest_by_size", []).append(result)
        ctx.rows.append(
            Row(
                "2",
                f"suggest(vector) at {n:,} images, method {method or 'default'}: median",
                result["median_ms"],
                "",
                f"no forward pass; warm {result['warm_median_ms']:.2f} ms (the same queries "
                f"again); first call {result['first_ms']:.0f} ms (loads centres or index), peak "
                f"RSS {result['peak_rss_mb']:.0f} MB",
                " ms",
            )
        )
    ctx.say(f"First suggest(vector) after warm_up() on the {n:,}-image library.")
    args = ["suggest", "--name", f"rebuild-{n}x512", "--dim", "512", "--warm-up", "--queries", "5"]
    result = worker(ctx, *args)
    ctx.facts.setdefault("suggest_after_warm_up", []).append(result)
    ctx.rows.append(
        Row(
            "2",
            f"first suggest(vector) after warm_up() at {n:,} images, method default",
            result["first_ms"],
            "",
            f"warm_up() took {result['warm_up_seconds']:.1f} s in the background (model, "
            f"centres, every cluster, tag shares); later calls median {result['median_ms']:.2f} "
            f"ms; index {result['index_mb']:.0f} MB, peak RSS {result['peak_rss_mb']:.0f} MB "
            "with the model",
            " ms",
        )
    )


def run(ctx: Context, sizes: list[int], flatten_n: int) -> None:
    for n in sizes:
        result = rebuild(ctx, n, 512)
        if n == 100_000:
            ctx.rows.append(
                Row(
                    "3",
                    "rebuild 100,000 × 512-d, K=150: seconds / 60 s",
                    result["seconds"] / 60,
                    "<= 1.00",
                    _note(result),
                )
            )
            ctx.rows.append(
                Row(
                    "3",
                    "rebuild 100,000 × 512-d: peak RSS / 2 GB",
                    result["peak_rss_mb"] / 2048,
                    "<= 1.00",
                    f"{result['peak_rss_mb']:.0f} MB",
                )
            )
            # The streamed path on the same library (forced by a 64 MB budget): what 1M uses.
            streamed = rebuild(ctx, n, 512, memory_mb=64)
            ctx.rows.append(
                Row(
                    "3",
                    "streamed / in-memory rebuild at 100,000: mean cosine to centre",
                    streamed["mean_similarity"] / result["mean_similarity"],
                    ">= 0.98",
                    f"{streamed['mean_similarity']:.4f} vs {result['mean_similarity']:.4f}; "
                    f"streamed: {_note(streamed)}",
                )
            )
        else:
            ctx.rows.append(
                Row(
                    "3",
                    f"rebuild {n:,} × 512-d, K=150: seconds",
                    result["seconds"],
                    "",
                    _note(result),
                    " s",
                )
            )
        suggestion_cost(ctx, n)
    if flatten_n:
        result = rebuild(ctx, flatten_n, FLATTEN_DIM)
        library_mb = flatten_n * FLATTEN_DIM * 4 / 2**20
        ctx.rows.append(
            Row(
                "3",
                f"flatten {flatten_n:,} × 100,352-d, K=150: seconds",
                result["seconds"],
                "",
                _note(result),
                " s",
            )
        )
        ctx.rows.append(
            Row(
                "3",
                f"flatten {flatten_n:,}: peak RSS / float32 library size (1.0 = all loaded)",
                result["peak_rss_mb"] / library_mb,
                "<= 1.00",
                f"{result['peak_rss_mb']:.0f} MB for a {library_mb:,.0f} MB library "
                "(REBUILD_MEMORY_MB 1024)",
            )
        )
