"""The ranking logic beyond the patent, pinned on small hand-built libraries (no model, no database):
once-per-post and once-per-owner voting, similarity weighting, prior weighting, the inverted file
(equal to exact k-NN when every cluster is probed), and the evaluation's use of them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from imagetags.conf import DEFAULTS
from imagetags.core import counting, kmeans, voting
from imagetags.search.exact import ExactSearch
from imagetags.services.evaluation import (
    KNN,
    ClusterModel,
    ImageSet,
    LibraryModel,
    choose_one_se,
    folds_by_post,
    score_rankings,
)
from imagetags.services.vectors import l2_normalize

EQUAL = dict(temperature=None, prior_weight=0.0, probes=None)


def names(ranked: list[voting.VotedTag]) -> list[str]:
    return [str(item.tag) for item in ranked]


# --- once per post, once per owner -------------------------------------------------------------


def test_a_post_votes_once_however_many_of_its_images_are_neighbours() -> None:
    # Neighbours, most similar first: three images of post "big" and one of "small".
    voters = [("post", "big"), ("post", "big"), ("post", "small"), ("post", "big")]
    tags = [{"burger"}, {"burger", "fries"}, {"salad"}, {"burger"}]

    votes = voting.neighbour_votes(voters, tags, [0.9, 0.8, 0.7, 0.6])

    assert votes.voters == 2
    # "big" votes once, with the union of its images' tags.
    assert votes.counts == {"burger": 1, "fries": 1, "salad": 1}
    assert votes.share("burger") == pytest.approx(0.5)


def test_first_voters_stops_at_n_distinct_voters_but_keeps_their_later_images() -> None:
    voters = ["a", "a", "b", "c", "a", "b", "d"]
    assert voting.first_voters(voters, 2) == [0, 1, 2, 4, 5]
    assert voting.first_voters(voters, 10) == list(range(7))


def test_voter_is_the_owner_when_known_else_the_post() -> None:
    assert voting.voter_of("p1", "flickr:42", "owner") == ("owner", "flickr:42")
    assert voting.voter_of("p1", None, "owner") == ("post", "p1")
    assert voting.voter_of("p1", "", "owner") == ("post", "p1")
    assert voting.voter_of("p1", "flickr:42", "post") == ("post", "p1")
    with pytest.raises(ValueError, match="vote_by"):
        voting.voter_of("p1", None, "user")


def test_a_prolific_owner_votes_once_per_tag() -> None:
    """One uploader's four near-identical "mittens" posts against three people saying "tabby"."""
    posts = ["m1", "m2", "m3", "m4", "t1", "t2", "t3"]
    owners = {"m1": "u:cat-lover", "m2": "u:cat-lover", "m3": "u:cat-lover", "m4": "u:cat-lover"}
    tags = {p: {"cat", "mittens"} for p in posts[:4]} | {p: {"cat", "tabby"} for p in posts[4:]}

    def top(by: str) -> list[str]:
        voters = [voting.voter_of(p, owners.get(p), by) for p in posts]
        votes = voting.neighbour_votes(voters, [tags[p] for p in posts], [1.0] * len(posts))
        return names(voting.rank_votes(votes, limit=3))

    assert top("post") == ["cat", "mittens", "tabby"]  # 4 posts outvote 3
    assert top("owner") == ["cat", "tabby", "mittens"]  # 3 people outvote 1


def test_nearest_voters_searches_further_when_one_owner_fills_the_candidates() -> None:
    # 12 images of owner "a" come first: 4 × n = 8 candidates hold only one voter.
    order = ["a"] * 12 + ["b", "c"]
    calls = []

    def search(count: int) -> tuple[np.ndarray, np.ndarray]:
        calls.append(count)
        ids = np.arange(min(count, len(order)))
        return ids, 1.0 - ids / 100

    ids, _sims, voters = voting.nearest_voters(search, order.__getitem__, 2, len(order))

    assert calls == [8, 14]
    assert voters[0] == "a" and voters[-1] == "b"
    assert len(set(voters)) == 2 and len(ids) == 13


# --- similarity weighting and the prior --------------------------------------------------------


def test_similarity_weighting_by_hand() -> None:
    # The nearest voter weighs 1; one 0.05 less similar weighs 1/e at temperature 0.05.
    votes = voting.neighbour_votes(
        ["p", "q"], [{"ramen"}, {"udon"}], [0.90, 0.85], temperature=0.05
    )
    weight = np.exp(-1.0)
    assert votes.share("ramen") == pytest.approx(1 / (1 + weight))
    assert votes.share("udon") == pytest.approx(weight / (1 + weight))
    assert votes.counts == {"ramen": 1, "udon": 1}
    equal = voting.neighbour_votes(["p", "q"], [{"ramen"}, {"udon"}], [0.90, 0.85])
    assert equal.share("udon") == pytest.approx(0.5)


def _salmon_votes() -> voting.NeighbourVotes:
    # 10 neighbour posts: food on 9, salmon on 6, delicious on 5.
    tag_sets = [{"food", "salmon", "delicious"}] * 5 + [{"food", "salmon"}] + [{"food"}] * 3
    tag_sets += [{"plate"}]
    return voting.neighbour_votes([f"p{n}" for n in range(10)], tag_sets, [1.0] * 10)


PRIOR = {"food": 0.88, "delicious": 0.45, "salmon": 0.02, "plate": 0.04}


def test_prior_weight_zero_is_plain_frequency() -> None:
    ranked = voting.rank_votes(_salmon_votes(), prior=PRIOR, prior_weight=0.0)
    assert names(ranked) == ["food", "salmon", "delicious", "plate"]
    assert [item.votes for item in ranked] == [9, 6, 5, 1]
    assert ranked[0].score == pytest.approx(0.9) and ranked[0].voters == 10


def test_a_partial_prior_lets_a_backed_specific_tag_overtake_food_and_keeps_food() -> None:
    ranked = voting.rank_votes(_salmon_votes(), prior=PRIOR, prior_weight=0.5)
    # salmon 0.6 - 0.01 = 0.59 > food 0.9 - 0.44 = 0.46 > delicious 0.5 - 0.225 = 0.275
    assert names(ranked) == ["salmon", "food", "delicious", "plate"]
    assert ranked[0].score == pytest.approx(0.59)
    assert ranked[0].share == pytest.approx(0.6)


def test_full_prior_subtraction_is_tagvote_and_sinks_the_generic_tags() -> None:
    ranked = voting.rank_votes(_salmon_votes(), prior=PRIOR, prior_weight=1.0)
    # salmon 0.58, plate 0.06, delicious 0.05, food 0.02: "food" falls to the bottom.
    assert names(ranked) == ["salmon", "plate", "delicious", "food"]


def test_threshold_limit_exclude_and_the_floor_for_far_neighbours() -> None:
    votes = _salmon_votes()
    assert names(voting.rank_votes(votes, threshold=0.5)) == ["food", "salmon", "delicious"]
    assert names(voting.rank_votes(votes, limit=2, exclude={"food"})) == ["salmon", "delicious"]
    # A tag carried only by a neighbour e^-10 times as heavy as the nearest is not suggested.
    far = voting.neighbour_votes(["p", "q"], [{"soup"}, {"cake"}], [0.9, 0.4], temperature=0.05)
    assert names(voting.rank_votes(far)) == ["soup"]


def test_voting_evidence_reads_as_a_sentence() -> None:
    assert voting.voting_evidence(6, 10) == "on 6 of the 10 most similar posts"
    assert voting.voting_evidence(1, 1) == "on 1 of the 1 most similar post"
    assert (
        voting.voting_evidence(3, 20, "owner")
        == "from 3 of the 20 uploaders of the most similar posts"
    )


def test_prior_shares_count_voters() -> None:
    post_tags = {"a": {"food"}, "b": {"food", "ramen"}, "c": set(), "d": {"ramen"}}
    assert counting.prior_shares(post_tags) == {"food": 0.5, "ramen": 0.5}
    # a and b belong to one owner: 3 voters, food on 1 of them.
    voters = {"a": "u1", "b": "u1", "c": "c", "d": "d"}
    assert counting.prior_shares(post_tags, voters) == pytest.approx(
        {"food": 1 / 3, "ramen": 2 / 3}
    )


# --- the inverted file -------------------------------------------------------------------------


def _clustered(n: int = 200, dim: int = 16, k: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.normal(size=(k, dim)))
    labels = rng.integers(0, k, n)
    vectors = l2_normalize(centers[labels] + rng.normal(scale=0.3, size=(n, dim)))
    assigned, _sims = kmeans.nearest_centers(vectors, centers)
    return vectors, centers, assigned


def test_ivf_with_every_cluster_probed_equals_exact_search() -> None:
    vectors, centers, labels = _clustered()
    lists = ExactSearch.from_labels(vectors, labels, centers)
    assert len(lists) == vectors.shape[0]
    queries = l2_normalize(np.random.default_rng(1).normal(size=(20, vectors.shape[1])))
    ids, sims = lists.search(queries, 15, centers.shape[0])
    for row, query in enumerate(queries):
        all_sims = vectors @ query
        exact_ids = np.lexsort((np.arange(len(all_sims)), -all_sims))[:15]
        assert ids[row].tolist() == exact_ids.tolist()
        assert np.allclose(sims[row], all_sims[exact_ids])
    exact_ids, _sims = lists.search(queries, 15, None)
    assert exact_ids.tolist() == ids.tolist()


def test_ivf_compares_only_the_members_of_the_probed_clusters() -> None:
    vectors, centers, labels = _clustered()
    lists = ExactSearch.from_labels(vectors, labels, centers)
    query = vectors[0]
    probe = lists.probe(query, 2)
    members = set(np.flatnonzero(np.isin(labels, probe)).tolist())

    ids, _sims = lists.search(query[None, :], 1000, 2)

    assert set(ids[0].tolist()) == members  # everything it can return, and nothing else
    assert probe[0] == labels[0]  # the query's own cluster is probed first


def _image_set(vectors: np.ndarray, tags: list[set[str]], owners: dict[str, str]) -> ImageSet:
    posts = [f"p{n}" for n in range(len(tags))]
    return ImageSet(
        entries=[None] * len(tags),  # type: ignore[list-item]  # not needed once embedded
        sha256=[f"sha{n}" for n in range(len(tags))],
        posts=posts,
        post_tags={post: frozenset(t) for post, t in zip(posts, tags, strict=True)},
        vectors=vectors,
        owners=owners,
    )


def _library_model(vectors, centers, labels, tags, owners=None) -> LibraryModel:
    library = _image_set(vectors, tags, owners or {})
    result = kmeans.ClusteringResult(
        centers=centers,
        labels=labels,
        similarities=np.ones(len(labels), dtype=np.float32),
        inertia=0.0,
        iterations=1,
        algorithm="kmeans",
        seconds=0.0,
    )
    post_counts, frequencies = counting.count_tag_frequencies(
        labels, library.posts, library.post_tags, centers.shape[0]
    )
    return LibraryModel.build(library, ClusterModel(result, post_counts, frequencies))


def test_ivf_voting_with_m_equal_k_is_exact_knn_voting() -> None:
    vectors, centers, labels = _clustered(seed=3)
    rng = np.random.default_rng(4)
    tags = [{f"topic{label}", f"t{rng.integers(0, 30)}", "food"} for label in labels]
    model = _library_model(vectors, centers, labels, tags)
    default = voting.VoteParams.from_setting(DEFAULTS["VOTING"])
    for query in l2_normalize(rng.normal(size=(15, vectors.shape[1]))):
        for params in (KNN, default.exact()):
            every = replace(params, probes=centers.shape[0])
            assert model.vote(query, every, 10) == model.vote(query, params, 10)


def test_library_model_votes_once_per_owner_from_the_manifest_owners() -> None:
    # Four "mittens" posts of one owner nearest the query, then three "tabby" posts of others.
    vectors = l2_normalize(np.array([[1.0, 0.01 * n] for n in range(7)], dtype=np.float32))
    tags = [{"mittens"}] * 4 + [{"tabby"}] * 3
    owners = {f"p{n}": "flickr:cat-lover" for n in range(4)}
    centers = np.array([[1.0, 0.0]], dtype=np.float32)
    model = _library_model(vectors, centers, np.zeros(7, dtype=np.int64), tags, owners)
    params = voting.VoteParams(neighbours=7, vote_by="post", **EQUAL)

    assert model.vote(vectors[0], params, 2) == ["mittens", "tabby"]
    by_owner = voting.VoteParams(neighbours=7, vote_by="owner", **EQUAL)
    assert model.vote(vectors[0], by_owner, 2) == ["tabby", "mittens"]


# --- parameters and the tuning rule ----------------------------------------------------------


def test_vote_params_defaults_match_the_setting_and_are_checked() -> None:
    assert voting.VoteParams() == voting.VoteParams.from_setting(DEFAULTS["VOTING"])
    assert voting.VoteParams().exact().probes is None
    for bad in (
        {"neighbours": 0},
        {"temperature": 0.0},
        {"vote_by": "user"},
        {"prior_weight": 1.5},
        {"probes": 0},
    ):
        with pytest.raises(ValueError):
            voting.VoteParams(**bad)


def test_folds_by_post_put_each_post_in_one_fold() -> None:
    posts = [f"p{n // 2}" for n in range(20)] + [f"s{n}" for n in range(7)]  # 17 posts
    folds = folds_by_post(posts, 5, seed=0)
    for post in set(posts):
        assert len({int(folds[i]) for i, p in enumerate(posts) if p == post}) == 1
    per_fold = [len({p for i, p in enumerate(posts) if folds[i] == f}) for f in range(5)]
    assert sorted(per_fold) == [3, 3, 3, 4, 4]


def test_one_standard_error_rule_prefers_more_distinct_tags_among_near_best() -> None:
    base = score_rankings([["x"]], [{"x"}], 1)

    def folds(p5: list[float], p1: float, distinct: int):
        return [replace(base, p_at_k=v, p_at_1=p1, distinct_correct=distinct) for v in p5]

    candidates = ["best P@5", "close, more distinct", "far, most distinct", "close, bad P@1"]
    per_fold = [
        folds([0.52, 0.54, 0.53], 0.90, 30),  # mean 0.53, SE 0.0058
        folds([0.52, 0.53, 0.525], 0.90, 40),  # 0.525: within one SE
        folds([0.50, 0.51, 0.505], 0.90, 60),  # 0.505: outside
        folds([0.525, 0.53, 0.525], 0.70, 90),  # near-best P@5, but P@1 far below the best
    ]
    assert choose_one_se(candidates, per_fold) == 1
