"""The vector-search engine that finds a query's neighbours, chosen by ``IMAGETAGS["SEARCH"]``.

Whatever the engine, what it holds is the same: the vectors of the active cluster set's members,
and the voting, priors, evidence and freshness rules above it (``services.index``, ``core.voting``)
do not change. Three backends (``imagetags.search``):

``exact`` (the default)
    Each web process reads the members it needs from the database into an inverted file in its
    own memory (``VotingIndex``). Nothing to build: the reference the others are measured against.

``pgvector``
    One table per extractor key and dimension (``search.pgvector.table_name``) in the database
    ``OPTIONS["DATABASE"]`` (the one holding the models: the table is written in the same
    transaction as the memberships), with an HNSW index. The rebuild brings the table in step
    with the new set (only the images that joined or left; the first rebuild loads every member
    by COPY, then builds the index), and ``assign_to_active_set`` inserts each new member in the
    transaction that creates its membership, so a new image votes as soon as it is committed.
    A deleted image's row stays until the next rebuild; no query returns it as a voter
    (``VotingIndex`` checks that every candidate still exists).

``usearch``
    One HNSW file per cluster set in the directory ``OPTIONS["PATH"]`` (local disk, shared by the
    web and worker processes of one machine), named ``set-<set>-<created>-<watermark>.usearch``:
    the file holds the set's members up to membership key ``watermark``. The rebuild writes it
    before it activates the set (starting from the previous set's file: the vectors of an image
    do not change between sets, only who is in), web processes map it read-only (every process of
    the machine shares one copy in the page cache), and members newer than the file are read
    from the database into a small exact search until the worker saves a newer file
    (:func:`save_new_members`, after an assignment once enough members have arrived). Old files
    are deleted by the worker; a process that still maps one keeps it until it reopens.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, router

from imagetags.conf import imagetags_settings
from imagetags.contrib.pgvector.extension import extension_installed, install_hint
from imagetags.models import ClusterMembership, ClusterSet, FeatureStatus, Post, StockImage
from imagetags.search import get_search_class, search_aliases
from imagetags.search.base import SearchIndexError, VectorSearch, hnsw_connectivity
from imagetags.search.pgvector import PgvectorSearch, table_name
from imagetags.search.usearch import UsearchSearch
from imagetags.services import store
from imagetags.services.errors import ClusteringError, SuggestionUnavailable

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: ``save_new_members`` writes a new file once this many members (or this share of the set,
#: whichever is more) are newer than the served one: below it, reading them from the database
#: into each process costs less than writing the whole file again.
RESAVE_AFTER = 1000
RESAVE_SHARE = 0.01
#: A rebuild builds the usearch graph anew, rather than from the previous set's file, when more
#: than this share of the file's images have left the library.
REBUILD_GRAPH_SHARE = 0.2
_FILE = re.compile(r"set-(?P<set>\d+)-(?P<created>\d+)-(?P<watermark>\d+)\.usearch")


class SearchIndexUnavailable(SuggestionUnavailable):
    """The configured engine has no index for the active set (a missing or unreadable file, a
    missing table): suggestions say so, and how to build it, instead of failing."""


@dataclass(frozen=True)
class SearchSetting:
    backend: str  # an alias of imagetags.search
    options: dict[str, Any]


def search_setting() -> SearchSetting:
    """``IMAGETAGS["SEARCH"]``, checked: a known backend whose package is installed."""
    value = imagetags_settings.SEARCH
    backend = value.get("BACKEND", "exact") if isinstance(value, dict) else None
    options = value.get("OPTIONS") or {} if isinstance(value, dict) else None
    if backend not in search_aliases() or not isinstance(options, dict):
        raise ImproperlyConfigured(
            f"IMAGETAGS['SEARCH'] is {value!r}: it must be a dict with a BACKEND among "
            f"{', '.join(search_aliases())} and a dict of OPTIONS."
        )
    missing = get_search_class(backend).missing_requirement()
    if missing:
        raise ImproperlyConfigured(missing)
    for name in ("EF_SEARCH", "EXPANSION_SEARCH", "CONNECTIVITY"):
        value = options.get(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ImproperlyConfigured(
                f"IMAGETAGS['SEARCH']['OPTIONS']['{name}'] must be a positive integer, not {value!r}."
            )
    if backend == "usearch" and not options.get("PATH"):
        raise ImproperlyConfigured(
            "IMAGETAGS['SEARCH']['OPTIONS']['PATH'] must name a local directory for the usearch "
            "index files, shared by the web and worker processes of this machine."
        )
    return SearchSetting(backend, options)


def connectivity(n_members: int) -> int:
    """HNSW's M for a graph of ``n_members``: ``OPTIONS["CONNECTIVITY"]`` or, unset, the one
    the size calls for (``hnsw_connectivity``). A graph already built sparser than this is
    built again by the next publish; a denser one is kept (a library that shrank)."""
    chosen = search_setting().options.get("CONNECTIVITY")
    return int(chosen) if chosen is not None else hnsw_connectivity(n_members)


def import_backend_modules() -> None:
    """Import the configured search backend's packages (``VectorSearch.import_modules``), and
    the NumPy module the serving's first ``np.unique`` would import (numpy.ma: ~20 ms), while a
    process starts. A setting that is wrong or a package that is missing is left to the system
    checks (``imagetags.E00x``), which say what to do; starting the process must not fail here."""
    import numpy.ma  # noqa: F401

    try:
        setting = search_setting()
    except ImproperlyConfigured:
        return
    get_search_class(setting.backend).import_modules()


def uses_engine() -> bool:
    """Whether neighbours come from an engine (pgvector, usearch) rather than ``exact``."""
    return search_setting().backend != "exact"


# --- pgvector ---------------------------------------------------------------------------------


def _database() -> str:
    return search_setting().options.get("DATABASE", "default")


def django_connect(alias: str) -> Callable[[], Any]:
    """For :class:`PgvectorSearch`: the DB-API connection under Django's database ``alias``."""

    def connect() -> Any:
        # The thread's Django connection: the engine's statements join its transaction.
        connection = connections[alias]
        connection.ensure_connection()
        return connection.connection

    return connect


def pgvector_table(cluster_set: ClusterSet) -> PgvectorSearch:
    """The pgvector table of the set's extractor (which may not exist yet)."""
    return PgvectorSearch(
        django_connect(_database()),
        table_name(cluster_set.extractor_key, cluster_set.dim),
        cluster_set.dim,
        ef_search=search_setting().options.get("EF_SEARCH"),
    )


def _table_exists(search: PgvectorSearch) -> bool:
    with connections[_database()].cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [search.table])
        return bool(cursor.fetchone()[0])


def open_pgvector(cluster_set: ClusterSet) -> PgvectorSearch:
    search = pgvector_table(cluster_set)
    if not _table_exists(search):
        raise SearchIndexUnavailable(
            f"The pgvector table {search.table} of the active clusters does not exist yet. "
            "Run `manage.py rebuild_clusters`, which builds it."
        )
    return search


def search(engine: VectorSearch, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``engine.search`` whose failures of the index itself (a pgvector table dropped or
    unreadable since it was opened) are :class:`SearchIndexUnavailable`, not a server error."""
    if not isinstance(engine, PgvectorSearch):
        return engine.search(queries, k)
    import psycopg  # the pgvector backend's driver: installed when it is configured

    try:
        return engine.search(queries, k)
    except psycopg.Error as error:
        # The handle names the table, so it works again once the table is back: kept.
        raise _unavailable(engine, error) from error


def _unavailable(engine: PgvectorSearch, error: Exception) -> SearchIndexUnavailable:
    return SearchIndexUnavailable(
        f"The pgvector search failed ({type(error).__name__}: {error}). If its table "
        f"{engine.table} is gone, run `manage.py rebuild_clusters`, which builds it."
    )


def joins_models(engine: VectorSearch) -> bool:
    """Whether the engine's vectors sit in the database of the app's images, so that one
    statement can search them and look up what each found id stands for."""
    if not isinstance(engine, PgvectorSearch):
        return False
    return _database() == router.db_for_read(StockImage)


#: What ``candidates_with_owners`` returns per found image: (id, similarity, post, owner id,
#: external owner); the last three are None for an image that no longer exists, or is not a
#: usable member (its features stale or of another extractor).
CandidateRow = tuple[int, float, int | None, int | None, str | None]


def candidates_with_owners(
    engine: PgvectorSearch, query: np.ndarray, k: int, extractor_key: str
) -> list[CandidateRow]:
    """pgvector's ``k`` nearest images to ``query`` with the post and owner of each, in one
    statement (``PgvectorSearch.search_joined``). A suggestion needs both for every
    candidate, to check that it still exists and to count one vote per post or owner; on
    their own they were two round trips, and the lookup cost as much as the search (1.5 ms of
    ~7 at 100,000 images). Errors as :func:`search`'s."""
    import psycopg

    quote = connections[_database()].ops.quote_name
    image, post = StockImage._meta, Post._meta

    def column(meta: Any, field: str) -> str:
        return quote(meta.get_field(field).column)

    joins = (
        f"LEFT JOIN {quote(image.db_table)} found_image "
        f"ON found_image.{column(image, 'id')} = nearest.id "
        f"AND found_image.{column(image, 'feature_status')} = %s "
        f"AND found_image.{column(image, 'extractor_key')} = %s "
        f"LEFT JOIN {quote(post.db_table)} found_post "
        f"ON found_post.{column(post, 'id')} = found_image.{column(image, 'post')}"
    )
    columns = (
        f"found_image.{column(image, 'post')}, found_post.{column(post, 'owner')}, "
        f"found_post.{column(post, 'external_owner')}"
    )
    try:
        return engine.search_joined(
            query, k, columns=columns, joins=joins, params=(FeatureStatus.READY, extractor_key)
        )
    except psycopg.Error as error:
        raise _unavailable(engine, error) from error


# --- usearch files ----------------------------------------------------------------------------


def index_directory() -> Path:
    return Path(search_setting().options["PATH"])


def _created(cluster_set: ClusterSet) -> int:
    # In the name so that a file of a set whose key a restored database gave again is not used.
    return int(cluster_set.created.timestamp() * 1_000_000)


@dataclass(frozen=True)
class IndexFile:
    path: Path
    watermark: int  # the file holds the set's members up to this membership key


def index_files(cluster_set: ClusterSet) -> list[IndexFile]:
    """The set's index files, newest (highest watermark) first."""
    directory = index_directory()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = _FILE.fullmatch(name)
        if (
            match
            and int(match["set"]) == cluster_set.pk
            and int(match["created"]) == _created(cluster_set)
        ):
            found.append(IndexFile(directory / name, int(match["watermark"])))
    return sorted(found, key=lambda f: f.watermark, reverse=True)


def newest_index_file(cluster_set: ClusterSet) -> IndexFile:
    files = index_files(cluster_set)
    if not files:
        raise SearchIndexUnavailable(
            f"No usearch index file for the active cluster set {cluster_set.pk} in "
            f"{index_directory()}. Run `manage.py rebuild_clusters`, which writes it."
        )
    return files[0]


def open_usearch(cluster_set: ClusterSet) -> tuple[UsearchSearch, IndexFile]:
    """The set's newest file, memory-mapped read-only."""
    newest = newest_index_file(cluster_set)
    try:
        expansion = search_setting().options.get("EXPANSION_SEARCH")
        options = {} if expansion is None else {"expansion_search": expansion}
        return UsearchSearch.open(newest.path, view=True, **options), newest
    except SearchIndexError as error:
        raise SearchIndexUnavailable(
            f"{error} Run `manage.py rebuild_clusters` to write a new one."
        ) from error


def _file_name(cluster_set: ClusterSet, watermark: int) -> Path:
    return index_directory() / f"set-{cluster_set.pk}-{_created(cluster_set)}-{watermark}.usearch"


def _newest_membership(cluster_set: ClusterSet) -> int:
    newest = (
        ClusterMembership.objects.filter(cluster_set=cluster_set)
        .order_by("-pk")
        .values_list("pk", flat=True)
        .first()
    )
    return newest or 0


def _member_vectors(
    cluster_set: ClusterSet, image_ids: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) of some members, in chunks a read can hold."""
    step = store.rows_per_read(cluster_set.dim)
    for start in range(0, len(image_ids), step):
        yield store.read_vectors_by_id(
            cluster_set.extractor_key, np.sort(image_ids[start : start + step]), cluster_set.dim
        )


def _member_ids(cluster_set: ClusterSet, **filters: Any) -> np.ndarray:
    return np.fromiter(
        ClusterMembership.objects.filter(
            cluster_set=cluster_set,
            image__feature_status=FeatureStatus.READY,
            image__extractor_key=cluster_set.extractor_key,
            **filters,
        )
        .order_by()
        .values_list("image_id", flat=True)
        .iterator(chunk_size=10_000),
        dtype=np.int64,
    )


def _fill(search: VectorSearch, cluster_set: ClusterSet, ids: np.ndarray, say: Progress) -> None:
    done = 0
    for found, matrix in _member_vectors(cluster_set, ids):
        search.add(found, matrix, np.zeros(len(found), dtype=np.int64))
        done += len(found)
        if len(ids) >= 50_000:
            say(f"Search index: {done}/{len(ids)} vectors added.")


# --- the worker's side: build, keep in step -------------------------------------------------------


def publish(
    cluster_set: ClusterSet, previous: ClusterSet | None, progress: Progress | None
) -> None:
    """Bring the engine in step with ``cluster_set``'s members before it is activated (the
    rebuild calls this once the members are written): only the images that joined or left
    since ``previous`` (the set active until now) when its index can be reused."""
    setting = search_setting()
    say = progress or (lambda message: None)
    if setting.backend == "pgvector":
        _publish_pgvector(cluster_set, say)
    elif setting.backend == "usearch":
        _publish_usearch(cluster_set, previous, say)


def pgvector_problem(alias: str) -> str | None:
    """Why the database ``alias`` cannot hold pgvector tables, or None when it can."""
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return (
            f"IMAGETAGS['SEARCH'] is pgvector, but the database {alias!r} is "
            f"{connection.vendor}: pgvector needs PostgreSQL (OPTIONS['DATABASE'] names it)."
        )
    if not extension_installed(connection):
        return (
            f"The database {alias!r} has no pgvector extension. As a superuser, run "
            "`CREATE EXTENSION vector;` in it (or add imagetags.contrib.pgvector to "
            "INSTALLED_APPS and migrate as a role that may create it); if the server lacks "
            f"pgvector, {install_hint()}."
        )
    return None


def _publish_pgvector(cluster_set: ClusterSet, say: Progress) -> None:
    problem = pgvector_problem(_database())
    if problem:
        raise ClusteringError(problem)
    search = pgvector_table(cluster_set)
    members = _member_ids(cluster_set)
    if not _table_exists(search):
        say(f"Search index: loading {len(members)} vectors into {search.table} (pgvector).")
        search = PgvectorSearch.create(search.connect, search.table, cluster_set.dim)
        _fill(search, cluster_set, members, say)
        wanted = connectivity(len(members))
        say(f"Search index: building the HNSW index (m {wanted}).")
        search.build_index(wanted)
        return
    with connections[_database()].cursor() as cursor:
        cursor.execute(f"SELECT id FROM {search.table}")
        held = np.fromiter((row[0] for row in cursor.fetchall()), dtype=np.int64)
    leaving = np.setdiff1d(held, members, assume_unique=True)
    joining = np.setdiff1d(members, held, assume_unique=True)
    if len(leaving):
        search.remove(leaving)
    _fill(search, cluster_set, joining, say)
    say(f"Search index: {len(joining)} vectors added, {len(leaving)} removed ({search.table}).")
    wanted, built = connectivity(len(members)), search.index_connectivity()
    if built is None or built < wanted:
        say(f"Search index: building the HNSW index again (m {built} → {wanted}).")
        search.rebuild_index(wanted)


def _publish_usearch(cluster_set: ClusterSet, previous: ClusterSet | None, say: Progress) -> None:
    directory = index_directory()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError as error:
        raise ClusteringError(
            f"The usearch index directory IMAGETAGS['SEARCH']['OPTIONS']['PATH'] cannot be "
            f"written ({error}): give the worker a local directory it may write, which the web "
            "processes of this machine may read."
        ) from error
    watermark = _newest_membership(cluster_set)
    members = _member_ids(cluster_set)
    search: UsearchSearch | None = None
    reused = previous is not None and previous.extractor_key == cluster_set.extractor_key
    if reused:
        try:
            search = UsearchSearch.open(newest_index_file(previous).path, view=False)
        except (SearchIndexUnavailable, SearchIndexError) as error:
            say(f"Search index: the previous set's file cannot be reused ({error}); building anew.")
    wanted = connectivity(len(members))
    if search is not None and search.connectivity < wanted:
        say(
            f"Search index: M {search.connectivity} → {wanted} for {len(members)} images; "
            "building the graph anew."
        )
        search = None
    if search is None or search.dim != cluster_set.dim:
        search = UsearchSearch(cluster_set.dim, connectivity=wanted)
    held = np.asarray(search.keys(), dtype=np.int64)
    leaving = np.setdiff1d(held, members)
    if len(leaving) > REBUILD_GRAPH_SHARE * max(1, len(held)):
        # Removed nodes stay in the graph as tombstones that every search walks through.
        say(f"Search index: {len(leaving)} of {len(held)} images left; building the graph anew.")
        search = UsearchSearch(cluster_set.dim, connectivity=wanted)
        held, leaving = held[:0], leaving[:0]
    joining = np.setdiff1d(members, held)
    search.remove(leaving)
    _fill(search, cluster_set, joining, say)
    with _directory_lock(wait=True):
        search.save(_file_name(cluster_set, watermark))
    say(
        f"Search index: {len(search)} vectors in {_file_name(cluster_set, watermark).name} "
        f"({len(joining)} added, {len(leaving)} removed)."
    )


def add_members(cluster_set: ClusterSet, image_ids: list[int], matrix: np.ndarray) -> None:
    """New members of the active set (``assign_to_active_set``, inside its transaction):
    pgvector inserts them in that transaction; usearch reads them from the database until the
    next file (:func:`save_new_members`)."""
    if search_setting().backend != "pgvector":
        return
    search = open_pgvector(cluster_set)
    ids = np.asarray(image_ids, dtype=np.int64)
    search.remove(ids)  # a row left by an image's earlier membership gets the new vector
    search.add(ids, matrix, np.zeros(len(ids), dtype=np.int64))


def save_new_members(cluster_set: ClusterSet) -> IndexFile | None:
    """usearch: write a newer file of the set once enough members are newer than the served
    one, and delete the older files. One worker at a time
    (an advisory lock); returns the new file, or None when nothing was written."""
    if search_setting().backend != "usearch":
        return None
    with _directory_lock() as acquired:
        if not acquired:
            return None  # another worker of this machine is writing one
        try:
            newest = newest_index_file(cluster_set)
        except SearchIndexUnavailable:
            return None  # the rebuild writes the first one
        watermark = _newest_membership(cluster_set)
        newer = _member_ids(cluster_set, pk__gt=newest.watermark - RECHECK_KEYS)
        # Counted on the mapped file (cheap); read whole only when a new one is written.
        view = UsearchSearch.open(newest.path, view=True)
        joining = newer[~view.contains(newer)]
        if len(joining) < max(RESAVE_AFTER, RESAVE_SHARE * len(view)):
            return None
        del view
        search = UsearchSearch.open(newest.path, view=False)
        _fill(search, cluster_set, joining, lambda message: None)
        path = _file_name(cluster_set, watermark)
        search.save(path)
        delete_old_files(keep=path)
        return IndexFile(path, watermark)


@contextlib.contextmanager
def _directory_lock(*, wait: bool = False) -> Iterator[bool]:
    """One writer of the directory at a time: a file lock (usearch files live on one machine's
    disk, so the machine's kernel is the one place every worker can agree). Released when the
    process exits, however it exits. ``wait``: block until it is free (a rebuild), else yield
    False at once when another process holds it (an assignment: the holder writes the file)."""
    directory = index_directory()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def after_activation(cluster_set: ClusterSet) -> None:
    """The rebuild activated ``cluster_set``: delete the files of older sets (usearch)."""
    if search_setting().backend == "usearch":
        with _directory_lock(wait=True), contextlib.suppress(SearchIndexUnavailable):
            delete_old_files(keep=newest_index_file(cluster_set).path)


def delete_old_files(keep: Path) -> None:
    """Every index file in the directory but ``keep`` (older files of its set, files of older
    sets). A process mapping one keeps its pages until it reopens the newest."""
    for name in os.listdir(keep.parent):
        if _FILE.fullmatch(name) and name != keep.name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(keep.parent / name)


#: Membership keys this far below a file's watermark are looked at again (``contains``) when
#: reading the members newer than it: keys are not handed out in commit order on PostgreSQL,
#: so a batch may commit after the file was written with a lower key (see services.index).
RECHECK_KEYS = 4096
