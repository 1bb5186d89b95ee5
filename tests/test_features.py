"""Feature extraction: enqueue on commit, bulk computing, failures, idempotency, stale vectors.

The extractor is the real one from tests/settings.py (VGG16, seeded random weights, 64 px).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from django.core import serializers
from django.core.management import CommandError, call_command
from django.db import transaction
from django.test import override_settings
from django_q.models import Task

from imagetags.conf import imagetags_settings
from imagetags.images import InvalidImage, open_image
from imagetags.models import ClusterMembership, FeatureStatus, Post, StockImage, TagSource
from imagetags.services import vectors
from imagetags.services.extractors import FeatureExtractor, get_extractor
from imagetags.services.features import (
    compute_features,
    read_vectors,
    ready_images,
    select_images,
)
from imagetags.services.pipeline_state import feature_tasks_suspended
from imagetags.tasks import extract_features, run_feature_pipeline
from tests.conftest import PROJECT_ROOT

GARBAGE = b"this is not an image at all"


def open_error(data: bytes) -> str:
    """The message ``images.open_image`` gives for these bytes: what a failed row must record."""
    with pytest.raises(InvalidImage) as info:
        open_image(io.BytesIO(data))
    return str(info.value)


@pytest.fixture
def extractor() -> FeatureExtractor:
    return get_extractor()


@pytest.fixture
def other_extractor_settings(settings) -> dict:
    """IMAGETAGS with the same backbone pooled differently: a different key, same dimensions."""
    config = settings.IMAGETAGS["EXTRACTOR"]
    if config["CLASS"] != "vgg16":
        pytest.skip("switches VGG16 pooling; the configured extractor is not VGG16")
    options = {**config.get("OPTIONS", {}), "pooling": "max"}
    return {**settings.IMAGETAGS, "EXTRACTOR": {**config, "OPTIONS": options}}


def _vector(image: StockImage) -> np.ndarray:
    return vectors.from_bytes(image.vector)


def _fresh(image: StockImage) -> StockImage:
    # Not refresh_from_db(): for an ImageField with dimension fields it re-opens the file to
    # measure it, which fails for exactly the broken files these tests are about.
    return StockImage.objects.get(pk=image.pk)


def _corrupt(image: StockImage, data: bytes = GARBAGE) -> None:
    # Overwrite the stored file behind the model's back, as a failing disk or a bad sync would.
    Path(image.image.path).write_bytes(data)


# --- enqueueing --------------------------------------------------------------------------------


def test_saving_an_image_enqueues_extraction_on_commit(
    db, make_upload, django_capture_on_commit_callbacks, extractor
):
    post = Post.objects.create()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        image = StockImage.objects.create(post=post, image=make_upload(pattern="noise"))
        # Nothing is computed inside the request/transaction.
        assert StockImage.objects.get(pk=image.pk).feature_status == FeatureStatus.PENDING

    assert len(callbacks) == 1
    image = _fresh(image)
    assert image.feature_status == FeatureStatus.READY
    assert image.extractor_key == extractor.key
    assert image.feature_error == ""
    assert image.feature_attempts == 1
    assert image.features_updated is not None
    vector = _vector(image)
    assert vector.shape == (extractor.dim,)
    if extractor.backend == "vgg16":
        assert extractor.dim == 512  # block5_conv3, pooled
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    # It went through django-q2 (sync in tests) as the named task, not a direct call.
    task = Task.objects.get(name=f"imagetags-features-{image.pk}")
    assert task.success, task.result
    assert task.result["ready"] == 1


def test_unchanged_resave_enqueues_nothing_but_a_new_file_does(
    make_post, make_upload, django_capture_on_commit_callbacks
):
    image = make_post().images.get()
    image = StockImage.objects.get(pk=image.pk)  # as a view would load it
    with django_capture_on_commit_callbacks() as callbacks:
        image.save()
    assert callbacks == []

    with django_capture_on_commit_callbacks() as callbacks:
        image.image = make_upload("replacement.jpg", color=(0, 0, 255))
        image.save()
    # One feature task for the new file (and the old file's deletion, tests/test_deleted_files.py).
    assert [callback.__qualname__.split(".")[0] for callback in callbacks] == [
        "stock_image_saved",
        "stock_image_file_replaced",
    ]


def test_raw_save_from_fixtures_enqueues_nothing(make_post, django_capture_on_commit_callbacks):
    image = make_post().images.get()
    dumped, pk = serializers.serialize("json", [image]), image.pk
    image.delete()
    with django_capture_on_commit_callbacks() as callbacks:
        for obj in serializers.deserialize("json", dumped):
            obj.save()  # save_base(raw=True), as loaddata does
    assert callbacks == []
    assert StockImage.objects.filter(pk=pk).exists()


def test_rolled_back_transaction_enqueues_nothing(
    db, make_upload, django_capture_on_commit_callbacks
):
    post = Post.objects.create()
    with (
        django_capture_on_commit_callbacks(execute=True) as callbacks,
        contextlib.suppress(RuntimeError),
        transaction.atomic(),
    ):
        StockImage.objects.create(post=post, image=make_upload())
        raise RuntimeError("the upload view failed after saving")
    assert callbacks == []
    assert not StockImage.objects.exists()


def test_suspended_feature_tasks_enqueue_nothing(
    db, make_upload, django_capture_on_commit_callbacks
):
    post = Post.objects.create()
    with django_capture_on_commit_callbacks(execute=True) as callbacks, feature_tasks_suspended():
        image = StockImage.objects.create(post=post, image=make_upload())
    assert callbacks == []
    image = _fresh(image)
    assert image.feature_status == FeatureStatus.PENDING
    # Outside the block, saving works as usual again.
    with django_capture_on_commit_callbacks() as callbacks:
        StockImage.objects.create(post=post, image=make_upload("second.jpg"))
    assert len(callbacks) == 1


# --- computing ---------------------------------------------------------------------------------


def test_compute_features_batches_and_reports_progress(make_post, extractor):
    post = make_post(images=5, pattern="noise")
    ids = list(post.images.order_by("pk").values_list("pk", flat=True))
    done: list[int] = []

    summary = compute_features(ids, batch_size=2, progress=done.append)

    assert done == [2, 4, 5]
    assert (summary.ready, summary.failed, summary.skipped) == (5, 0, 0)
    assert summary.extractor_key == extractor.key
    found, matrix = read_vectors(ids, extractor.key)
    assert found == ids
    assert matrix.shape == (5, extractor.dim)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    # Same model, same pixels: the batched vectors equal one-at-a-time ones.
    image = StockImage.objects.get(pk=ids[3])
    with image.image.open("rb") as fh:
        alone = extractor.embed_batch([open_image(fh)[0]])[0]
    np.testing.assert_allclose(matrix[3], alone, atol=1e-5)
    assert summary.as_dict()["ready"] == 5


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "deleted"])
def test_unreadable_file_fails_alone_and_recovers(make_post, extractor, damage):
    post = make_post(images=3, pattern="noise")
    images = list(post.images.order_by("pk"))
    bad = images[1]
    good_bytes = Path(bad.image.path).read_bytes()
    if damage == "deleted":
        os.remove(bad.image.path)
        expected = f"The file {bad.image.name!r} is missing from storage."
    else:
        data = {"garbage": GARBAGE, "truncated": good_bytes[: len(good_bytes) // 2], "empty": b""}
        _corrupt(bad, data[damage])
        expected = open_error(data[damage])

    summary = compute_features([image.pk for image in images], batch_size=8)

    assert (summary.ready, summary.failed) == (2, 1)
    assert len(summary.errors) == 1
    assert summary.errors[0][0] == bad.pk
    assert summary.errors[0][1] == expected
    bad = _fresh(bad)
    assert bad.feature_status == FeatureStatus.FAILED
    assert bad.feature_error == expected
    assert bad.feature_attempts == 1
    assert bad.vector is None
    for other in (images[0], images[2]):
        other = _fresh(other)
        assert other.feature_status == FeatureStatus.READY
        assert other.extractor_key == extractor.key
    # The failure is retried by --missing until MAX_FEATURE_ATTEMPTS ...
    assert list(select_images("missing", extractor.key)) == [bad]
    compute_features(select_images("missing", extractor.key))
    bad = _fresh(bad)
    assert (bad.feature_status, bad.feature_attempts) == (FeatureStatus.FAILED, 2)

    # ... and once the file is back, it succeeds.
    Path(bad.image.path).write_bytes(good_bytes)
    summary = compute_features(select_images("missing", extractor.key))
    assert (summary.ready, summary.failed, summary.skipped) == (1, 0, 0)
    bad = _fresh(bad)
    assert bad.feature_status == FeatureStatus.READY
    assert bad.feature_error == ""
    assert bad.feature_attempts == 3
    assert _vector(bad).shape == (extractor.dim,)
    assert StockImage.objects.count() == 3  # no row was ever deleted


def test_images_out_of_attempts_are_not_selected_as_missing(make_post, extractor):
    image = make_post().images.get()
    _corrupt(image)
    for _ in range(imagetags_settings.MAX_FEATURE_ATTEMPTS):
        compute_features(select_images("missing", extractor.key))
    image = _fresh(image)
    assert image.feature_attempts == 3
    assert not select_images("missing", extractor.key).exists()
    assert select_images("all", extractor.key).get() == image


class _BrokenModel(FeatureExtractor):
    """A backend whose inference always raises (out of memory, a broken runtime)."""

    backend = "broken"
    input_size = 32

    @property
    def key(self) -> str:
        return "broken/v1"

    @property
    def dim(self) -> int:
        return 4

    def load(self) -> None:
        pass

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("out of memory")


def test_model_failure_fails_the_batch_and_the_run_goes_on(make_post):
    post = make_post(images=3, pattern="noise")
    ids = list(post.images.values_list("pk", flat=True))

    summary = compute_features(ids, extractor=_BrokenModel(), batch_size=2)

    assert (summary.ready, summary.failed) == (0, 3)  # both batches were tried
    for image in StockImage.objects.filter(pk__in=ids):
        assert image.feature_status == FeatureStatus.FAILED
        assert image.feature_error == "Feature extraction failed: RuntimeError: out of memory"
        assert image.feature_attempts == 1


class _FileSwappingExtractor(FeatureExtractor):
    """The real model, but a user replaces one image's file while its batch is being embedded."""

    def __init__(self, real: FeatureExtractor, victim_id: int, new_file) -> None:
        self.real, self.victim_id, self.new_file = real, victim_id, new_file
        self.input_size = real.input_size

    @property
    def key(self) -> str:
        return self.real.key

    @property
    def dim(self) -> int:
        return self.real.dim

    def load(self) -> None:
        self.real.load()

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        victim = StockImage.objects.get(pk=self.victim_id)
        victim.image = self.new_file
        with feature_tasks_suspended():
            victim.save()
        return self.real.embed_arrays(batch)


def test_file_replaced_during_embedding_keeps_no_old_vector(make_post, make_upload, extractor):
    post = make_post(images=2, pattern="noise")
    victim, other = post.images.order_by("pk")
    swapping = _FileSwappingExtractor(
        extractor, victim.pk, make_upload("new.jpg", color=(0, 200, 0))
    )

    summary = compute_features([victim.pk, other.pk], extractor=swapping)

    assert (summary.ready, summary.skipped) == (1, 1)
    victim = _fresh(victim)
    assert victim.feature_status == FeatureStatus.PENDING  # waiting for its own new task
    assert victim.vector is None
    assert victim.image.name.endswith("new.jpg")
    other = _fresh(other)
    assert other.feature_status == FeatureStatus.READY


# --- idempotency -------------------------------------------------------------------------------


def test_task_run_twice_stores_one_vector(make_post, extractor):
    image = make_post(pattern="noise").images.get()

    first = extract_features(image.pk)
    image = _fresh(image)
    stored, updated = bytes(image.vector), image.features_updated
    second = extract_features(image.pk)
    image = _fresh(image)

    assert (first["ready"], first["skipped"]) == (1, 0)
    assert (second["ready"], second["skipped"]) == (0, 1)
    assert image.feature_attempts == 1
    assert bytes(image.vector) == stored
    assert image.features_updated == updated
    assert image.extractor_key == extractor.key


def test_task_delivered_twice_through_the_queue(
    db, make_upload, django_capture_on_commit_callbacks
):
    from imagetags.signal_handlers import enqueue_feature_extraction

    post = Post.objects.create()
    with django_capture_on_commit_callbacks(execute=True):
        image = StockImage.objects.create(post=post, image=make_upload(pattern="noise"))
    stored = bytes(StockImage.objects.get(pk=image.pk).vector)
    enqueue_feature_extraction(image.pk)  # a redelivery

    image = _fresh(image)
    assert bytes(image.vector) == stored
    assert image.feature_attempts == 1
    assert StockImage.objects.count() == 1
    assert Task.objects.filter(name=f"imagetags-features-{image.pk}").count() == 2


def test_task_for_a_deleted_image_does_nothing(make_post):
    image = make_post().images.get()
    pk = image.pk
    image.delete()
    assert extract_features(pk)["skipped"] == 1


def test_force_recomputes_the_same_vector(make_post):
    image = make_post(pattern="noise").images.get()
    compute_features([image.pk])
    image = _fresh(image)
    stored = bytes(image.vector)

    summary = compute_features([image.pk], force=True)

    image = _fresh(image)
    assert summary.ready == 1
    assert image.feature_attempts == 2
    np.testing.assert_allclose(_vector(image), vectors.from_bytes(stored), atol=1e-6)


# --- extractor changes -------------------------------------------------------------------------


def test_extractor_change_writes_nothing_and_stale_run_recomputes_other_key_vectors(
    make_post, add_post, extractor, other_extractor_settings
):
    post = make_post(images=2, pattern="noise")
    ids = sorted(post.images.values_list("pk", flat=True))
    compute_features(ids)
    old_key = extractor.key
    old_vectors = read_vectors(ids, old_key)[1]
    pending = make_post(pattern="noise").images.get().pk  # never computed: not stale work
    before = sorted(StockImage.objects.values_list("pk", "feature_status", "extractor_key"))

    with override_settings(IMAGETAGS=other_extractor_settings):
        new = get_extractor()
        assert new.key != old_key
        third = add_post([], [0], key="third/extractor").images.get().pk
        # Stale is derived: exactly the ready vectors whose key is not the configured one.
        assert sorted(select_images("stale", new.key).values_list("pk", flat=True)) == sorted(
            [*ids, third]
        )
        assert pending not in select_images("stale", new.key).values_list("pk", flat=True)
        # No reader hands out a vector of the old key under the new one ...
        assert not ready_images(new.key).exists()
        assert read_vectors(ids, new.key)[0] == []

        out = io.StringIO()
        call_command("compute_features", "--missing", stdout=out, stderr=io.StringIO())
        assert (
            f"3 images with vectors of another extractor (stale for {new.key}) are left out: "
            "use --stale." in out.getvalue()
        )
        # ... and the run computed the pending image only: the old extractor's rows are as
        # they were, still ready under their own key.
        after = StockImage.objects.filter(pk__in=ids)
        assert sorted(after.values_list("pk", "feature_status", "extractor_key")) == [
            row for row in before if row[0] != pending
        ]
        assert StockImage.objects.get(pk=pending).extractor_key == new.key

        out = io.StringIO()
        call_command("compute_features", "--stale", stdout=out, stderr=io.StringIO())
        assert f"Computing features for 3 images with extractor {new.key}; 3 stale" in (
            out.getvalue()
        )
        found, new_vectors = read_vectors(ids, new.key)
        assert found == ids
        assert read_vectors(ids, old_key)[0] == []
        assert not np.allclose(new_vectors, old_vectors, atol=1e-3)  # max pooling, not avg
        assert set(StockImage.objects.values_list("extractor_key", flat=True)) == {new.key}


def test_switching_the_extractor_back_restores_every_vector_at_once(
    make_post, extractor, other_extractor_settings
):
    post = make_post(images=3, pattern="noise")
    ids = sorted(post.images.values_list("pk", flat=True))
    compute_features(ids)
    stored = sorted(StockImage.objects.values_list("pk", "vector", "feature_attempts"))

    with override_settings(IMAGETAGS=other_extractor_settings):
        other = get_extractor().key
        # Anything that looks at the library under the other key (a rebuild refuses) ...
        with pytest.raises(CommandError, match="3 of 3 ready vectors were made by extractor"):
            call_command("rebuild_clusters", "--k", "1")
        assert "Nothing to compute (missing)" in _run()
        assert not ready_images(other).exists()

    # ... leaves the vectors usable as they are once the setting is back: nothing recomputed.
    assert sorted(ready_images(extractor.key).values_list("pk", flat=True)) == ids
    assert sorted(StockImage.objects.values_list("pk", "vector", "feature_attempts")) == stored
    assert "Nothing to compute (stale)" in _run("--stale")


# --- the command -------------------------------------------------------------------------------


def _run(*args: str) -> str:
    out = io.StringIO()
    call_command("compute_features", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_command_computes_missing_by_default(make_post, extractor):
    make_post(images=3, pattern="noise")

    output = _run("--batch-size", "2")

    assert (
        f"Computing features for 3 images with extractor {extractor.key}; "
        "0 stale, 0 failed earlier." in output
    )
    assert "3 ready, 0 failed, 0 skipped" in output
    assert "images/s" in output
    assert ready_images(extractor.key).count() == 3
    assert "Nothing to compute (missing)" in _run()


def test_command_all_skips_current_vectors_unless_forced(make_post, extractor):
    post = make_post(images=2, pattern="noise")
    _run()

    assert "0 ready, 0 failed, 2 skipped" in _run("--all")
    assert "2 ready, 0 failed, 0 skipped" in _run("--all", "--force")
    assert set(post.images.values_list("feature_attempts", flat=True)) == {2}


def test_command_lists_failures_with_image_ids(make_post, extractor):
    images = list(make_post(images=3, pattern="noise").images.order_by("pk"))
    _corrupt(images[0])
    _corrupt(images[1], b"")

    output = _run()

    assert "1 ready, 2 failed, 0 skipped" in output
    assert f"  image {images[0].pk}: {open_error(GARBAGE)}" in output
    assert f"  image {images[1].pk}: {open_error(b'')}" in output
    # The next run says it is retrying them.
    assert "Computing features for 2 images" in _run()
    output = _run()
    assert "0 stale, 2 failed earlier." in output
    # Out of attempts now: the default mode leaves them alone and says what would retry them.
    output = _run()
    assert "Nothing to compute (missing)" in output
    assert "2 images failed 3 times and are not retried: fix their files, then use --all." in output


def test_command_modes_are_mutually_exclusive(db):
    with pytest.raises(CommandError):
        call_command("compute_features", "--stale", "--all")


def test_command_rejects_a_zero_batch_size(db):
    with pytest.raises(CommandError, match="--batch-size must be 1 or more"):
        _run("--batch-size", "0")


def test_command_fails_clearly_when_the_extractor_cannot_load(make_post, settings):
    image = make_post().images.get()
    broken = {**settings.IMAGETAGS, "EXTRACTOR": {"CLASS": "vgg16", "OPTIONS": {"pooling": "sum"}}}
    with (
        override_settings(IMAGETAGS=broken),
        pytest.raises(CommandError, match=r"could not be loaded.*Check IMAGETAGS\['EXTRACTOR'\]"),
    ):
        _run()
    image = _fresh(image)
    assert (image.feature_status, image.feature_attempts) == (FeatureStatus.PENDING, 0)


@pytest.mark.slow
def test_command_exits_non_zero_when_the_weights_file_is_broken(tmp_path):
    # A file that exists passes the system checks; only loading it finds it is not VGG16 weights.
    weights = tmp_path / "vgg16.weights.h5"
    weights.write_bytes(b"not an HDF5 file")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "IMAGETAGS_EXTRACTOR": f"vgg16:{weights}",
        "IMAGETAGS_TEST_DB": str(tmp_path / "db.sqlite3"),
        "IMAGETAGS_TEST_MEDIA": str(tmp_path / "media"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "django", "compute_features"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "CommandError: The feature extractor could not be loaded" in result.stderr
    assert "Check IMAGETAGS['EXTRACTOR']" in result.stderr


# --- after a batch: incremental clustering and auto-tagging (the pipeline in tasks.py) ---------


@pytest.fixture
def clustered_library(make_post):
    """Two tagged posts of two images each, embedded and clustered (K=2) into an active set."""
    from imagetags.services.rebuild import rebuild_clusters

    make_post(tags=["tomato"], images=2, color=(220, 20, 20), pattern="noise")
    make_post(tags=["sea"], images=2, color=(20, 20, 220), pattern="stripes")
    compute_features(StockImage.objects.all())
    return rebuild_clusters(k=2, algorithm="kmeans")


@pytest.fixture
def auto_tag(settings) -> None:
    settings.IMAGETAGS = {**settings.IMAGETAGS, "AUTO_TAG": True, "AUTO_TAG_THRESHOLD": None}


def test_new_vectors_join_the_active_clustering_at_once(make_post, clustered_library):
    image = make_post(tags=["tomato"], color=(220, 20, 20), pattern="noise").images.get()
    assert not ClusterMembership.objects.filter(image=image).exists()

    run_feature_pipeline([image.pk])

    membership = ClusterMembership.objects.get(image=image)
    assert membership.cluster_set == clustered_library
    # Running again neither moves nor double-counts it.
    run_feature_pipeline([image.pk], force=True)
    assert ClusterMembership.objects.filter(image=image).count() == 1


def test_auto_tags_wait_until_all_images_of_a_post_are_ready(
    make_post, clustered_library, auto_tag
):
    post = make_post(images=2, color=(220, 20, 20), pattern="noise")  # no tags yet
    first, second = post.images.order_by("pk")

    run_feature_pipeline([first.pk])
    assert not post.post_tags.exists()  # the second image is still pending

    run_feature_pipeline([second.pk])
    sources = set(post.post_tags.values_list("source", flat=True))
    assert sources == {TagSource.AUTO}
    assert set(post.tags.values_list("name", flat=True)) <= {"tomato", "sea"}


def test_no_auto_tags_when_the_setting_is_off(make_post, clustered_library):
    post = make_post(images=1, color=(220, 20, 20), pattern="noise")
    run_feature_pipeline(post.images.values_list("pk", flat=True))
    assert post.images.get().feature_status == FeatureStatus.READY
    assert not post.post_tags.exists()


def test_computing_features_alone_neither_assigns_nor_auto_tags(
    make_post, clustered_library, auto_tag
):
    """Only tasks.py chains the pipeline: the features service stores vectors and stops."""
    post = make_post(images=1, color=(220, 20, 20), pattern="noise")
    image = post.images.get()

    assert compute_features([image.pk]).ready == 1

    image.refresh_from_db()
    assert image.feature_status == FeatureStatus.READY
    assert not ClusterMembership.objects.filter(image=image).exists()
    assert not post.post_tags.exists()


def test_the_task_runs_the_whole_pipeline(make_post, clustered_library, auto_tag):
    post = make_post(images=1, color=(220, 20, 20), pattern="noise")
    image = post.images.get()

    assert extract_features(image.pk)["ready"] == 1

    assert ClusterMembership.objects.get(image=image).cluster_set == clustered_library
    assert set(post.post_tags.values_list("source", flat=True)) == {TagSource.AUTO}


def test_the_command_runs_the_whole_pipeline(make_post, clustered_library, auto_tag):
    post = make_post(images=2, color=(220, 20, 20), pattern="noise")

    call_command("compute_features", "--batch-size", "1", stdout=io.StringIO())

    members = ClusterMembership.objects.filter(image__post=post, cluster_set=clustered_library)
    assert members.count() == 2
    assert set(post.post_tags.values_list("source", flat=True)) == {TagSource.AUTO}


# --- old rows ----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_migration_turns_stale_rows_with_a_vector_back_into_ready():
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    before = [("imagetags", "0004_rebuildlock")]
    executor = MigrationExecutor(connection)
    latest = executor.loader.graph.leaf_nodes("imagetags")
    executor.migrate(before)
    try:
        apps = executor.loader.project_state(before).apps
        OldPost = apps.get_model("imagetags", "Post")
        OldImage = apps.get_model("imagetags", "StockImage")
        post = OldPost.objects.create()
        vector = vectors.to_bytes(np.ones(4, dtype=np.float32) / 2)
        rows = {
            name: OldImage.objects.create(
                post=post,
                image=f"library/{name}.jpg",
                sha256=name.ljust(64, "0"),
                width=1,
                height=1,
                feature_status=status,
                extractor_key=key,
                vector=data,
            ).pk
            for name, status, key, data in [
                ("stale", "stale", "old/extractor", vector),
                ("hollow", "stale", "old/extractor", None),
                ("ready", "ready", "new/extractor", vector),
                ("pending", "pending", "", None),
            ]
        }
        executor = MigrationExecutor(connection)
        executor.migrate([("imagetags", "0005_stale_vectors_ready")])
        apps = executor.loader.project_state([("imagetags", "0005_stale_vectors_ready")]).apps
        NewImage = apps.get_model("imagetags", "StockImage")
        found = {
            pk: (status, key, data is not None)
            for pk, status, key, data in NewImage.objects.values_list(
                "pk", "feature_status", "extractor_key", "vector"
            )
        }
        assert found == {
            rows["stale"]: ("ready", "old/extractor", True),  # its key says what it is
            rows["hollow"]: ("pending", "", False),  # nothing to use: computed again
            rows["ready"]: ("ready", "new/extractor", True),
            rows["pending"]: ("pending", "", False),
        }
    finally:
        MigrationExecutor(connection).migrate(latest)
