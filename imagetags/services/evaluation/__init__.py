"""Offline evaluation of tag suggestions on a throwaway library held in memory.

The library and the queries are read with the import's parser (``library.parse_manifest``),
opened with the upload rules (``images.open_image``), embedded with a real extractor, clustered
with ``kmeans.fit_clusters``, counted with ``core.counting.count_tag_frequencies`` and ranked by
every method in ``METHODS``: ``popularity`` (``core.counting.popularity_ranking``), the patent's
``cluster`` (``core.voting.cluster_tags``), exact ``knn`` voting, and the ``VOTING`` setting's
neighbour voting over the whole library (``vote``) or over the inverted file of the nearest
clusters (``ivf``): ``core.voting.vote`` over ``search.exact.ExactSearch``, the functions and the
search that serve the site's suggestions, so the numbers describe the serving code.
Nothing is read from or written to the site's database or media storage; the only file written
is the optional vector cache.

Protocol (docs/quality.md): split by *post* (one hold-out split, or F folds in which every post is
a query once), so the images of one post are never on both sides; images byte-identical to an
earlier one are dropped, as ``import_library`` skips them; query images whose post has no tags are
not scored (counted separately); untagged library images still take part in clustering. Metrics
per method: P@1, P@3, P@k, R@k, the number of *distinct* tags suggested correctly at least once,
and the mean ranking time per query (extraction excluded). ``tune_parameters`` chooses parameters
by cross-validation inside a library only; ``run_tuning`` nests it in the outer folds.

With ``search`` (``--search``), every split also measures vector-search backends against exact
k-NN: ``ivf``'s voting over the neighbours each engine finds in the whole library, scored like
the methods, with the recall@50 of those neighbours and the share of queries whose top k tags are
exact's (``methods.evaluate_backends``).

The package, by step: ``data`` (image sets, splits by post), ``embedding`` (extraction and the
vector cache), ``backends`` (the engines ``--search`` builds per library), ``methods`` (the
methods on one library), ``tuning`` (nested cross-validation), ``run`` (the whole run); scoring is
``core.metrics``. The acceptance of real suggestions
(``--from-feedback``) reads the database and lives in ``services.feedback``.
"""

from imagetags.core.metrics import MethodScores, score_rankings, summarise
from imagetags.services.evaluation.backends import (
    RECALL_DEPTH,
    REFERENCE,
    SearchBuilder,
    check_pgvector,
    django_connect,
    exact_search,
    pgvector_builder,
    search_builders,
    usearch_builder,
)
from imagetags.services.evaluation.data import (
    EvaluationError,
    ImageSet,
    fold_splits,
    folds_by_post,
    read_image_set,
    split_by_post,
)
from imagetags.services.evaluation.embedding import VectorCache, embed_image_set
from imagetags.services.evaluation.methods import (
    KNN,
    METHOD_HELP,
    METHODS,
    BackendResult,
    ClusterModel,
    LibraryModel,
    evaluate_backends,
    fit_cluster_model,
    method_rankers,
    score_cluster,
    score_popularity,
)
from imagetags.services.evaluation.run import run_evaluation
from imagetags.services.evaluation.tuning import (
    KNN_GRID,
    PROBES_GRID,
    VOTE_GRID,
    choose_one_se,
    run_tuning,
    tune_parameters,
)

__all__ = [
    "KNN",
    "KNN_GRID",
    "METHODS",
    "METHOD_HELP",
    "PROBES_GRID",
    "RECALL_DEPTH",
    "REFERENCE",
    "VOTE_GRID",
    "BackendResult",
    "ClusterModel",
    "EvaluationError",
    "ImageSet",
    "LibraryModel",
    "MethodScores",
    "SearchBuilder",
    "VectorCache",
    "check_pgvector",
    "choose_one_se",
    "django_connect",
    "embed_image_set",
    "evaluate_backends",
    "exact_search",
    "fit_cluster_model",
    "fold_splits",
    "folds_by_post",
    "method_rankers",
    "pgvector_builder",
    "read_image_set",
    "run_evaluation",
    "run_tuning",
    "score_cluster",
    "score_popularity",
    "score_rankings",
    "search_builders",
    "split_by_post",
    "summarise",
    "tune_parameters",
    "usearch_builder",
]
