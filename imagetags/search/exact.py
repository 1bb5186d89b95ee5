"""``ExactSearch``: an inverted file of exact dot products, float32 or bfloat16.

Vectors are grouped by list (a cluster of the k-means set). A query compares itself with the K
centres, then with the members of its ``probes`` nearest lists only: O(K + probes·N/K) vectors
instead of N. With ``probes=None`` every list is searched, which is exact k-NN.

Memory: lists hold float32 rows while the whole set fits in ``compact_above_bytes`` (256 MB of
float32: 131,000 × 512-d); above that they hold bfloat16 (``core.vectors.to_bfloat16``), half the
bytes, widened a few hundred rows at a time during the scan. Similarities move by at most ~3e-4;
docs/performance.md §2 measures what that does to the neighbours and the suggested tags. This is
the one place that rule lives: serving and the offline evaluation both build their search here.

Lists can be loaded lazily: given a ``loader``, a list is read (``loader(lists)``) the first time
a query probes it, so serving reads a cluster's members from the database on first use only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from imagetags.core.vectors import BFLOAT16, block_similarities, to_bfloat16
from imagetags.search.base import SearchIndexError, VectorSearch, padded, register, write_atomically

# Reads lists on first use: yields (list, ids, float32 vectors) for each list asked for.
Loader = Callable[[Sequence[int]], Iterable[tuple[int, np.ndarray, np.ndarray]]]


# Up to this many similarities are ranked by one full sort (measured: faster than argpartition
# and the ordering of its top n below ~500 values).
_SORT_BELOW = 512


def top_order(sims: np.ndarray, n: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Positions of the ``n`` largest ``sims``, largest first; ties by ``tiebreak`` (default:
    position), so results do not depend on argpartition's internal order."""
    if sims.shape[0] <= _SORT_BELOW:
        # A few hundred candidates (a query's probed clusters, the centres): one stable sort
        # costs less than partitioning, and is exact on ties.
        if tiebreak is None:
            return np.argsort(-sims, kind="stable")[:n]
        return np.lexsort((tiebreak, -sims))[:n]
    if n < sims.shape[0]:
        top = np.argpartition(-sims, n - 1)[:n]
        # Every value tied with the n-th competes on the tiebreak too, not only those
        # argpartition happened to put first.
        cut = sims[top].min()
        tied = np.flatnonzero(sims == cut)
        if tied.shape[0] > 1:
            top = np.concatenate([top[sims[top] > cut], tied])
    else:
        top = np.arange(sims.shape[0])
    keys = top if tiebreak is None else tiebreak[top]
    return top[np.lexsort((keys, -sims[top]))][:n]


def nearest_lists(query: np.ndarray, centers: np.ndarray, m: int) -> np.ndarray:
    """Indexes of the ``m`` centres most similar to a unit ``query``, most similar first."""
    m = min(m, centers.shape[0])
    if m <= 0:
        return np.empty(0, dtype=np.int64)
    return top_order(centers @ query, m)


@register
class ExactSearch(VectorSearch):
    """Exact similarities over the members of the probed lists (all lists: exact k-NN)."""

    alias = "exact"
    #: Lists are float32 up to this many bytes of float32 vectors for the whole set, bfloat16
    #: above.
    compact_above_bytes: int = 256 * 2**20

    @classmethod
    def compact_for(cls, n_vectors: int, dim: int) -> bool:
        """Whether a set of ``n_vectors`` × ``dim`` is held as bfloat16 (the one rule)."""
        return n_vectors * dim * 4 > cls.compact_above_bytes

    def __init__(
        self,
        centers: np.ndarray,
        *,
        size: int = 0,
        loader: Loader | None = None,
        compact: bool | None = None,
    ) -> None:
        """``centers``: (K, d) unit rows, one per list. ``size``: how many vectors the set will
        hold, which decides float32 or bfloat16 (:meth:`compact_for`; ``compact`` overrides it,
        for :meth:`open`). ``loader``: reads lists on first use; without one every list starts
        empty and is filled by :meth:`add`."""
        self.centers = np.ascontiguousarray(centers, dtype=np.float32)
        self.dim = int(self.centers.shape[1])
        self.compact = self.compact_for(size, self.dim) if compact is None else compact
        self._loader = loader
        self._lock = threading.RLock()
        self._blocks: dict[int, np.ndarray] = {}
        self._ids: dict[int, np.ndarray] = {}
        if loader is None:
            for position in range(self.centers.shape[0]):
                self._store(position, np.empty(0, np.int64), np.empty((0, self.dim), np.float32))

    @classmethod
    def from_labels(
        cls,
        vectors: np.ndarray,
        labels: np.ndarray,
        centers: np.ndarray,
        ids: np.ndarray | None = None,
    ) -> ExactSearch:
        """A search over a whole set in memory: ``vectors`` in the lists ``labels`` gives them,
        under ``ids`` (default: row numbers)."""
        search = cls(centers, size=vectors.shape[0])
        search.add(np.arange(vectors.shape[0]) if ids is None else ids, vectors, labels)
        return search

    # --- contents ---------------------------------------------------------------------------

    def _store(self, position: int, ids: np.ndarray, vectors: np.ndarray) -> None:
        matrix = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        self._blocks[position] = to_bfloat16(matrix) if self.compact else matrix
        self._ids[position] = np.asarray(ids, dtype=np.int64)

    def load(self, lists: Iterable[int]) -> None:
        """Read the lists not loaded yet through the loader (a no-op without one)."""
        if self._loader is None or len(self._blocks) == self.centers.shape[0]:
            return
        missing = [int(p) for p in lists if int(p) not in self._blocks]
        if not missing:
            return
        with self._lock:
            missing = [p for p in missing if p not in self._blocks]
            if not missing:
                return
            for position, ids, vectors in self._loader(missing):
                self._store(position, ids, vectors)
            for position in missing:  # a list the loader found no members for
                if position not in self._blocks:
                    self._store(position, np.empty(0, np.int64), np.empty((0, self.dim)))

    def is_loaded(self, position: int) -> bool:
        return position in self._blocks

    @property
    def loaded_lists(self) -> list[int]:
        return sorted(self._blocks)

    def list_size(self, position: int) -> int:
        """Members held in a list (0 when not loaded)."""
        ids = self._ids.get(position)
        return 0 if ids is None else int(ids.shape[0])

    def block(self, position: int) -> np.ndarray:
        """A loaded list's vectors as held: float32, or bfloat16 bits (uint16) when compact."""
        return self._blocks[position]

    def add(self, ids: np.ndarray, vectors: np.ndarray, lists: np.ndarray) -> None:
        """Append members; with a loader, only to lists already loaded (a list loaded later
        reads its members itself)."""
        ids = np.asarray(ids, dtype=np.int64)
        lists = np.asarray(lists, dtype=np.int64)
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        with self._lock:
            for position in np.unique(lists).tolist():
                if position not in self._blocks:
                    raise ValueError(f"List {position} is not loaded: its loader reads it.")
                rows = np.flatnonzero(lists == position)
                new = to_bfloat16(vectors[rows]) if self.compact else vectors[rows]
                self._blocks[position] = np.concatenate([self._blocks[position], new])
                self._ids[position] = np.concatenate([self._ids[position], ids[rows]])

    def remove(self, ids: np.ndarray) -> None:
        gone = np.asarray(ids, dtype=np.int64)
        with self._lock:
            for position, held in list(self._ids.items()):
                keep = ~np.isin(held, gone)
                if not keep.all():
                    self._blocks[position] = self._blocks[position][keep]
                    self._ids[position] = held[keep]

    def __len__(self) -> int:
        return sum(int(ids.shape[0]) for ids in self._ids.values())

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Whether each of ``ids`` is held in a loaded list (a bool array like ``ids``)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        with self._lock:
            held = [i for i in self._ids.values() if i.shape[0]]
        if not held:
            return np.zeros(ids.shape[0], dtype=bool)
        return np.isin(ids, np.concatenate(held))

    @property
    def nbytes(self) -> int:
        """Bytes held by the loaded lists (vectors and ids)."""
        return sum(b.nbytes for b in self._blocks.values()) + sum(
            i.nbytes for i in self._ids.values()
        )

    # --- queries ----------------------------------------------------------------------------

    def probe(self, query: np.ndarray, probes: int | None) -> np.ndarray:
        """The lists a query searches, nearest first (``None``: all of them)."""
        k = self.centers.shape[0]
        return nearest_lists(query, self.centers, k if probes is None else probes)

    def search(
        self, vectors: np.ndarray, k: int, probes: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        found = [self.search_lists(query, k, self.probe(query, probes)) for query in queries]
        if len(found) == 1:  # one query (a suggestion): nothing to pad
            return found[0][0][None, :], found[0][1][None, :]
        return padded(found)

    def search_lists(
        self, query: np.ndarray, k: int, lists: np.ndarray | Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` for one query over the members of the given lists (what ``search``
        does after :meth:`probe`; serving probes once and reuses the lists). 1-D results."""
        lists = lists.tolist() if isinstance(lists, np.ndarray) else [int(p) for p in lists]
        if self._loader is not None:
            self.load(lists)
        if k <= 0 or not lists:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        if len(lists) == 1:  # one list (e.g. the whole library): no copies
            ids = self._ids[lists[0]]
            sims = block_similarities(self._blocks[lists[0]], query)
        else:
            blocks = self._blocks
            sims = np.concatenate([block_similarities(blocks[p], query) for p in lists])
            ids = np.concatenate([self._ids[p] for p in lists])
        if sims.shape[0] == 0:
            return ids, sims.astype(np.float32)
        order = top_order(sims, k, ids)
        return ids[order], sims[order]

    # --- files ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        with self._lock:
            write_atomically(path, self._write)

    def _write(self, path: str) -> None:
        positions = self.loaded_lists
        # A file object: given a name, np.savez would append ".npz" to it.
        with open(path, "wb") as file:
            np.savez(
                file,
                centers=self.centers,
                compact=np.array(self.compact),
                lists=np.concatenate(
                    [np.full(self.list_size(p), p, dtype=np.int64) for p in positions]
                    or [np.empty(0, np.int64)]
                ),
                ids=np.concatenate([self._ids[p] for p in positions] or [np.empty(0, np.int64)]),
                vectors=np.concatenate(
                    [self._blocks[p] for p in positions]
                    or [np.empty((0, self.dim), BFLOAT16 if self.compact else np.float32)]
                ),
            )

    @classmethod
    def open(cls, path: str | os.PathLike) -> ExactSearch:
        if not os.path.isfile(path):
            raise SearchIndexError(path, "No vector search index file")
        try:
            with np.load(path, allow_pickle=False) as data:
                search = cls(data["centers"], compact=bool(data["compact"]))
                lists, ids, stored = data["lists"], data["ids"], data["vectors"]
        except Exception as error:  # a truncated zip, a foreign file, a missing array: one error
            raise SearchIndexError(
                path, f"Unreadable vector search index file ({error})"
            ) from error
        # Stored as held: bfloat16 bits go back in as they are, never rounded twice.
        for position in np.unique(lists).tolist():
            rows = np.flatnonzero(lists == position)
            search._blocks[position] = np.ascontiguousarray(stored[rows])
            search._ids[position] = ids[rows]
        return search
