"""The vector-search seam: find the library images most similar to a query.

One small interface (:class:`imagetags.search.base.VectorSearch`) and backends registered by
alias, like the extractors. Serving (``services``) and the offline evaluation both search through
it, so what ``evaluate_suggestions`` measures is the search the site serves with.
"""

from imagetags.search.base import (
    ReadOnlySearchError,
    SearchIndexError,
    VectorSearch,
    get_search_class,
    register,
    search_aliases,
)
from imagetags.search.exact import ExactSearch  # registers "exact"
from imagetags.search.pgvector import PgvectorSearch  # registers "pgvector" (psycopg not needed)
from imagetags.search.usearch import UsearchSearch  # registers "usearch" (imports it on use)

__all__ = [
    "ExactSearch",
    "PgvectorSearch",
    "ReadOnlySearchError",
    "SearchIndexError",
    "UsearchSearch",
    "VectorSearch",
    "get_search_class",
    "register",
    "search_aliases",
]
