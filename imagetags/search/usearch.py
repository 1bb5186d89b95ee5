"""``UsearchSearch``: an HNSW graph (the usearch library) in one file, memory-mapped for serving.

The worker builds the graph (``add``), saves it (``save``: a new file swapped in atomically) and
web processes open it with ``view=True``: the file is mapped, not read, so every process of a
machine shares one copy of it in the page cache and a process adds only its own small state.

HNSW searches the whole graph: the k-means lists of :class:`VectorSearch` are not used here
(``add`` ignores ``lists``, ``search`` ignores ``probes``); the neighbours are approximate, with a
recall against ``exact`` that ``bench/search_backends.py`` measures.

usearch is optional (``pip install django-imagetags[usearch]``): it is imported when an index is
made or opened, so ``import imagetags.search`` works without it, and
``get_search_class("usearch")`` says what to install when it is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from imagetags.search.base import (
    CONNECTIVITY,
    ReadOnlySearchError,
    SearchIndexError,
    VectorSearch,
    register,
    write_atomically,
)

if TYPE_CHECKING:
    from usearch.index import Index

INSTALL_HINT = "pip install django-imagetags[usearch]"


def _usearch() -> ModuleType:
    """``usearch.index``, imported on first use (the package is an optional extra)."""
    try:
        import usearch.index
    except ImportError as error:
        raise ImportError(
            f"The 'usearch' vector search needs the usearch package: {INSTALL_HINT}"
        ) from error
    return usearch.index


@register
class UsearchSearch(VectorSearch):
    """Approximate k-NN by cosine over one HNSW graph; ``open(path)`` maps a saved file read-only.

    ``dtype``: how vectors are stored, ``"f16"`` (half the bytes of float32; similarities move by
    ~1e-3) or ``"f32"``/``"bf16"``/``"i8"``. ``connectivity`` (HNSW's M), ``expansion_add``
    (efConstruction) and ``expansion_search`` (ef; a query asking for more than ``ef``
    neighbours searches with its ``k`` instead). Defaults measured by
    ``bench/search_backends.py`` at 100,000 structured 512-d vectors, k=80: recall@50 against
    exact 0.999 at ef=128 in 0.58 ms per query (ef=64: 0.993 in 0.48 ms), so ef=128 costs
    little; M=16 and efConstruction=128 are usearch's own defaults (a 112 MB f16 file). The
    engines pass ``hnsw_connectivity`` of the library's size (M 48 from 200,000 vectors).
    """

    alias = "usearch"
    #: ef when a query does not ask for more; a file does not keep it, so ``open`` sets it too.
    default_expansion_search = 128
    #: Up to this many vectors a query compares against all of them (usearch's ``exact``): an
    #: HNSW graph of a few dozen nodes built by parallel adds can leave some unreachable (one
    #: run in eight missed a node at 60), and brute force over 5,000 512-d vectors takes
    #: 0.7 ms here against HNSW's 0.25 ms, so small libraries lose nothing by being exact.
    exact_up_to = 5_000
    #: The metrics a saved file may use: both give 1 - cosine on unit vectors.
    _METRICS = ("Cos", "IP")

    def __init__(
        self,
        dim: int,
        *,
        dtype: str = "f16",
        connectivity: int = CONNECTIVITY,
        expansion_add: int = 128,
        expansion_search: int = default_expansion_search,
        threads: int = 0,
    ) -> None:
        """``threads``: cores ``add`` and batch searches use (0: all of them; a single query
        always runs on the calling thread, which is faster here)."""
        index = _usearch().Index(
            ndim=int(dim),
            metric="cos",
            dtype=dtype,
            connectivity=connectivity,
            expansion_add=expansion_add,
            expansion_search=expansion_search,
        )
        self._wrap(index, path=None, threads=threads)

    def _wrap(self, index: Index, path: str | None, threads: int) -> None:
        self._index = index
        self.dim = int(index.ndim)
        self.threads = threads
        self.path = path  # the file a view maps; None for an index held in memory
        # Changes and the searches of a changeable index take turns; a view never changes.
        self._lock: contextlib.AbstractContextManager = (
            contextlib.nullcontext() if path is not None else threading.RLock()
        )

    @classmethod
    def missing_requirement(cls) -> str | None:
        if importlib.util.find_spec("usearch") is None:
            return f"The 'usearch' vector search needs the usearch package: {INSTALL_HINT}"
        return None

    @classmethod
    def import_modules(cls) -> None:
        _usearch()

    @property
    def read_only(self) -> bool:
        """Whether this is a memory-mapped view of a file (``open(path, view=True)``)."""
        return self.path is not None

    @property
    def connectivity(self) -> int:
        """HNSW's M the graph was built with (a saved file keeps it)."""
        return int(self._index.connectivity)

    @property
    def dtype(self) -> str:
        return str(self._index.dtype).rsplit(".", 1)[-1].lower()

    def _check_writable(self, operation: str) -> None:
        if self.read_only:
            raise ReadOnlySearchError(
                f"Cannot {operation} a usearch index opened as a memory-mapped view ({self.path}):"
                " the worker rebuilds and saves the index file, and web processes reopen it."
            )

    # --- contents ---------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray, lists: np.ndarray | None = None) -> None:
        """Add ``vectors`` under ``ids``; an id already held gets the new vector. ``lists`` is
        ignored: the graph is searched as a whole."""
        self._check_writable("add to")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if ids.shape[0] != vectors.shape[0]:
            raise ValueError(f"{ids.shape[0]} ids for {vectors.shape[0]} vectors.")
        if ids.shape[0] == 0:
            return
        if ids.min() < 0:
            raise ValueError("usearch holds non-negative ids only.")
        if np.unique(ids).shape[0] != ids.shape[0]:
            raise ValueError("An id appears twice in one add().")
        keys = ids.astype(np.uint64)
        with self._lock:
            held = np.asarray(self._index.contains(keys), dtype=bool).reshape(-1)
            if held.any():  # usearch refuses a key twice: replace the old vector
                self._index.remove(keys[held])
            self._index.add(keys, vectors, threads=self.threads)

    def remove(self, ids: np.ndarray) -> None:
        """Forget these ids (ids not held are ignored). The graph keeps a removed node as a
        tombstone that searches pass through but never return; a rebuild drops it."""
        self._check_writable("remove from")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids = ids[ids >= 0]
        if ids.shape[0] == 0:
            return
        with self._lock:
            self._index.remove(ids.astype(np.uint64))

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> np.ndarray:
        """Every id held, ascending."""
        with self._lock:
            return np.sort(np.asarray(self._index.keys, dtype=np.int64))

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Whether each of ``ids`` is held (a bool array like ``ids``)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.shape[0] == 0:
            return np.zeros(0, dtype=bool)
        held = np.zeros(ids.shape[0], dtype=bool)
        valid = ids >= 0
        with self._lock:
            held[valid] = np.asarray(self._index.contains(ids[valid].astype(np.uint64))).reshape(-1)
        return held

    @property
    def nbytes(self) -> int:
        """Bytes the index takes (mapped pages included, for a view)."""
        return int(self._index.memory_usage)

    # --- queries ----------------------------------------------------------------------------

    def search(
        self, vectors: np.ndarray, k: int, probes: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest ids by cosine over the whole graph (``probes`` is ignored), most
        similar first, ties among those found by id; (q, w) arrays padded with -1 / -inf like
        ``ExactSearch``."""
        queries = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        n = queries.shape[0]
        if k <= 0 or n == 0 or len(self) == 0:
            return np.empty((n, 0), dtype=np.int64), np.empty((n, 0), dtype=np.float32)
        # One query: no thread pool (measured faster); a batch: the configured cores.
        threads = 1 if n == 1 else self.threads
        with self._lock:
            # Asking for every vector must return every vector: a graph walk may not reach all.
            exact = len(self) <= self.exact_up_to or k >= len(self)
            found = self._index.search(queries, count=int(k), threads=threads, exact=exact)
        keys, distances = np.atleast_2d(found.keys), np.atleast_2d(found.distances)
        counts = getattr(found, "counts", None)  # one query gives its found matches only
        counts = np.array([keys.shape[1]]) if counts is None else np.asarray(counts)
        width = int(counts.max(initial=0))
        valid = np.arange(width)[None, :] < counts[:, None]
        ids = np.where(valid, keys[:, :width].astype(np.int64), -1)
        # Slots past a query's count hold whatever usearch left there: never computed with.
        sims = np.full(valid.shape, -np.inf, dtype=np.float32)
        sims[valid] = 1.0 - distances[:, :width][valid]
        # usearch orders by distance only: ties by id, as ExactSearch breaks them.
        rows = np.repeat(np.arange(n), width)
        order = np.lexsort((ids.ravel(), -sims.ravel(), rows)).reshape(n, width) % max(width, 1)
        return np.take_along_axis(ids, order, 1), np.take_along_axis(sims, order, 1)

    # --- files ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` atomically: a temporary file beside it, flushed to disk,
        then renamed over it, so a process opening ``path`` sees the old file or the new one,
        never half of one (and a process mapping the old file keeps it until it reopens)."""
        with self._lock:
            write_atomically(path, self._index.save)

    @classmethod
    def open(cls, path: str | os.PathLike, *, view: bool = True, **options: Any) -> UsearchSearch:
        """The index saved at ``path``: memory-mapped and read-only with ``view=True`` (what web
        processes do), read into memory and changeable with ``view=False`` (what a worker that
        adds to it does). ``options``: ``expansion_search``, ``threads``.

        A missing, truncated or foreign file raises :class:`SearchIndexError`."""
        module = _usearch()
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise SearchIndexError(path, "No vector search index file")
        threads = options.pop("threads", 0)
        options.setdefault("expansion_search", cls.default_expansion_search)
        try:
            meta = module.Index.metadata(path)
            metric = getattr(meta["kind_metric"], "name", None) if meta else None
            if metric not in cls._METRICS:
                raise ValueError(f"not a cosine usearch index (metric {metric})")
            index = module.Index.restore(path, view=view, **options)
            if index is None:
                raise ValueError("no usearch header")
        except Exception as error:  # usearch raises RuntimeError, ValueError, ...: one error
            raise SearchIndexError(
                path, f"Unreadable vector search index file ({error})"
            ) from error
        search = cls.__new__(cls)
        search._wrap(index, path=path if view else None, threads=threads)
        return search
