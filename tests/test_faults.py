"""Faults: failing and repeated feature tasks, rolled-back uploads, killed workers and rebuilds,
concurrent rebuilds, and no clusters yet.

Everything here runs on the suite's database, SQLite or (``IMAGETAGS_TEST_DATABASE_URL``)
PostgreSQL, with real django-q2 workers and real processes that are killed with SIGKILL.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, connections, transaction
from django.utils import timezone

from imagetags.core import kmeans
from imagetags.models import (
    Cluster,
    ClusterMembership,
    ClusterSet,
    ClusterSetStatus,
    FeatureStatus,
    Post,
    RebuildLock,
    StockImage,
    TagFrequency,
)
from imagetags.services import vectors
from imagetags.services.extractors import get_extractor
from imagetags.services.features import select_images
from imagetags.services.locks import (
    ABANDONED_ERROR,
    LOCK_NAME,
    RebuildInProgress,
    rebuild_lock,
)
from imagetags.services.posts import create_post
from imagetags.services.rebuild import rebuild_clusters
from imagetags.services.suggest import NoActiveClusters, suggest
from imagetags.signal_handlers import enqueue_feature_extraction
from tests.conftest import DIM, unit
from tests.processes import (
    READY_TIMEOUT,
    REDIS_URL,
    DjangoProcesses,
    isolated_queue,
    log_contains,
    redis_queue_state,
    wait_for,
)

ON_POSTGRES = bool(os.environ.get("IMAGETAGS_TEST_DATABASE_URL"))


@pytest.fixture
def processes(settings, media_root, tmp_path):
    group = DjangoProcesses(settings, media_root, tmp_path)
    yield group
    group.stop_all()


def _raise(*_args, **_kwargs):
    raise RuntimeError("the model fell over")


def _library(add_post, posts: int = 4) -> list[Post]:
    """Posts on axes 0/1 (tagged red) and 2/3 (tagged blue): two obvious clusters."""
    made = []
    for i in range(posts):
        made.append(add_post(["red", f"r{i}"], [0, 1]))
        made.append(add_post(["blue", f"b{i}"], [2, 3]))
    return made


# --- feature tasks ---------------------------------------------------------------------------


def test_failing_extractor_is_recorded_and_the_requeued_task_completes(db, make_post, monkeypatch):
    image = make_post(tags=["x"], pattern="noise").images.get()
    extractor_class = type(get_extractor())
    monkeypatch.setattr(extractor_class, "embed_batch", _raise)

    # Through django-q2 (synchronously here: tests/settings.py), as the upload's task would run.
    enqueue_feature_extraction(image.pk)
    image.refresh_from_db()
    assert image.feature_status == FeatureStatus.FAILED
    assert image.feature_error == "Feature extraction failed: RuntimeError: the model fell over"
    assert image.vector is None and image.feature_attempts == 1
    # Still listed, and still picked up by `compute_features --missing` (attempts left).
    assert StockImage.objects.filter(pk=image.pk).exists()
    assert list(select_images("missing", get_extractor().key)) == [image]

    monkeypatch.undo()
    enqueue_feature_extraction(image.pk)  # re-queued
    image.refresh_from_db()
    assert image.feature_status == FeatureStatus.READY, image.feature_error
    assert image.feature_error == ""
    assert vectors.from_bytes(image.vector).shape == (get_extractor().dim,)
    assert image.feature_attempts == 2


# Runs in a worker before qcluster starts: the first feature task raises (a database outage, a
# bug), the ones after it run normally.
FIRST_TASK_RAISES = """
import os, pathlib
from imagetags.services import features
marker = pathlib.Path(os.environ["IMAGETAGS_TEST_MARKER"])
original = features.compute_features
def failing_once(*args, **kwargs):
    if not marker.exists():
        marker.write_text("raised")
        raise RuntimeError("the database went away")
    return original(*args, **kwargs)
features.compute_features = failing_once
"""


@pytest.mark.worker
@pytest.mark.slow
def test_task_that_raises_is_recorded_and_the_requeued_task_completes(
    transactional_db, make_upload, processes, monkeypatch, tmp_path
):
    from django_q.models import Task

    isolated_queue(monkeypatch, processes, "redis" if REDIS_URL else "orm")
    marker = tmp_path / "raised"
    processes.qcluster(preamble=FIRST_TASK_RAISES, IMAGETAGS_TEST_MARKER=str(marker))
    image = create_post(files=[make_upload("r.jpg", pattern="noise")]).images.get()
    name = f"imagetags-features-{image.pk}"

    wait_for(
        lambda: Task.objects.filter(name=name).exists(),
        timeout=READY_TIMEOUT,
        processes=processes,
        what="the failing task's result",
    )
    failed = Task.objects.get(name=name)
    assert failed.success is False
    assert "RuntimeError: the database went away" in str(failed.result)
    image.refresh_from_db()
    # Nothing written: still pending, listed, and picked up by `compute_features --missing`.
    assert image.feature_status == FeatureStatus.PENDING and image.vector is None
    assert image in select_images("missing", get_extractor().key)

    enqueue_feature_extraction(image.pk)  # re-queued (the admin action and the sweep do this)
    wait_for(
        lambda: StockImage.objects.filter(pk=image.pk, feature_status=FeatureStatus.READY).exists(),
        timeout=READY_TIMEOUT,
        processes=processes,
        what="the re-queued task",
    )
    # The monitor saves the result after the task has committed the vector (the same race as in
    # test_worker_killed_mid_extraction_is_retried_and_completes): wait for it.
    wait_for(
        lambda: Task.objects.filter(name=name, success=True).exists(),
        timeout=READY_TIMEOUT,
        processes=processes,
        what="the monitor to save the re-queued task's result",
    )
    image.refresh_from_db()
    assert image.feature_attempts == 1
    assert Task.objects.filter(name=name, success=True).count() == 1


def test_same_task_delivered_twice_stores_one_vector_and_counts_once(db, make_post):
    from imagetags.services.features import compute_features

    library = [
        make_post(tags=["red"], images=2, color=(220, 20, 20), pattern="noise", seed=i)
        for i in range(3)
    ] + [
        make_post(tags=["blue"], images=2, color=(20, 20, 220), pattern="noise", seed=10 + i)
        for i in range(3)
    ]
    compute_features(StockImage.objects.filter(post__in=library))
    active = rebuild_clusters(k=2, algorithm="kmeans")
    new = make_post(tags=["red", "fresh"], images=1, color=(220, 20, 20), pattern="noise", seed=99)
    image = new.images.get()

    def state():
        cluster_rows = sorted(
            Cluster.objects.filter(cluster_set=active).values_list("size", "post_count")
        )
        frequency_rows = sorted(
            TagFrequency.objects.filter(cluster__cluster_set=active).values_list(
                "cluster_id", "tag__name", "post_count"
            )
        )
        return cluster_rows, frequency_rows

    before = state()
    from imagetags.tasks import extract_features

    first = extract_features(image.pk)
    stored = StockImage.objects.get(pk=image.pk)
    after_first = state()
    second = extract_features(image.pk)  # delivered again
    again = StockImage.objects.get(pk=image.pk)

    assert first["ready"] == 1 and second == {**second, "ready": 0, "skipped": 1}
    assert again.vector == stored.vector and again.features_updated == stored.features_updated
    assert again.feature_attempts == 1
    assert ClusterMembership.objects.filter(image=image, cluster_set=active).count() == 1
    assert state() == after_first != before
    # The one increment: one more image, and "fresh" counted in exactly one post.
    assert sum(size for size, _ in after_first[0]) == sum(size for size, _ in before[0]) + 1
    assert [row for row in after_first[1] if row[1] == "fresh"][0][2] == 1


def test_rolled_back_upload_enqueues_no_task(transactional_db, make_upload, monkeypatch, processes):
    from django_q.brokers import get_broker

    isolated_queue(monkeypatch, processes, "redis" if REDIS_URL else "orm")
    broker = get_broker()

    class Abort(Exception):
        pass

    with pytest.raises(Abort), transaction.atomic():
        create_post(files=[make_upload("a.jpg")], typed_tags=["x"])
        raise Abort
    assert Post.objects.count() == 0 and StockImage.objects.count() == 0
    assert broker.queue_size() == 0

    # The control: the same upload committed enqueues one task, with the image id.
    post = create_post(files=[make_upload("a.jpg")], typed_tags=["x"])
    assert broker.queue_size() == 1
    assert post.images.count() == 1
    broker.purge_queue()


# --- a worker killed in the middle of extraction ---------------------------------------------

# Runs in the worker before qcluster starts (the pool is forked from it, so the patch is
# inherited): the first extraction announces itself in a marker file and hangs there, so that
# the test can kill the worker in the middle of it; later ones run normally.
SLOW_FIRST_EXTRACTION = """
import os, pathlib, time
from imagetags.services import features
marker = pathlib.Path(os.environ["IMAGETAGS_TEST_MARKER"])
original = features._process_batch
def hanging(*args, **kwargs):
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        time.sleep(600)
    return original(*args, **kwargs)
features._process_batch = hanging
"""

# Runs in the second worker: its monitor saves a task's result (the Task row) only once the test
# has seen the image ready (the marker file). That is the order a busy machine produces now and
# then: the task commits the vector in the pool process, and the monitor, another process, saves
# the result a moment later. A test that read the Task as soon as the image was ready failed then
# (Task.DoesNotExist); this makes that order happen every time.
RESULTS_SAVED_AFTER_THE_TEST_LOOKS = """
import os, pathlib, time
from django_q import monitor
seen = pathlib.Path(os.environ["IMAGETAGS_TEST_SEEN"])
original = monitor.save_task
def save_task_later(task, broker):
    deadline = time.monotonic() + 120
    while not seen.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return original(task, broker)
monitor.save_task = save_task_later
"""

BROKERS = [
    "orm",
    pytest.param(
        "redis", marks=pytest.mark.skipif(not REDIS_URL, reason="needs IMAGETAGS_TEST_REDIS")
    ),
]


@pytest.mark.worker
@pytest.mark.slow
@pytest.mark.parametrize("broker", BROKERS)
def test_worker_killed_mid_extraction_is_retried_and_completes(
    broker, transactional_db, make_upload, processes, monkeypatch, tmp_path
):
    from django_q.brokers import get_broker
    from django_q.models import Task

    queue = isolated_queue(monkeypatch, processes, broker)
    marker = tmp_path / "extracting"
    env = {"IMAGETAGS_TEST_MARKER": str(marker), "IMAGETAGS_TEST_Q_RETRY": "30"}
    post = create_post(files=[make_upload("k.jpg", pattern="noise", seed=5)], typed_tags=["k"])
    image = post.images.get()

    first = processes.qcluster(preamble=SLOW_FIRST_EXTRACTION, label="doomed-qcluster", **env)
    wait_for(
        marker.exists, timeout=READY_TIMEOUT, processes=processes, what="the extraction to start"
    )
    first.kill()  # SIGKILL: the worker, its pool and the task in hand die at once

    image.refresh_from_db()
    assert image.feature_status == FeatureStatus.PENDING  # nothing half-saved
    assert image.vector is None and image.feature_attempts == 0

    seen = tmp_path / "seen-ready"
    second = processes.qcluster(
        preamble=RESULTS_SAVED_AFTER_THE_TEST_LOOKS,
        label="second-qcluster",
        IMAGETAGS_TEST_SEEN=str(seen),
        **env,
    )
    explain = None
    if broker == "redis":
        # django-q2's Redis broker has no acknowledgements: the task left the queue when the
        # worker took it and died with it. The image is still pending, so the sweep that a
        # Redis deployment schedules (docs/deployment.md) picks it up again.
        assert get_broker().queue_size() == 0
        wait_for(
            lambda: log_contains(second, "running."),
            timeout=READY_TIMEOUT,
            processes=processes,
            what="the second worker to start",
        )
        from django_q.tasks import async_task

        async_task("django.core.management.call_command", "compute_features", "--missing")
        explain = lambda: redis_queue_state(queue)  # noqa: E731

    wait_for(
        lambda: StockImage.objects.filter(pk=image.pk, feature_status=FeatureStatus.READY).exists(),
        timeout=READY_TIMEOUT + 60,
        processes=processes,
        what="the retried extraction",
        explain=explain,
    )
    seen.write_text("ready")
    image.refresh_from_db()
    assert image.feature_attempts == 1  # the killed attempt wrote nothing
    assert vectors.from_bytes(image.vector).shape == (get_extractor().dim,)
    if broker == "orm":
        # The very task that was in hand when the worker died was delivered again. Its result is
        # saved by the monitor after the task returned, so a ready image does not mean the Task
        # row exists yet: wait for the row itself.
        name = f"imagetags-features-{image.pk}"
        wait_for(
            lambda: Task.objects.filter(name=name).exists(),
            timeout=READY_TIMEOUT,
            processes=processes,
            what="the monitor to save the retried task's result",
        )
        task = Task.objects.get(name=name)
        assert task.success, task.result


# --- rebuilds: one at a time, and killed half-way --------------------------------------------


class _PausedFit:
    """Replaces kmeans.fit_clusters: the first call waits until released, others run at once."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.original = kmeans.fit_clusters
        self.first = True

    def __call__(self, *args, **kwargs):
        if self.first:
            self.first = False
            self.entered.set()
            assert self.release.wait(60), "never released"
        return self.original(*args, **kwargs)


def _in_thread(target, results: dict, key: str) -> threading.Thread:
    def run():
        try:
            results[key] = target()
        except BaseException as exc:  # reported by the test
            results[key] = exc
        finally:
            connections.close_all()  # this thread's connections (PostgreSQL drops the test DB)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_second_rebuild_is_refused_while_one_runs(transactional_db, add_post, monkeypatch):
    _library(add_post)
    previous = rebuild_clusters(k=2, algorithm="kmeans")
    paused = _PausedFit()
    monkeypatch.setattr(kmeans, "fit_clusters", paused)
    results: dict = {}
    thread = _in_thread(lambda: rebuild_clusters(k=2, algorithm="kmeans"), results, "first")
    try:
        assert paused.entered.wait(60), results
        building = ClusterSet.objects.get(status=ClusterSetStatus.BUILDING)

        with pytest.raises(RebuildInProgress) as refused:
            rebuild_clusters(k=2, algorithm="kmeans")
        message = str(refused.value)
        assert "already running" in message and f"cluster set {building.pk}" in message
        assert "No second rebuild was started" in message
        holder = "PostgreSQL backend " if ON_POSTGRES else f"{socket.gethostname()}:{os.getpid()}:"
        assert f"held by {holder}" in message
        with pytest.raises(CommandError, match="already running"):
            call_command("rebuild_clusters", "--k", "2", verbosity=0)
        # Nothing was built by the refused callers, and the old set still serves.
        assert ClusterSet.objects.count() == 2
        assert ClusterSet.objects.active() == previous
        assert suggest(unit(0)).cluster_set == previous.pk
    finally:
        paused.release.set()
        thread.join(60)
    assert not isinstance(results.get("first"), BaseException), results
    assert ClusterSet.objects.active() == results["first"] == building
    assert not RebuildLock.objects.exists()
    # The lock is free again.
    assert rebuild_clusters(k=2, algorithm="kmeans").status == ClusterSetStatus.ACTIVE


# A rebuild in a process of its own, stopped after it has written clusters and members but not
# yet the tag frequencies (nor activated the set): the test kills it there.
HALF_BUILT_REBUILD = """
import os, pathlib, time
from imagetags.services import rebuild
marker = pathlib.Path(os.environ["IMAGETAGS_TEST_MARKER"])
real_insert = rebuild.insert_rows
def hang_at_tag_frequencies(model, *args, **kwargs):
    if model is rebuild.TagFrequency:
        marker.write_text(str(os.getpid()))
        time.sleep(600)
    return real_insert(model, *args, **kwargs)
rebuild.insert_rows = hang_at_tag_frequencies
rebuild.rebuild_clusters(k=3, algorithm="kmeans")
"""


def _advisory_lock_free() -> bool:
    from imagetags.services.locks import ADVISORY_LOCK_KEY

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND ((classid::bigint << 32) | objid::bigint) = %s",
            [ADVISORY_LOCK_KEY],
        )
        return cursor.fetchone()[0] == 0


@pytest.mark.slow
def test_rebuild_killed_half_way_leaves_old_set_serving_and_is_cleaned_up(
    transactional_db, add_post, processes, tmp_path
):
    _library(add_post)
    previous = rebuild_clusters(k=2, algorithm="kmeans")
    before = suggest(unit(0))
    marker = tmp_path / "half-built"

    doomed = processes.start(HALF_BUILT_REBUILD, label="rebuild", IMAGETAGS_TEST_MARKER=str(marker))
    wait_for(marker.exists, timeout=120, processes=processes, what="the rebuild to write its rows")
    half = ClusterSet.objects.get(status=ClusterSetStatus.BUILDING)
    assert Cluster.objects.filter(cluster_set=half).count() == 3
    assert ClusterMembership.objects.filter(cluster_set=half).count() == 16
    doomed.kill()

    # The previous set is still the active one, and still answers, with the same tags.
    assert ClusterSet.objects.active() == previous
    assert suggest(unit(0)) == before
    if ON_POSTGRES:
        # The server released the dead process's advisory lock when its connection went.
        deadline = time.monotonic() + 10
        while not _advisory_lock_free() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _advisory_lock_free()
    else:
        assert RebuildLock.objects.get().owner.split(":")[1] == str(doomed.pid)

    messages: list[str] = []
    fresh = rebuild_clusters(k=2, algorithm="kmeans", progress=messages.append)
    half.refresh_from_db()
    assert half.status == ClusterSetStatus.FAILED and half.error == ABANDONED_ERROR
    assert not Cluster.objects.filter(cluster_set=half).exists()
    assert not ClusterMembership.objects.filter(cluster_set=half).exists()
    assert any(f"[{half.pk}]" in message for message in messages), messages
    assert ClusterSet.objects.active() == fresh
    previous.refresh_from_db()
    assert previous.status == ClusterSetStatus.RETIRED
    assert suggest(unit(0)).cluster_set == fresh.pk
    assert {t.name for t in suggest(unit(0)).tags} >= {"red"}
    assert not RebuildLock.objects.exists()


@pytest.mark.skipif(
    ON_POSTGRES, reason="the lock row is the fallback for databases without advisory locks"
)
class TestLockRowTakeover:
    def _stale_row(self, owner: str, acquired=None, heartbeat=None) -> RebuildLock:
        building = ClusterSet.objects.create(
            extractor_key="k", algorithm="kmeans", k=2, dim=DIM, heartbeat=heartbeat
        )
        return RebuildLock.objects.create(
            name=LOCK_NAME,
            owner=owner,
            acquired=acquired or timezone.now(),
            cluster_set=building,
        )

    @staticmethod
    def _dead_pid() -> int:
        import subprocess

        child = subprocess.Popen(["true"])
        child.wait()
        return child.pid

    def test_dead_owner_on_this_host_is_taken_over(self, db, add_post):
        _library(add_post)
        row = self._stale_row(f"{socket.gethostname()}:{self._dead_pid()}:abc")
        fresh = rebuild_clusters(k=2, algorithm="kmeans")
        assert fresh.status == ClusterSetStatus.ACTIVE
        assert ClusterSet.objects.get(pk=row.cluster_set_id).status == ClusterSetStatus.FAILED
        assert not RebuildLock.objects.exists()

    def test_live_owner_on_this_host_is_respected(self, db, add_post):
        _library(add_post)
        self._stale_row(f"{socket.gethostname()}:{os.getppid()}:abc")  # our parent: alive
        with pytest.raises(
            RebuildInProgress, match=f"held by {socket.gethostname()}:{os.getppid()}"
        ):
            rebuild_clusters(k=2, algorithm="kmeans")
        assert ClusterSet.objects.filter(status=ClusterSetStatus.BUILDING).count() == 1

    def test_remote_owner_is_taken_over_only_after_its_heartbeat_stops(self, db, add_post):
        _library(add_post)
        recent = timezone.now() - timedelta(minutes=5)
        row = self._stale_row(
            "other-host:123:abc", acquired=recent - timedelta(hours=3), heartbeat=recent
        )
        with pytest.raises(RebuildInProgress, match=r"last heartbeat 30\d s ago"):
            rebuild_clusters(k=2, algorithm="kmeans")
        ClusterSet.objects.filter(pk=row.cluster_set_id).update(
            heartbeat=timezone.now() - timedelta(hours=2)
        )
        assert rebuild_clusters(k=2, algorithm="kmeans").status == ClusterSetStatus.ACTIVE

    def test_lock_is_not_reentrant_and_is_released_on_error(self, db):
        with rebuild_lock(), pytest.raises(RebuildInProgress), rebuild_lock():
            pass  # pragma: no cover
        assert not RebuildLock.objects.exists()
        with pytest.raises(LookupError), rebuild_lock():
            raise LookupError("the rebuild failed")
        assert not RebuildLock.objects.exists()


# --- no clusters yet -------------------------------------------------------------------------


def test_no_active_set_says_no_clusters_yet(db, add_post, tmp_path):
    from tests.conftest import image_bytes

    with pytest.raises(NoActiveClusters, match="^No clusters yet"):
        suggest(unit(0))
    path = tmp_path / "q.jpg"
    path.write_bytes(image_bytes())
    with pytest.raises(CommandError, match="^No clusters yet"):
        call_command("suggest_tags", str(path))
    # A first rebuild still building, or only failed and retired sets, is no answer either.
    for status in (ClusterSetStatus.BUILDING, ClusterSetStatus.FAILED, ClusterSetStatus.RETIRED):
        ClusterSet.objects.create(
            status=status, extractor_key="k", algorithm="kmeans", k=1, dim=DIM
        )
        with pytest.raises(NoActiveClusters):
            suggest(unit(0))


def test_no_vectors_refuses_rebuild_without_writing(db, make_post):
    make_post(tags=["x"])  # pending, no vector yet
    with pytest.raises(CommandError, match="No feature vectors for the current extractor"):
        call_command("rebuild_clusters", verbosity=0)
    assert not ClusterSet.objects.exists() and not RebuildLock.objects.exists()
