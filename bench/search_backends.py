"""The vector-search backends at one library size: build, file, query time, recall, memory.

    python bench/search_backends.py                      # 100,000 × 512-d, 300 queries
    python bench/search_backends.py --n 20000 --dim 128  # quicker

Library: unit vectors around 300 hidden topics at cosine ~0.6 to their topic (the generator of
``bench/rebuild_worker.py``); queries are new draws from the same topics (new images of known
kinds, not copies of library members). ``exact`` (``ExactSearch``, every vector in one list:
exact k-NN) is the reference; for ``usearch`` the script prints, per ``expansion_search``:
recall@50 of the ``k=80`` neighbours serving asks for (4 × neighbours), p50 per query (one
query at a time, as one request does), and once: the build time, the f16 file's size, and the
memory a second process adds when it maps the file (``view=True``) while a first one maps it
too (``/proc/self/smaps_rollup``: private pages are this process's own, shared ones are the
page cache every process of the machine shares).
"""

from __future__ import annotations

import os

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imagetags.core.vectors import l2_normalize  # noqa: E402
from imagetags.search import ExactSearch, UsearchSearch  # noqa: E402

TOPICS = 300


def structured(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(0)  # the same topics for library and queries
    topics = l2_normalize(rng.normal(size=(TOPICS, dim)).astype(np.float32))
    rng = np.random.default_rng(seed)
    sigma = np.float32(np.sqrt((1 / 0.6**2 - 1) / dim))
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 20_000):  # chunks: the noise of 1M × 512 would not fit twice
        stop = min(n, start + 20_000)
        chunk = topics[rng.integers(0, TOPICS, stop - start)]
        chunk += rng.normal(scale=sigma, size=chunk.shape).astype(np.float32)
        out[start:stop] = l2_normalize(chunk)
    return out


def smaps() -> dict[str, int]:
    """This process's memory by kind, kB (``/proc/self/smaps_rollup``)."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return fields


def viewer(path: str, queries_path: str, hold: bool) -> None:
    """Child process: map the file, search, print what the mapping and the searches added."""
    queries = np.load(queries_path)
    before = smaps()
    search = UsearchSearch.open(path)  # view=True
    for query in queries:
        search.search(query, 80)
    after = smaps()
    delta = {key: after[key] - before[key] for key in before}
    print(json.dumps(delta), flush=True)
    if hold:  # keep the mapping while the second process measures
        sys.stdin.read()


def p50_ms(search, queries: np.ndarray, k: int) -> float:
    times = []
    for query in queries:
        started = time.perf_counter()
        search.search(query, k)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(
        np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth, strict=True)])
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--ef", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--connectivity", type=int, default=16)
    parser.add_argument("--expansion-add", type=int, default=128)
    parser.add_argument("--viewer", nargs=2, metavar=("INDEX", "QUERIES"), help=argparse.SUPPRESS)
    parser.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.viewer:
        viewer(*args.viewer, hold=args.hold)
        return 0

    vectors = structured(args.n, args.dim, seed=1)
    queries = structured(args.queries, args.dim, seed=2)
    ids = np.arange(args.n)
    rows = []

    exact = ExactSearch(np.zeros((1, args.dim), np.float32), compact=False)
    started = time.perf_counter()
    exact.add(ids, vectors, np.zeros(args.n, np.int64))
    exact_build = time.perf_counter() - started
    truth = exact.search(queries, 50)[0]
    rows.append(("exact", "-", exact_build, args.n * args.dim * 4, p50_ms(exact, queries, 80), 1.0))

    search = UsearchSearch(
        args.dim, connectivity=args.connectivity, expansion_add=args.expansion_add
    )
    started = time.perf_counter()
    search.add(ids, vectors)
    build = time.perf_counter() - started
    workdir = Path(tempfile.mkdtemp(prefix="imagetags-search-bench-"))
    path = workdir / "library.usearch"
    search.save(path)
    size = path.stat().st_size
    del search
    for ef in args.ef:
        view = UsearchSearch.open(path, expansion_search=ef)
        found = np.stack([view.search(query, 80)[0][0] for query in queries])
        rows.append(
            ("usearch f16", ef, build, size, p50_ms(view, queries, 80), recall(found, truth, 50))
        )
        del view

    np.save(workdir / "queries.npy", queries[:100])
    command = [sys.executable, __file__, "--viewer", str(path), str(workdir / "queries.npy")]
    first = subprocess.Popen(
        [*command, "--hold"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    first_delta = json.loads(first.stdout.readline())
    second_delta = json.loads(
        subprocess.run(command, capture_output=True, text=True, check=True).stdout
    )
    first.stdin.close()
    first.wait()

    print(
        f"n={args.n} dim={args.dim} queries={args.queries} M={args.connectivity} "
        f"efConstruction={args.expansion_add}; p50 of k=80, recall@50 vs exact"
    )
    print(f"{'backend':<12} {'ef':>4} {'build s':>8} {'file MB':>8} {'p50 ms':>7} {'recall@50':>9}")
    for name, ef, built, nbytes, p50, rec in rows:
        print(f"{name:<12} {ef!s:>4} {built:8.1f} {nbytes / 2**20:8.1f} {p50:7.2f} {rec:9.3f}")
    for label, delta in (("first", first_delta), ("second", second_delta)):
        private = (delta["Private_Clean"] + delta["Private_Dirty"]) / 1024
        shared = (delta["Shared_Clean"] + delta["Shared_Dirty"]) / 1024
        print(
            f"{label} viewing process adds: RSS {delta['Rss'] / 1024:.1f} MB = private "
            f"{private:.1f} MB (anonymous {delta['Anonymous'] / 1024:.1f} MB) + shared "
            f"{shared:.1f} MB"
        )
    for leftover in workdir.iterdir():
        leftover.unlink()
    workdir.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
