"""Query time of the default method (``ivf``) against exact k-NN voting at 100,000 library images.

    python bench/query_speed.py            # 100,000 × 1280-d and × 512-d, 200 queries each
    python bench/query_speed.py --n 20000  # smaller, quicker

Synthetic unit vectors (a mixture of 1,000 Gaussian topics, so neighbours mean something) stand in
for a library of MobileNetV2 (1280-d) or VGG16 (512-d) features, each image its own post with a
few tags of its topic. Both methods run the serving code: ``search.exact.ExactSearch`` (every
vector, as one list, for ``knn``; the K centres, then the members of the ``PROBES`` nearest
clusters for ``ivf``), then ``core.voting.vote`` (the neighbour vote and the ranking). K is what ``rebuild_clusters``
picks for that size (``kmeans.auto_k``); the centres are fitted with the same mini-batch k-means
on a 20,000-vector sample and every vector is assigned to its nearest centre, as a rebuild does.

BLAS runs on one thread for both (as one request in one web worker does), timings are the
median over the queries, and both methods are timed in the same run, interleaved per query, so
machine load hits both alike. The target is a ratio of at least 10×; the script exits with
status 1 when a row misses it.
"""

from __future__ import annotations

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imagetags.conf import DEFAULTS  # noqa: E402
from imagetags.core import (  # noqa: E402
    counting,
    kmeans,  # noqa: E402
    voting,
)
from imagetags.search.exact import ExactSearch  # noqa: E402
from imagetags.services.vectors import l2_normalize  # noqa: E402

TARGET = 10.0
TOPICS = 1000


def synthetic_library(n: int, dim: int, seed: int) -> tuple[np.ndarray, list[frozenset[str]]]:
    """Unit vectors around ``TOPICS`` random directions, and the tags of each (its own post)."""
    rng = np.random.default_rng(seed)
    topics = l2_normalize(rng.normal(size=(TOPICS, dim)).astype(np.float32))
    labels = rng.integers(0, TOPICS, n)
    matrix = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 10_000):  # in chunks: one float64 copy of 100,000 × 1280 is 1 GB
        rows = slice(start, start + 10_000)
        noise = rng.normal(scale=0.9 / np.sqrt(dim), size=(len(labels[rows]), dim))
        matrix[rows] = l2_normalize(topics[labels[rows]] + noise.astype(np.float32))
    tags = [
        frozenset(
            {"food", f"topic{label}", f"group{label // 10}"} | ({"extra"} if i % 7 else set())
        )
        for i, label in enumerate(labels)
    ]
    return matrix, tags


def run(n: int, dim: int, queries: int, seed: int) -> dict[str, float]:
    params = voting.VoteParams.from_setting(DEFAULTS["VOTING"])
    exact = params.exact()
    matrix, tags = synthetic_library(n, dim, seed)
    posts = list(range(n))
    voters = [voting.voter_of(post, None, params.vote_by) for post in posts]
    prior = counting.prior_shares(dict(zip(posts, tags, strict=True)))
    k = kmeans.auto_k(n)
    sample = np.random.default_rng(seed).choice(n, size=min(n, 20_000), replace=False)
    fitted = kmeans.fit_clusters(matrix[sample], k, seed=seed)
    labels, _sims = kmeans.nearest_centers(matrix, fitted.centers)
    lists = ExactSearch(fitted.centers, compact=False)
    lists.add(np.arange(n), matrix, labels)
    # The compact lists ExactSearch keeps for sets over 256 MB of float32: bfloat16.
    compact = ExactSearch(fitted.centers, compact=True)
    compact.add(np.arange(n), matrix, labels)
    # knn compares every vector: the whole library as one list, one product per query.
    whole = ExactSearch(fitted.centers[:1], compact=False)
    whole.add(np.arange(n), matrix, np.zeros(n, dtype=np.int64))
    rng = np.random.default_rng(seed + 1)
    picks = rng.integers(0, n, queries)
    noise = rng.normal(scale=0.9 / np.sqrt(dim), size=(queries, dim)).astype(np.float32)
    probes_q = l2_normalize(matrix[picks] + noise)

    def answer(
        query: np.ndarray, asked: voting.VoteParams, inverted: ExactSearch = lists
    ) -> tuple[list, np.ndarray]:
        searched = whole if asked.probes is None else inverted

        def search(c: int) -> tuple[np.ndarray, np.ndarray]:
            ids, sims = searched.search(query[None, :], c, asked.probes)
            return ids[0], sims[0]

        ranked, found = voting.vote(
            search,
            voters.__getitem__,
            lambda ids: [tags[int(i)] for i in ids],
            asked,
            available=n,
            prior=prior,
            limit=10,
        )
        return ranked, found.ids

    for query in probes_q[:5]:  # warm caches and code paths
        answer(query, exact), answer(query, params)
    exact_ms, ivf_ms, compact_ms, recall, same_top5 = [], [], [], [], []
    compact_recall, compact_same = [], []
    for query in probes_q:
        started = time.perf_counter()
        exact_ranked, exact_ids = answer(query, exact)
        exact_ms.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        ivf_ranked, ivf_ids = answer(query, params)
        ivf_ms.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        compact_ranked, compact_ids = answer(query, params, compact)
        compact_ms.append(1000 * (time.perf_counter() - started))
        recall.append(len(set(exact_ids.tolist()) & set(ivf_ids.tolist())) / len(exact_ids))
        same_top5.append([t.tag for t in exact_ranked[:5]] == [t.tag for t in ivf_ranked[:5]])
        compact_recall.append(
            len(set(ivf_ids.tolist()) & set(compact_ids.tolist())) / max(1, len(ivf_ids))
        )
        compact_same.append([t.tag for t in ivf_ranked[:5]] == [t.tag for t in compact_ranked[:5]])
    members = np.bincount(labels, minlength=fitted.k)
    touched = [fitted.k + int(members[lists.probe(q, params.probes)].sum()) for q in probes_q]
    exact_median, ivf_median = statistics.median(exact_ms), statistics.median(ivf_ms)
    return {
        "n": n,
        "dim": dim,
        "k": fitted.k,
        "probes": params.probes,
        "touched": statistics.mean(touched),
        "exact_ms": exact_median,
        "ivf_ms": ivf_median,
        "ratio": exact_median / ivf_median,
        "compact_ms": statistics.median(compact_ms),
        "compact_recall": statistics.mean(compact_recall),
        "compact_same_top5": statistics.mean(compact_same),
        "recall": statistics.mean(recall),
        "same_top5": statistics.mean(same_top5),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="library images (%(default)s)")
    parser.add_argument(
        "--dims", default="1280,512", help="vector sizes, comma separated (%(default)s)"
    )
    parser.add_argument("--queries", type=int, default=200, help="queries (%(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    voting = DEFAULTS["VOTING"]
    print(
        f"Default method ivf: {voting['NEIGHBOURS']} neighbours, temperature "
        f"{voting['TEMPERATURE']}, prior weight {voting['PRIOR_WEIGHT']}, {voting['PROBES']} "
        f"probes; knn: the same voting over every vector. {args.queries} queries, 1 BLAS thread, "
        "median ms per query (search + vote + ranking)."
    )
    print()
    header = (
        f"{'dim':>5} {'library':>8} {'K':>4} {'probes':>6} {'compared':>9} "
        f"{'knn ms':>8} {'ivf ms':>7} {'ratio':>7} {'target':>7} {'recall@n':>9} "
        f"{'same top 5':>10}"
    )
    print(header)
    missed = False
    for dim in [int(part) for part in args.dims.split(",")]:
        row = run(args.n, dim, args.queries, args.seed)
        ok = row["ratio"] >= TARGET
        missed |= not ok
        print(
            f"{row['dim']:>5} {row['n']:>8} {row['k']:>4} {row['probes']:>6} "
            f"{row['touched']:>9.0f} {row['exact_ms']:>8.2f} {row['ivf_ms']:>7.2f} "
            f"{row['ratio']:>6.1f}× {'≥10× ' + ('ok' if ok else 'MISSED'):>7} "
            f"{row['recall']:>9.3f} {row['same_top5']:>10.1%}",
            flush=True,
        )
        print(
            f"      bfloat16 blocks: {row['compact_ms']:.2f} ms "
            f"({row['compact_ms'] / row['ivf_ms']:.2f}× float32 ivf), neighbours shared with "
            f"float32 ivf {row['compact_recall']:.3f}, same top 5 {row['compact_same_top5']:.1%}",
            flush=True,
        )
    print()
    print(
        "compared: vectors a query is compared with (ivf: K centres + the probed clusters' "
        "members; knn: every vector). recall@n: share of exact k-NN's neighbours that ivf found; "
        "same top 5: queries whose top 5 tags are identical (synthetic data, for orientation; "
        "quality is measured on real photos in docs/quality.md)."
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
