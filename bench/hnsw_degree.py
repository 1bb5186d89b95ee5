"""How HNSW's M (links per node) bounds recall as a library grows: the graph alone, no Django.

    python -m bench.hnsw_degree --n 1000000 --connectivity 16 32

Draws the search benchmark's library (``bench.search``: the CNN-like structure, its topics and
their Zipf weights, 512-d) and 200 queries (new images of its topics) in memory, finds each
query's 50 nearest by brute force over the float32 vectors, then for each M builds a usearch
graph as the engine does (f16, cosine, ``expansion_add`` 128, every core) and searches it as the
serving does (k = 80, one thread) at several ``expansion_search``. Prints one JSON line per M:
build seconds, file MB, and per effort the recall@50 and the search p50 in ms.

It also prints the recall@50 of brute force over the f16-rounded vectors: the limit of storing
f16 at all, so that a shortfall can be told apart from the graph's. The vectors are drawn here
with their own generator, so the library is of the same kind as the benchmark's, not the same
file (its figures are comparable, not identical).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from bench.rebuild_worker import TopicModel, topic_weights
from bench.search import COSINE, DIM, STRUCTURES, ZIPF, recall_at, topics_for

QUERIES = 200
K = 80  # what the serving asks the engine for (voting keeps the nearest of them)
RECALL_AT = 50
EFFORTS = (128, 256, 512)


def library(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    topics = topics_for(n)
    rank, isotropic = STRUCTURES["cnn"]
    model = TopicModel.make(topics, DIM, seed, COSINE, rank, isotropic)
    rng = np.random.default_rng([seed, 1])
    weights = topic_weights(topics, ZIPF)
    matrix = np.empty((n, DIM), np.float32)
    for start in range(0, n, 50_000):
        size = min(50_000, n - start)
        matrix[start : start + size] = model.draw(rng.choice(topics, size, p=weights), rng)
    return matrix, model.draw(rng.choice(topics, QUERIES, p=weights), rng)


def nearest(matrix: np.ndarray, queries: np.ndarray) -> np.ndarray:
    return np.argsort(-(queries @ matrix.T), axis=1)[:, :RECALL_AT]


def graph(matrix: np.ndarray, queries: np.ndarray, truth: np.ndarray, m: int) -> dict:
    from usearch.index import Index

    index = Index(ndim=DIM, metric="cos", dtype="f16", connectivity=m, expansion_add=128)
    started = time.perf_counter()
    for start in range(0, len(matrix), 100_000):
        block = np.ascontiguousarray(matrix[start : start + 100_000])
        index.add(np.arange(start, start + len(block)), block, threads=0)
    out: dict = {"connectivity": m, "build_s": round(time.perf_counter() - started, 1)}
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "graph.usearch")
        index.save(path)
        out["file_mb"] = round(os.path.getsize(path) / 2**20)
    for effort in EFFORTS:
        index.expansion_search = effort
        found, times = [], []
        for query in queries:
            began = time.perf_counter()
            matches = index.search(query, K, threads=1)
            times.append(time.perf_counter() - began)
            found.append(np.asarray(matches.keys, dtype=np.int64).tolist())
        out[f"ef{effort}"] = {
            "recall": round(recall_at(found, truth), 3),
            "p50_ms": round(float(np.median(times)) * 1000, 2),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--connectivity", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    matrix, queries = library(args.n, args.seed)
    truth = nearest(matrix, queries)
    rounded = nearest(matrix.astype(np.float16).astype(np.float32), queries)
    print(
        json.dumps(
            {"n": args.n, "f16_brute_force_recall": round(recall_at(rounded.tolist(), truth), 4)}
        ),
        flush=True,
    )
    for m in args.connectivity:
        print(json.dumps({"n": args.n, **graph(matrix, queries, truth, m)}), flush=True)


if __name__ == "__main__":
    main()
