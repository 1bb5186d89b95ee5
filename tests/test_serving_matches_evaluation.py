"""Serving and the offline evaluation answer alike: the same library, fed to ``suggest()`` (from
the database) and to the evaluation's ``LibraryModel`` (in memory), gives the same tags with the
same scores, for ``ivf`` at several probe counts, by post and by owner, in float32 and in the
compact (bfloat16) layout, and for ``cluster``.

The library: posts around six topic directions with two images each, tags drawn per topic, some
posts owned by a few uploaders, some auto-applied tags (which never count). Queries lie between
two topics, so their neighbours straddle clusters and the number of probed clusters matters.
"""

from __future__ import annotations

import numpy as np
import pytest

from imagetags.core import counting, kmeans
from imagetags.core.voting import VoteParams
from imagetags.models import ClusterMembership, FeatureStatus, Post, PostTag, StockImage, Tag
from imagetags.search.exact import ExactSearch
from imagetags.services import serving, store
from imagetags.services import vectors as vec
from imagetags.services.evaluation import ClusterModel, ImageSet, LibraryModel
from imagetags.services.index import owner_key
from imagetags.services.rebuild import current_extractor_key, rebuild_clusters
from imagetags.services.serving import serving_cache
from imagetags.services.suggest import suggest

from .conftest import DIM

# About the exact inverted file itself: every backend is tested in test_search_serving.py.
pytestmark = pytest.mark.usefixtures("exact_search")

TOPICS = 6
POSTS_PER_TOPIC = 9
K = 8
LIMIT = 8
PROBES = [1, 2, None]
OWNERS = ["ann", "bob", "cid"]


@pytest.fixture
def library(db, make_upload):
    """The test database's library, clustered (K = 8 over 6 topics: some topics split)."""
    rng = np.random.default_rng(11)
    topics = vec.l2_normalize(rng.normal(size=(TOPICS, DIM)).astype(np.float32))
    key = current_extractor_key()
    tag_ids = {}
    n = 0
    for topic in range(TOPICS):
        for number in range(POSTS_PER_TOPIC):
            # Every third post has an uploader, a few uploaders owning many posts.
            owner = OWNERS[(topic + number) % 3] if number % 3 == 0 else ""
            post = Post.objects.create(external_owner=owner)
            names = ["food", f"topic{topic}"] + [
                f"t{topic}-{extra}" for extra in range(4) if rng.random() < 0.4
            ]
            if rng.random() < 0.3:
                names.append(f"t{(topic + 1) % TOPICS}-0")  # a neighbouring topic's tag
            for name in names:
                if name not in tag_ids:
                    tag_ids[name] = Tag.objects.create(name=name).pk
                PostTag.objects.create(post=post, tag_id=tag_ids[name], source="typed")
            if number % 4 == 0:  # auto-applied tags never count, in either path
                auto = tag_ids.setdefault("auto", Tag.objects.get_or_create(name="auto")[0].pk)
                PostTag.objects.create(post=post, tag_id=auto, source="auto")
            for _image in range(2):
                n += 1
                vector = vec.l2_normalize(
                    topics[topic] + rng.normal(scale=0.35, size=DIM).astype(np.float32)
                )
                image = StockImage.objects.create(post=post, image=make_upload(f"m{n}.jpg"))
                StockImage.objects.filter(pk=image.pk).update(
                    vector=vec.to_bytes(vector),
                    feature_status=FeatureStatus.READY,
                    extractor_key=key,
                )
    cluster_set = rebuild_clusters(k=K, algorithm="kmeans")
    queries = [
        vec.l2_normalize(
            0.55 * topics[a] + 0.45 * topics[b] + rng.normal(scale=0.1, size=DIM).astype("f4")
        )
        for a, b in [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 0), (0, 3), (2, 5)]
    ]
    return cluster_set, queries


def evaluation_model(cluster_set) -> tuple[LibraryModel, list[int]]:
    """The same library as the evaluation holds it: rows in image key order (ties are broken by
    id in both paths, so row order must follow the keys), the set's centres and labels, the
    posts' counted tags and owners (as ``index.owner_key`` names them)."""
    members = list(
        ClusterMembership.objects.filter(cluster_set=cluster_set)
        .order_by("image_id")
        .values_list("image_id", "image__post_id", "image__vector", "cluster__index")
    )
    pks = [row[0] for row in members]
    posts = [str(row[1]) for row in members]
    matrix = np.stack([vec.from_bytes(row[2]) for row in members])
    centers, _ids, indexes = store.read_centers(cluster_set)
    labels = np.array([indexes.index(row[3]) for row in members])
    post_tags: dict[str, set[str]] = {post: set() for post in posts}
    for post_id, name in PostTag.objects.counted().values_list("post_id", "tag__name"):
        if str(post_id) in post_tags:
            post_tags[str(post_id)].add(name)
    owners = {
        str(pk): owner_key(owner_id, external)
        for pk, owner_id, external in Post.objects.values_list("pk", "owner_id", "external_owner")
        if owner_key(owner_id, external) is not None
    }
    library = ImageSet(
        entries=[None] * len(pks),  # type: ignore[list-item]  # not needed once embedded
        sha256=[f"sha{pk}" for pk in pks],
        posts=posts,
        post_tags={post: frozenset(tags) for post, tags in post_tags.items()},
        vectors=matrix,
        owners=owners,
    )
    sims = np.einsum("ij,ij->i", matrix, centers[labels])
    counts, frequencies = counting.count_tag_frequencies(
        labels, posts, library.post_tags, centers.shape[0]
    )
    result = kmeans.ClusteringResult(centers, labels, sims, 0.0, 1, "kmeans", 0.0)
    return LibraryModel.build(library, ClusterModel(result, counts, frequencies)), pks


def use_voting(settings, params: VoteParams) -> None:
    imagetags = dict(getattr(settings, "IMAGETAGS", {}) or {})
    settings.IMAGETAGS = {
        **imagetags,
        "VOTING": {
            "NEIGHBOURS": params.neighbours,
            "TEMPERATURE": params.temperature,
            "VOTE_BY": params.vote_by,
            "PRIOR_WEIGHT": params.prior_weight,
            "PROBES": params.probes,
        },
    }


def served(query: np.ndarray, method: str, **options) -> list[tuple[str, float]]:
    return [(t.name, t.score) for t in suggest(query, method=method, **options).tags]


def voted(model: LibraryModel, query: np.ndarray, params: VoteParams, **options):
    ranked, voters = model.voted(query, params, LIMIT, **options)
    return [(str(t.tag), round(max(0.0, t.score), 4)) for t in ranked], voters


def served_neighbours(cluster_set, query: np.ndarray, params: VoteParams) -> list[int]:
    index = serving_cache().voting_index(cluster_set)
    return index.neighbours(query, params).image_ids.tolist()


def compare_ivf(settings, cluster_set, queries, model, pks, params: VoteParams) -> None:
    use_voting(settings, params)
    for query in queries:
        expected, voters = voted(model, query, params)
        assert served(query, "ivf", limit=LIMIT, threshold=0.0) == expected, params
        # The same images voted, not merely the same tags.
        assert served_neighbours(cluster_set, query, params) == [pks[i] for i in voters.ids]
    # Threshold and exclusion go through the same ranking too.
    query = queries[0]
    options = {"threshold": 0.2, "exclude": {"food"}}
    assert served(query, "ivf", limit=LIMIT, **options) == voted(model, query, params, **options)[0]


@pytest.mark.parametrize("probes", PROBES)
def test_ivf_by_post_matches_the_evaluation(library, settings, probes):
    cluster_set, queries = library
    model, pks = evaluation_model(cluster_set)
    params = VoteParams(neighbours=6, temperature=0.05, prior_weight=0.3, probes=probes)
    compare_ivf(settings, cluster_set, queries, model, pks, params)


def test_ivf_by_owner_matches_the_evaluation(library, settings):
    cluster_set, queries = library
    model, pks = evaluation_model(cluster_set)
    params = VoteParams(neighbours=5, temperature=None, vote_by="owner", probes=2)
    compare_ivf(settings, cluster_set, queries, model, pks, params)


@pytest.mark.parametrize("probes", [1, None])
def test_compact_vectors_match_the_evaluation(library, settings, monkeypatch, probes):
    """The bfloat16 rule forced (ExactSearch's one rule, used by both): still the same."""
    cluster_set, queries = library
    monkeypatch.setattr(ExactSearch, "compact_above_bytes", 0)
    serving.reset()
    model, pks = evaluation_model(cluster_set)
    params = VoteParams(neighbours=6, temperature=0.05, prior_weight=0.1, probes=probes)
    compare_ivf(settings, cluster_set, queries, model, pks, params)
    assert model.lists.compact and serving_cache().voting_index(cluster_set).compact


def test_the_probes_matter_on_this_library(library, settings):
    """Otherwise the comparisons above would not exercise probing: one probed cluster and all
    of them find different neighbours for some query."""
    cluster_set, queries = library
    one, every = (VoteParams(neighbours=6, probes=p) for p in (1, None))
    assert any(
        served_neighbours(cluster_set, q, one) != served_neighbours(cluster_set, q, every)
        for q in queries
    )


def test_cluster_method_matches_the_evaluation(library):
    cluster_set, queries = library
    model, _pks = evaluation_model(cluster_set)
    for query in queries:
        expected = [(str(t.tag), round(t.score, 4)) for t in model.clusters.ranked(query, LIMIT)]
        assert served(query, "cluster", limit=LIMIT, threshold=0.0) == expected
        assert expected  # the cluster has tags: something was compared
