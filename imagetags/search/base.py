"""The interface every vector-search backend implements, and the registry of backends by alias.

A backend holds unit vectors under integer ids, grouped into lists (the clusters of a k-means
set: an inverted file), and answers "the k most similar ids" for a batch of query vectors.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import ClassVar, TypeVar

import numpy as np


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
        """Write everything held to ``path`` (readable by :meth:`open`)."""

    @classmethod
    @abstractmethod
    def open(cls, path: str | os.PathLike) -> VectorSearch:
        """A search read back from a file :meth:`save` wrote."""

    @abstractmethod
    def __len__(self) -> int:
        """Vectors held."""


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
    """The backend registered as ``alias`` (e.g. ``"exact"``)."""
    try:
        return _BACKENDS[alias]
    except KeyError:
        raise ValueError(
            f"Unknown vector search {alias!r}; choose one of {', '.join(sorted(_BACKENDS))}."
        ) from None
