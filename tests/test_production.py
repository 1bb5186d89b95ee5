"""The scale-out stack: PostgreSQL, django-q2 on Redis, several ``qcluster`` processes.

The worker tests run only when ``IMAGETAGS_TEST_DATABASE_URL`` and ``IMAGETAGS_TEST_REDIS`` are
set (``.ci/run`` starts both services and runs the suite a second time with them); they are skipped
with that reason otherwise. Serving suggestions during a rebuild needs only a database and runs on
both stacks.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from io import StringIO

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.db import connection, connections

from imagetags.conf import imagetags_settings
from imagetags.core import kmeans
from imagetags.models import (
    Cluster,
    ClusterMembership,
    ClusterSet,
    ClusterSetStatus,
    FeatureStatus,
    Post,
    PostTag,
    StockImage,
    Tag,
    TagFrequency,
)
from imagetags.services import vectors
from imagetags.services.extractors import get_extractor
from imagetags.services.pipeline_state import feature_tasks_suspended
from imagetags.services.posts import create_post
from imagetags.services.rebuild import rebuild_clusters
from imagetags.services.suggest import suggest
from imagetags.signal_handlers import enqueue_feature_extraction
from tests.conftest import image_bytes, unit
from tests.processes import (
    READY_TIMEOUT,
    DjangoProcesses,
    isolated_queue,
    requires_production_stack,
    wait_for,
)

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
}


@pytest.fixture
def processes(settings, media_root, tmp_path):
    group = DjangoProcesses(settings, media_root, tmp_path)
    yield group
    group.stop_all()


def _upload(name: str, color: str, seed: int) -> SimpleUploadedFile:
    data = image_bytes(COLORS[color], size=(48, 40), pattern="noise", seed=seed)
    return SimpleUploadedFile(name, data, content_type="image/jpeg")


def _assert_production_stack() -> None:
    from django_q.brokers import get_broker

    assert connection.vendor == "postgresql"
    assert type(get_broker()).__name__ == "Redis"


def _all_ready(ids: list[int]) -> bool:
    return StockImage.objects.filter(pk__in=ids, feature_status=FeatureStatus.READY).count() == len(
        ids
    )


def _assert_counts_match_members(cluster_set: ClusterSet) -> None:
    """Every size, post count and tag frequency of the set equals a recount of its members.

    Rebuilds write these counts in one go; new images add to them one at a time from several
    workers. Either way they must agree with the members: tags once per post, nothing twice.
    """
    counted = imagetags_settings.COUNTED_TAG_SOURCES
    tags_of: dict[int, set[str]] = defaultdict(set)
    for post_id, name in PostTag.objects.filter(source__in=counted).values_list(
        "post_id", "tag__name"
    ):
        tags_of[post_id].add(name)
    sizes: Counter[int] = Counter()
    posts: dict[int, set[int]] = defaultdict(set)
    for cluster_id, post_id in ClusterMembership.objects.filter(
        cluster_set=cluster_set
    ).values_list("cluster_id", "image__post_id"):
        sizes[cluster_id] += 1
        posts[cluster_id].add(post_id)
    for cluster in Cluster.objects.filter(cluster_set=cluster_set):
        expected = Counter(name for post_id in posts[cluster.pk] for name in tags_of[post_id])
        stored = dict(
            TagFrequency.objects.filter(cluster=cluster).values_list("tag__name", "post_count")
        )
        assert (cluster.size, cluster.post_count) == (sizes[cluster.pk], len(posts[cluster.pk]))
        assert stored == dict(expected), f"cluster {cluster.index}"
    cluster_set.refresh_from_db()
    assert cluster_set.n_images == sum(sizes.values())


@requires_production_stack
@pytest.mark.worker
@pytest.mark.slow
def test_upload_features_rebuild_suggest(transactional_db, processes, monkeypatch):
    isolated_queue(monkeypatch, processes, "redis")
    _assert_production_stack()
    processes.qcluster()

    # Uploads through the shared service, as the form and the API save them.
    image_ids = []
    for i in range(4):
        for color, tags in (("red", ["tomato", "red"]), ("blue", ["sea", "blue"])):
            post = create_post(
                files=[_upload(f"{color}{i}-{n}.jpg", color, seed=10 * i + n) for n in range(2)],
                typed_tags=tags,
            )
            image_ids += list(post.images.values_list("pk", flat=True))
    wait_for(
        lambda: _all_ready(image_ids),
        timeout=READY_TIMEOUT,
        processes=processes,
        what="the worker to embed 16 uploads",
    )

    out = StringIO()
    call_command("rebuild_clusters", "--k", "2", "--algorithm", "kmeans", stdout=out)
    active = ClusterSet.objects.active()
    assert f"Cluster set {active.pk} is active" in out.getvalue()
    assert active.n_images == 16 and active.n_posts == 8
    _assert_counts_match_members(active)

    for color, expected in (("red", {"tomato", "red"}), ("blue", {"sea", "blue"})):
        # The patent's method: the nearest cluster's tags, counted once per post.
        result = suggest(_upload("query.jpg", color, seed=999), method="cluster")
        assert result.cluster_set == active.pk
        assert {tag.name for tag in result.tags} == expected, result
        assert result.tags[0].evidence == "in 4 of 4 similar posts"
        # The default method ranks the same two first.
        result = suggest(_upload("query.jpg", color, seed=999))
        assert {tag.name for tag in result.tags[:2]} == expected, result

    # The command a site's scripts use, on the same stack.
    query = SimpleUploadedFile("q.jpg", image_bytes(COLORS["red"], size=(48, 40), pattern="noise"))
    path = processes.tmp_path / "q.jpg"
    path.write_bytes(query.read())
    out = StringIO()
    call_command("suggest_tags", str(path), "--json", stdout=out)
    assert "tomato" in out.getvalue()


# Each worker notes which images it embedded, so the test can tell that both took part.
RECORD_TASKS = """
import os
from imagetags import tasks
original = tasks.extract_features
def recording(image_id):
    result = original(image_id)
    with open(os.environ["IMAGETAGS_TEST_DONE"], "a") as fh:
        fh.write(f"{image_id} {result['ready']}\\n")
    return result
tasks.extract_features = recording
"""


def _handled(done_files) -> list[list[str]]:
    """The (image id, ready) lines the workers wrote, one per delivery they finished."""
    return [
        line.split()
        for done in done_files
        if done.exists()
        for line in done.read_text().splitlines()
        if line
    ]


@requires_production_stack
@pytest.mark.worker
@pytest.mark.slow
def test_two_workers_embed_200_images_each_once(transactional_db, processes, monkeypatch):
    from django_q.brokers import get_broker

    from imagetags.services.features import compute_features

    isolated_queue(monkeypatch, processes, "redis")
    _assert_production_stack()
    done_files = [processes.tmp_path / f"worker{n}.done" for n in range(2)]
    for n, done in enumerate(done_files):
        processes.qcluster(
            preamble=RECORD_TASKS, label=f"qcluster{n}", IMAGETAGS_TEST_DONE=str(done)
        )

    # A clustered library, so that each new vector is also counted into the active set.
    seed_posts = []
    with feature_tasks_suspended():  # embedded here, not by the workers
        for i, color in enumerate(list(COLORS) * 2):
            post = Post.objects.create(title=f"seed {i}")
            for name in (color, f"seed{i % 3}"):
                PostTag.objects.create(post=post, tag=Tag.objects.get_or_create(name=name)[0])
            StockImage.objects.create(post=post, image=_upload(f"s{i}.jpg", color, seed=500 + i))
            seed_posts.append(post)
    compute_features(StockImage.objects.filter(post__in=seed_posts))
    active = rebuild_clusters(k=4, algorithm="kmeans")

    # 100 posts of 2 images: 200 tasks on commit, then every one delivered a second time.
    image_ids = []
    for i in range(100):
        color = list(COLORS)[i % 4]
        post = Post.objects.create(title=f"post {i}")
        for name in (color, f"shade{i % 5}"):
            PostTag.objects.create(post=post, tag=Tag.objects.get_or_create(name=name)[0])
        for n in range(2):
            image = StockImage.objects.create(
                post=post, image=_upload(f"p{i}-{n}.jpg", color, seed=1000 + 2 * i + n)
            )
            image_ids.append(image.pk)
    for pk in image_ids:
        enqueue_feature_extraction(pk)

    wait_for(
        lambda: _all_ready(image_ids),
        timeout=READY_TIMEOUT + 240,
        processes=processes,
        what="two workers to embed 200 images",
        interval=1.0,
    )
    # Every delivery handled, not just taken: an empty Redis list only means the workers took
    # the tasks (a pusher holds some in memory), and the vectors are committed before a task
    # adds them to the active set. Waiting for the queue alone left the end of the run to the
    # SIGTERM below, which a busy machine may not finish before the SIGKILL.
    broker = get_broker()
    wait_for(
        lambda: len(_handled(done_files)) == 400 and broker.queue_size() == 0,
        timeout=READY_TIMEOUT,
        processes=processes,
        what="the duplicate deliveries to be handled",
        explain=lambda: f"{len(_handled(done_files))} of 400 deliveries handled",
    )
    processes.stop_all()

    # None lost, none computed twice: one attempt each, one vector of the current extractor.
    key, dim = get_extractor().key, get_extractor().dim
    rows = StockImage.objects.filter(pk__in=image_ids)
    assert rows.count() == 200
    assert set(rows.values_list("feature_status", "extractor_key", "feature_attempts")) == {
        (FeatureStatus.READY, key, 1)
    }
    for data in rows.values_list("vector", flat=True):
        assert vectors.from_bytes(data).shape == (dim,)
    # Every delivery was handled (400), by both workers, and each image embedded exactly once.
    handled = _handled(done_files)
    assert len(handled) == 400
    per_worker = [len(done.read_text().splitlines()) for done in done_files]
    assert min(per_worker) > 0, per_worker
    embedded = Counter(int(pk) for pk, ready in handled if ready == "1")
    assert embedded == Counter(dict.fromkeys(image_ids, 1))
    # Each image joined the active set once, and the counts the two workers kept adding to
    # agree with a recount.
    assert ClusterSet.objects.active() == active
    assert (
        ClusterMembership.objects.filter(cluster_set=active, image_id__in=image_ids).count() == 200
    )
    _assert_counts_match_members(active)


class _SlowFit:
    """Slows each k-means fit down, so that the rebuild overlaps many suggestion requests."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.original = kmeans.fit_clusters

    def __call__(self, *args, **kwargs):
        time.sleep(self.seconds)
        return self.original(*args, **kwargs)


@pytest.mark.slow
def test_suggestions_keep_being_served_during_rebuilds(transactional_db, add_post, monkeypatch):
    for i in range(6):
        add_post(["red", f"r{i}"], [0, 1])
        add_post(["blue", f"b{i}"], [2, 3])
        add_post(["green", f"g{i}"], [4, 5])
    first = rebuild_clusters(k=3, algorithm="kmeans")
    monkeypatch.setattr(kmeans, "fit_clusters", _SlowFit(0.5))
    queries = {"red": unit(0, 0.05, seed=901), "blue": unit(2, 0.05, seed=902)}

    stop = threading.Event()
    # (asked, answered, color, cluster set, tags) of every suggestion.
    answers: list[tuple[float, float, str, int, list[str]]] = []
    errors: list[BaseException] = []

    def serve(color: str) -> None:
        try:
            while not stop.is_set():
                asked = time.monotonic()
                result = suggest(queries[color], limit=3)
                answers.append(
                    (
                        asked,
                        time.monotonic(),
                        color,
                        result.cluster_set,
                        [t.name for t in result.tags],
                    )
                )
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=serve, args=(c,)) for c in ("red", "blue", "red", "blue")]
    for thread in threads:
        thread.start()
    try:
        windows = []
        built = [first]
        for k in (3, 4, 2):
            started = time.monotonic()
            built.append(rebuild_clusters(k=k, algorithm="kmeans", seed=k))
            windows.append((started, time.monotonic()))
        # Answers to questions asked after the last rebuild (waited for, not slept for: on a
        # busy machine a thread may not run for a while, and one asked before the last set was
        # activated may still be answered by the set before).
        deadline = time.monotonic() + 60
        while not any(a[0] > windows[-1][1] for a in answers) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)

    assert not errors, errors
    assert answers
    built_ids = {cluster_set.pk for cluster_set in built}
    for _asked, _answered, color, set_id, tags in answers:
        assert set_id in built_ids  # never a building or failed set
        assert tags and tags[0] == color  # always a complete answer
    during = [a for a in answers if any(start <= a[1] <= end for start, end in windows)]
    assert len(during) >= 20, f"only {len(during)} answers overlapped the rebuilds"
    asked_after = [a[3] for a in answers if a[0] > windows[-1][1]]
    assert asked_after and set(asked_after) == {built[-1].pk}
    assert ClusterSet.objects.get(status=ClusterSetStatus.ACTIVE) == built[-1]
    assert ClusterSet.objects.filter(status=ClusterSetStatus.RETIRED).count() == 3
    # One line of the JSON a client gets, for the record.
    assert json.loads(json.dumps(suggest(queries["red"]).as_dict()))["tags"][0]["name"] == "red"
