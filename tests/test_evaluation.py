"""evaluate_suggestions: split by post (hold-out and folds), metrics on a hand-made case, JSON shape
with every method and the default, nested tuning, refusals, acceptance from feedback, and that the
throwaway library never touches the site's database or media."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from imagetags.models import ClusterSet, Post, PostTag, StockImage, SuggestionFeedback, Tag
from imagetags.services.evaluation import (
    KNN_GRID,
    PROBES_GRID,
    ImageSet,
    fit_cluster_model,
    read_image_set,
    score_cluster,
    score_popularity,
    score_rankings,
    split_by_post,
)
from imagetags.services.vectors import l2_normalize
from tests.conftest import (
    FEEDME_MANIFEST,
    TFLITE_MODEL,
    image_bytes,
    requires_feedme,
    requires_tflite_model,
)

REQUIRED_METRICS = {"p_at_k", "r_at_k", "distinct_correct", "p_at_1", "p_at_3", "query_ms"}
ALL_METHODS = {"popularity", "cluster", "knn", "vote", "ivf"}


def write_library(folder: Path, rows: list[tuple[str | None, list[str], tuple]]) -> Path:
    """A manifest with one small noise image per row: (post key, tags, colour)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for n, (post, tags, color) in enumerate(rows):
        name = f"{n:03d}.jpg"
        (folder / name).write_bytes(image_bytes(color=color, pattern="noise", seed=n))
        lines.append(json.dumps({"path": name, "tags": tags, "post": post, "owner": None}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


RED, BLUE = (220, 40, 40), (40, 40, 220)


@pytest.fixture
def small_library(tmp_path: Path) -> Path:
    """12 images in 11 posts: reds tagged red/warm, blues tagged blue/cold, two untagged."""
    rows = [(None, ["red", "warm"], RED) for _ in range(4)]
    rows += [("r-pair", ["red"], RED), ("r-pair", ["tomato"], RED)]
    rows += [(None, ["blue", "cold"], BLUE) for _ in range(4)]
    rows += [(None, [], BLUE), (None, [], RED)]
    return write_library(tmp_path / "small", rows)


# --- split -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_split_never_puts_one_post_on_both_sides(seed: int) -> None:
    posts = [f"p{n // 3}" for n in range(30)] + [f"single{n}" for n in range(20)]  # 30 posts

    library, queries = split_by_post(posts, 0.3, seed)

    library_posts = {posts[i] for i in library}
    query_posts = {posts[i] for i in queries}
    assert not library_posts & query_posts
    assert sorted([*library, *queries]) == list(range(len(posts)))
    assert len(query_posts) == 9  # 30 % of 30 posts
    assert list(split_by_post(posts, 0.3, seed)[1]) == list(queries)  # seeded


def test_split_depends_on_the_seed() -> None:
    posts = [f"p{n}" for n in range(40)]
    assert list(split_by_post(posts, 0.5, 0)[1]) != list(split_by_post(posts, 0.5, 1)[1])


def test_read_keeps_post_tags_as_union_and_drops_duplicates(tmp_path: Path) -> None:
    manifest = write_library(
        tmp_path / "lib", [("p", ["a"], RED), ("p", ["b"], BLUE), (None, ["c"], RED)]
    )
    (manifest.parent / "copy.jpg").write_bytes((manifest.parent / "000.jpg").read_bytes())
    with manifest.open("a") as fh:
        fh.write(json.dumps({"path": "copy.jpg", "tags": ["d"]}) + "\n")
        fh.write(json.dumps({"path": "../escape.jpg", "tags": ["e"]}) + "\n")

    read = read_image_set(manifest)

    assert read.duplicates == 1
    assert [(r.line, "outside" in r.reason) for r in read.rejected] == [(5, True)]
    assert read.images.posts == ["post:p", "post:p", "line:3"]
    assert read.images.post_tags == {"post:p": {"a", "b"}, "line:3": {"c"}}


# --- metrics on a hand-made case ---------------------------------------------------------------


def test_score_rankings_by_hand() -> None:
    rankings = [["a", "b", "c"], ["a", "x", "y"]]
    truths = [{"a", "c"}, {"z"}]

    scores = score_rankings(rankings, truths, k=2, query_seconds=0.004)

    assert scores.p_at_k == pytest.approx((1 / 2 + 0) / 2)
    assert scores.r_at_k == pytest.approx((1 / 2 + 0 / 1) / 2)
    assert scores.distinct_correct == 1  # only "a" was ever right in a top 2
    assert scores.p_at_1 == pytest.approx((1 + 0) / 2)
    assert scores.p_at_3 == pytest.approx((2 / 3 + 0) / 2)
    assert scores.query_ms == pytest.approx(2.0)


def _image_set(rows: list[tuple[str, list[float], set[str]]]) -> ImageSet:
    posts = [post for post, _vector, _tags in rows]
    return ImageSet(
        entries=[None] * len(rows),  # type: ignore[list-item]  # not needed once embedded
        sha256=[f"sha{n}" for n in range(len(rows))],
        posts=posts,
        post_tags={post: frozenset(tags) for post, _vector, tags in rows},
        vectors=l2_normalize(np.array([vector for _post, vector, _tags in rows])),
    )


def test_popularity_and_cluster_scores_by_hand() -> None:
    library = _image_set(
        [
            ("p1", [1.0, 0.0], {"cat", "pet"}),
            ("p2", [0.99, 0.14], {"cat", "cute"}),
            ("p3", [0.0, 1.0], {"car"}),
            ("p4", [0.14, 0.99], {"car", "red"}),
            ("p5", [0.10, 0.995], set()),  # untagged: clustered, counted as a post, no tags
        ]
    )
    queries = _image_set([("q1", [1.0, 0.05], {"cat", "cute"}), ("q2", [0.05, 1.0], {"car"})])

    popularity = score_popularity(library, queries, k=2)
    model = fit_cluster_model(
        library, 2, algorithm="kmeans", seed=0, batch_size=100, max_iter=100, tol=1e-6
    )
    cluster = score_cluster(model, queries, k=2)

    # Popularity ranks car(2), cat(2), cute(1), pet(1), red(1) for every query.
    assert popularity.p_at_k == pytest.approx((1 / 2 + 1 / 2) / 2)  # [car, cat]
    assert popularity.r_at_k == pytest.approx((1 / 2 + 1 / 1) / 2)
    assert popularity.distinct_correct == 2  # cat, car
    assert popularity.p_at_1 == pytest.approx((0 + 1) / 2)  # car
    assert popularity.p_at_3 == pytest.approx((2 / 3 + 1 / 3) / 2)  # [car, cat, cute]
    # Clusters {p1, p2}: cat 2, cute 1, pet 1; {p3, p4, p5}: car 2, red 1.
    assert sorted(model.post_counts) == [2, 3]
    assert cluster.p_at_k == pytest.approx((2 / 2 + 1 / 2) / 2)  # [cat, cute], [car, red]
    assert cluster.r_at_k == pytest.approx((2 / 2 + 1 / 1) / 2)
    assert cluster.distinct_correct == 3  # cat, cute, car
    assert cluster.p_at_1 == pytest.approx(1.0)
    assert cluster.p_at_3 == pytest.approx((2 / 3 + 1 / 3) / 2)  # [cat, cute, pet], [car, red]


def test_a_post_counts_once_per_cluster() -> None:
    # Three images of one post next to one image of another: "burger" is on 1 of 2 posts.
    library = _image_set(
        [
            ("big", [1.0, 0.0], {"burger"}),
            ("big", [0.99, 0.1], {"burger"}),
            ("big", [0.98, 0.2], {"burger"}),
            ("small", [0.97, 0.24], {"salad"}),
        ]
    )
    model = fit_cluster_model(
        library, 1, algorithm="kmeans", seed=0, batch_size=100, max_iter=100, tol=1e-6
    )
    assert model.post_counts == [2]
    assert model.frequencies[0] == {"burger": 1, "salad": 1}


# --- the command -----------------------------------------------------------------------------


def _counts() -> dict[str, int]:
    return {m.__name__: m.objects.count() for m in (Post, PostTag, StockImage, Tag, ClusterSet)}


def _files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.slow
@pytest.mark.django_db
def test_json_report_and_database_untouched(small_library: Path, make_post, media_root, tmp_path):
    make_post(tags=["existing"], images=1)
    before, files_before = _counts(), _files(media_root)
    out = StringIO()

    call_command(
        "evaluate_suggestions",
        "--library",
        str(small_library),
        "--holdout",
        "0.3",
        "--clusters",
        "2",
        "--k",
        "3",
        "--k-sweep",
        "2,3",
        "--cache",
        str(tmp_path / "cache"),
        "--json",
        stdout=out,
    )

    report = json.loads(out.getvalue())  # exactly one JSON object on stdout
    assert report["k"] == 3
    assert report["default"] == "ivf"  # what suggest() serves (IMAGETAGS["SUGGEST_METHOD"])
    assert set(report["methods"]) == ALL_METHODS
    for scores in report["methods"].values():
        assert set(scores) >= REQUIRED_METRICS
        assert 0 <= scores["p_at_k"] <= 1 and 0 <= scores["r_at_k"] <= 1
    # 12 images in 11 posts, 3 posts held out. Untagged queries are not scored.
    assert report["library"] + report["queries"] + report["unscored_queries"] == 12
    assert report["library_posts"] + report["query_posts"] + report["unscored_queries"] == 11
    assert report["clusters"] <= 2 and report["clusters_requested"] == 2
    assert [row["clusters_requested"] for row in report["k_sweep"]] == [2, 3]
    assert {"cluster", "ivf"} <= set(report["k_sweep"][0])
    assert report["k_sweep"][0]["p_at_k"] == report["k_sweep"][0]["cluster"]["p_at_k"]
    assert report["voting"]["neighbours"] >= 1 and report["knn"]["temperature"] is None
    assert report["vectors_from_cache"] == 0
    assert _counts() == before
    assert _files(media_root) == files_before

    # A second run reads every vector from the cache and scores the same.
    again = StringIO()
    call_command(
        "evaluate_suggestions",
        *("--library", str(small_library), "--holdout", "0.3", "--clusters", "2", "--k", "3"),
        *("--cache", str(tmp_path / "cache"), "--json"),
        stdout=again,
    )
    second = json.loads(again.getvalue())
    assert second["vectors_from_cache"] == 12
    for name in ALL_METHODS:
        for metric in ("p_at_k", "r_at_k", "distinct_correct"):
            assert second["methods"][name][metric] == report["methods"][name][metric]


@pytest.mark.slow
@pytest.mark.django_db
@pytest.mark.django_db
def test_full_decode_vectors_never_share_the_cache(small_library: Path, tmp_path: Path) -> None:
    def run(*extra: str) -> dict:
        out = StringIO()
        call_command(
            "evaluate_suggestions",
            *("--library", str(small_library), "--holdout", "0.3", "--clusters", "2"),
            *("--cache", str(tmp_path / "cache"), "--json", *extra),
            stdout=out,
        )
        return json.loads(out.getvalue())

    run()
    assert run()["vectors_from_cache"] == 12
    assert run("--full-decode")["vectors_from_cache"] == 0  # decoded another way: recomputed
    assert run("--full-decode")["vectors_from_cache"] == 12


def test_separate_queries_manifest_and_text_table(small_library: Path, tmp_path: Path) -> None:
    queries = write_library(
        tmp_path / "queries", [(None, ["red"], (200, 60, 60)), (None, ["blue"], (60, 60, 200))]
    )
    out = StringIO()

    call_command(
        "evaluate_suggestions",
        *("--library", str(small_library), "--queries", str(queries), "--clusters", "2"),
        stdout=out,
    )

    text = out.getvalue()
    assert "Library: 12 images in 11 posts; queries: 2 scored images" in text
    assert "ivf *" in text and "* the method suggest() uses" in text
    for name in ALL_METHODS:
        assert f"\n{name}" in text


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "Give exactly one source of queries"),
        (["--holdout", "0.3", "--folds", "3"], "Give exactly one source of queries"),
        (["--folds", "1"], "--folds must be at least 2"),
        (["--folds", "20"], "too few for 20 folds"),
        (["--holdout", "0.3", "--tune"], "--tune needs --folds"),
        (["--holdout", "0.3", "--queries", "QUERIES"], "Give exactly one source of queries"),
        (["--holdout", "1.5"], "between 0 and 1"),
        (["--holdout", "0"], "between 0 and 1"),
        (["--holdout", "0.3", "--clusters", "50"], "too few for K=50"),
        (["--holdout", "0.3", "--clusters", "2", "--k-sweep", "5,40"], "too few for K=40"),
        (["--queries", "UNTAGGED"], "None of the 1 query images has tags"),
        (["--holdout", "0.3", "--k", "0"], "--k must be at least 1"),
    ],
)
def test_refusals_say_what_to_do(small_library: Path, tmp_path: Path, args, message) -> None:
    untagged = write_library(tmp_path / "untagged", [(None, [], (10, 200, 10))])
    args = [
        str(untagged) if a == "UNTAGGED" else str(small_library) if a == "QUERIES" else a
        for a in args
    ]
    with pytest.raises(CommandError, match=message):
        call_command("evaluate_suggestions", "--library", str(small_library), *args)


@pytest.mark.django_db
def test_missing_library_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="does not exist"):
        call_command(
            "evaluate_suggestions", "--library", str(tmp_path / "x.jsonl"), "--holdout", "0.3"
        )


@pytest.mark.slow
@pytest.mark.django_db
def test_folds_report_means_spread_and_every_post_queried_once(small_library: Path, tmp_path):
    out = StringIO()
    call_command(
        "evaluate_suggestions",
        *("--library", str(small_library), "--folds", "3", "--clusters", "2", "--k", "3"),
        *("--cache", str(tmp_path / "cache"), "--json"),
        stdout=out,
    )
    report = json.loads(out.getvalue())

    assert report["split"] == {"folds": 3, "seed": 0}
    assert set(report["methods"]) == ALL_METHODS and report["default"] == "ivf"
    # Every tagged image is a query exactly once; the two untagged ones are not scored.
    assert report["queries"] == 10 and report["unscored_queries"] == 2
    assert len(report["per_fold"]) == 3
    assert sum(fold["queries"] for fold in report["per_fold"]) == 10
    assert all(fold["library"] + fold["queries"] <= 12 for fold in report["per_fold"])
    for name, scores in report["methods"].items():
        assert set(scores) >= REQUIRED_METRICS | {"sd", "distinct_correct_pooled"}
        folds = [fold["methods"][name]["p_at_k"] for fold in report["per_fold"]]
        assert scores["p_at_k"] == pytest.approx(sum(folds) / 3)
        assert scores["distinct_correct_pooled"] >= max(
            fold["methods"][name]["distinct_correct"] for fold in report["per_fold"]
        )


@pytest.mark.slow
@pytest.mark.django_db
def test_tune_chooses_inside_each_fold_and_scores_on_its_queries(small_library: Path, tmp_path):
    out = StringIO()
    call_command(
        "evaluate_suggestions",
        *("--library", str(small_library), "--folds", "2", "--clusters", "2", "--tune"),
        *("--cache", str(tmp_path / "cache")),
        stdout=out,
    )
    text = out.getvalue()
    assert "Tuning (nested cross-validation)" in text
    assert "Outer scores of the tuned methods" in text

    report = run_evaluation_json(small_library, tmp_path, "--folds", "2", "--tune")
    tune = report["tune"]
    assert len(tune["folds"]) == 2
    for fold in tune["folds"]:
        assert set(fold["chosen"]) == {"knn", "vote", "probes"}
        assert fold["chosen"]["knn"]["neighbours"] in KNN_GRID
        assert fold["chosen"]["probes"]["probes"] in PROBES_GRID
        assert set(fold["outer"]) == ALL_METHODS
    assert set(tune["outer"]) == ALL_METHODS


def run_evaluation_json(manifest: Path, tmp_path: Path, *args: str) -> dict:
    out = StringIO()
    call_command(
        "evaluate_suggestions",
        *("--library", str(manifest), "--clusters", "2", "--cache", str(tmp_path / "cache")),
        *args,
        "--json",
        stdout=out,
    )
    return json.loads(out.getvalue())


# --- acceptance from feedback ------------------------------------------------------------------


@pytest.mark.django_db
def test_from_feedback_reports_acceptance_overall_per_tag_and_method():
    def shown(name: str, accepted: bool, method: str = "ivf", channel: str = "widget") -> None:
        SuggestionFeedback.objects.create(
            tag=Tag.objects.get_or_create(name=name)[0],
            accepted=accepted,
            method=method,
            channel=channel,
        )

    shown("salmon", True)
    shown("salmon", True, channel="api")
    shown("salmon", False)
    shown("food", False, method="cluster")
    out = StringIO()

    call_command("evaluate_suggestions", "--from-feedback", "--json", stdout=out)

    report = json.loads(out.getvalue())
    assert report["overall"] == {"accepted": 2, "shown": 4, "rate": 0.5}
    assert report["per_tag"]["salmon"] == {"accepted": 2, "shown": 3, "rate": 0.6667}
    assert report["per_tag"]["food"]["rate"] == 0.0
    assert list(report["per_tag"]) == ["salmon", "food"]  # most shown first
    assert report["per_method"]["ivf"]["accepted"] == 2
    assert report["per_method"]["cluster"]["shown"] == 1
    assert report["per_channel"]["api"] == {"accepted": 1, "shown": 1, "rate": 1.0}

    text = StringIO()
    call_command("evaluate_suggestions", "--from-feedback", stdout=text)
    assert "Accepted 2 of 4 suggestions shown (50.0%) over 2 tags." in text.getvalue()
    assert "salmon" in text.getvalue()


@pytest.mark.django_db
def test_from_feedback_without_any_says_so():
    out = StringIO()
    call_command("evaluate_suggestions", "--from-feedback", stdout=out)
    assert "No suggestion feedback yet" in out.getvalue()


@pytest.mark.django_db
def test_no_library_and_no_feedback_flag_is_refused():
    with pytest.raises(CommandError, match="Give --library"):
        call_command("evaluate_suggestions", "--holdout", "0.3")


# --- the real thing --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.shared_data
@requires_tflite_model
@requires_feedme
@pytest.mark.django_db
def test_feedme_default_beats_the_patent_and_knn_with_mobilenet(tmp_path: Path) -> None:
    """The figures in docs/quality.md: on the hold-out split, the patent's method beats the
    baseline, and the default beats the patent on P@5 and distinct correct tags and is within
    0.01 P@5 of exact k-NN voting (or better)."""
    out = StringIO()
    call_command(
        "evaluate_suggestions",
        *("--library", str(FEEDME_MANIFEST), "--holdout", "0.3", "--json"),
        *("--extractor", f"tflite:{TFLITE_MODEL}", "--clusters", "auto"),
        stdout=out,
    )
    report = json.loads(out.getvalue())
    methods = report["methods"]
    default = methods[report["default"]]
    assert report["library"] > 400 and report["queries"] > 150
    assert methods["cluster"]["p_at_k"] > methods["popularity"]["p_at_k"] + 0.03
    assert methods["cluster"]["distinct_correct"] > 3 * methods["popularity"]["distinct_correct"]
    assert default["p_at_k"] > methods["cluster"]["p_at_k"]
    assert default["distinct_correct"] > methods["cluster"]["distinct_correct"]
    assert default["p_at_k"] >= methods["knn"]["p_at_k"] - 0.01
