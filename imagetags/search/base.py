"""The interface every vector-search backend implements, and the registry of backends by alias.

A backend holds unit vectors under integer ids, grouped into lists (the clusters of a k-means
set: an inverted file), and answers "the k most similar ids" for a batch of query vectors.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, TypeVar

import numpy as np

#: What a person runs to write a search index file again (a missing or corrupt one is rebuilt).
REBUILD_COMMAND = "python manage.py rebuild_clusters"

#: HNSW's M (links per node) for graphs below and from ``LARGE_GRAPH`` vectors. On 512-d
#: vectors of CNN-like structure, at 1,000,000 and the serving's effort (ef 128, k 80), the
#: graph bounds recall@50, not the walk: M 16 0.747 (0.898 at ef 1024), M 32 0.865, M 48 0.927
#: (0.958 at ef 256), for a first build 1.3× as long and a file 1.2× as large as M 16's
#: (``python -m bench.hnsw_degree``; docs/performance.md §6). M 16 finds 0.954 at 150,000 and
#: 0.940 at 250,000 (M 48 there: 0.966), so the denser graph starts between the two.
CONNECTIVITY = 16
LARGE_GRAPH_CONNECTIVITY = 48
LARGE_GRAPH = 200_000


def hnsw_connectivity(n_vectors: int) -> int:
    """The M an HNSW graph of ``n_vectors`` is built with when the setting names none."""
    return LARGE_GRAPH_CONNECTIVITY if n_vectors >= LARGE_GRAPH else CONNECTIVITY


class SearchIndexError(Exception):
    """A search index file is missing or cannot be read: rebuilding the clusters writes it again.

    The one error a backend raises for a bad file, whatever its engine raised, so that callers
    catch one thing and can show ``path`` and the fix."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{problem}: {self.path}. Write it again with `{REBUILD_COMMAND}`.")


class ReadOnlySearchError(RuntimeError):
    """A change (``add``/``remove``) asked of a search opened read-only (a memory-mapped view)."""


class VectorSearch(ABC):
    """Unit vectors by id, in lists; cosine similarity (the dot product of unit vectors)."""

    #: The name a backend is registered and looked up by (``get_search_class``).
    alias: ClassVar[str]

    @abstractmethod
    def add(self, ids: np.ndarray, vectors: np.ndarray, lists: np.ndarray) -> None:
        """Add ``vectors`` (n, d) under ``ids`` (n,) to ``lists`` (n,): the list of each."""

    @abstractmethod
    def remove(self, ids: np.ndarray) -> None:
        """Forget these ids (ids not held are ignored)."""

    @abstractmethod
    def search(
        self, vectors: np.ndarray, k: int, probes: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar ids for each row of ``vectors`` (q, d), most similar first,
        among the members of the ``probes`` lists nearest to it (``None``: all of them).

        Returns (ids, similarities), both (q, w) with w = min(k, most candidates of any row);
        a row with fewer candidates is padded with id -1 and similarity -inf.
        """

    @abstractmethod
    def save(self, path: str | os.PathLike) -> None:
        """Write everything held to ``path`` (readable by :meth:`open`), replacing the file
        atomically (:func:`write_atomically`)."""

    @classmethod
    @abstractmethod
    def open(cls, path: str | os.PathLike) -> VectorSearch:
        """A search read back from a file :meth:`save` wrote; :class:`SearchIndexError` when
        the file is missing or cannot be read."""

    @abstractmethod
    def __len__(self) -> int:
        """Vectors held."""

    @classmethod
    def missing_requirement(cls) -> str | None:
        """Why this backend cannot run here (e.g. an optional package to install), or ``None``.
        :func:`get_search_class` raises it, so a site that chooses the backend learns at once."""
        return None

    @classmethod
    def import_modules(cls) -> None:
        """Import the packages a search of this backend uses, without touching any data. The
        app calls it for the configured backend while a process starts, so that the process's
        first request does not pay for imports (usearch's: ~30 ms) as well as its search."""
        return None  # exact and pgvector use what the app imports anyway


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Replace the file at ``path`` with what ``write(temporary_path)`` writes, atomically.

    The temporary file sits beside ``path`` (one file system, so the rename is atomic), is
    flushed to disk, then renamed over ``path``: a process opening ``path`` gets the old file or
    the new one, never half of one, and one that mapped the old file keeps it until it reopens.
    On any failure ``path`` is untouched and the temporary file is gone."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
    )
    os.close(fd)
    try:
        # mkstemp makes the file private (0600): give it the mode of the file it replaces, or
        # 0644, so that web processes running as another user can read it.
        os.chmod(temporary, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644)
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (skipped where a directory cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


_BACKENDS: dict[str, type[VectorSearch]] = {}

SearchClass = TypeVar("SearchClass", bound=type[VectorSearch])


def register(cls: SearchClass) -> SearchClass:
    """Class decorator: make a backend available by its ``alias``."""
    existing = _BACKENDS.get(cls.alias)
    if existing is not None and existing is not cls:
        raise ValueError(f"A search backend is already registered as {cls.alias!r}: {existing}.")
    _BACKENDS[cls.alias] = cls
    return cls


def get_search_class(alias: str) -> type[VectorSearch]:
    """The backend registered as ``alias`` (e.g. ``"exact"``); ImportError naming what to
    install when the backend's optional package is missing."""
    try:
        cls = _BACKENDS[alias]
    except KeyError:
        raise ValueError(
            f"Unknown vector search {alias!r}; choose one of {', '.join(sorted(_BACKENDS))}."
        ) from None
    missing = cls.missing_requirement()
    if missing is not None:
        raise ImportError(missing)
    return cls


def search_aliases() -> list[str]:
    """Every registered backend's alias, runnable here or not (``missing_requirement``)."""
    return sorted(_BACKENDS)


def padded(found: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-query (ids, similarities) of different lengths as (q, w) arrays, padded with -1 and
    -inf: the shape every backend's ``search`` returns."""
    width = max((ids.shape[0] for ids, _sims in found), default=0)
    ids_out = np.full((len(found), width), -1, dtype=np.int64)
    sims_out = np.full((len(found), width), -np.inf, dtype=np.float32)
    for row, (ids, sims) in enumerate(found):
        ids_out[row, : ids.shape[0]] = ids
        sims_out[row, : sims.shape[0]] = sims
    return ids_out, sims_out
