"""End to end through a real django-q2 worker: save images, a ``qcluster`` process embeds them.

The test database is a file (tests/settings.py), and the worker subprocess is pointed at it and at
this test's media folder through environment variables, so both processes see the same rows and
files. ``transactional_db`` commits for real, so the worker can read what the test wrote.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from django.db import connection

from imagetags.models import FeatureStatus, Post, StockImage
from imagetags.services import vectors
from imagetags.services.extractors import get_extractor
from tests.conftest import PROJECT_ROOT

pytestmark = [pytest.mark.worker, pytest.mark.slow]

# Generous: the worker imports TensorFlow and builds the model before its first task.
READY_TIMEOUT = 120
STOP_TIMEOUT = 20


def _start_worker(db_path: str, media_root: Path, log_path: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "IMAGETAGS_TEST_DB": db_path,
        "IMAGETAGS_TEST_MEDIA": str(media_root),
        # The worker must really be asynchronous (see tests/settings.py).
        "IMAGETAGS_TEST_SYNC": "0",
    }
    log = log_path.open("wb")
    try:
        return subprocess.Popen(
            [sys.executable, "manage.py", "qcluster", "--settings=tests.settings"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own process group, so that a worker that ignores SIGTERM can be killed together
            # with the pool processes it forked.
            start_new_session=True,
        )
    finally:
        log.close()  # the child has its own copy of the descriptor


def _tail(log_path: Path, chars: int = 3000) -> str:
    return log_path.read_text(errors="replace")[-chars:]


def _stop_worker(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # qcluster stops its pool and exits on SIGTERM
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT)


def test_qcluster_worker_embeds_saved_images(
    transactional_db, settings, media_root, make_upload, monkeypatch, tmp_path
):
    from django_q.conf import Conf
    from django_q.models import OrmQ, Task

    # django-q2 read Q_CLUSTER (sync=True) at import; patch it so async_task really queues.
    monkeypatch.setattr(Conf, "SYNC", False)
    db_path = settings.DATABASES["default"]["NAME"]
    assert os.path.isfile(db_path), "the worker needs a file database to share"
    log_path = tmp_path / "qcluster.log"

    post = Post.objects.create(title="worker")
    ids = [
        StockImage.objects.create(
            post=post, image=make_upload(f"w{i}.jpg", pattern="noise", seed=i)
        ).pk
        for i in range(3)
    ]
    # Committed and queued in the ORM broker, not computed in this process.
    assert OrmQ.objects.count() == 3
    assert StockImage.objects.filter(feature_status=FeatureStatus.PENDING).count() == 3

    worker = _start_worker(db_path, media_root, log_path)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            done = StockImage.objects.filter(pk__in=ids).exclude(
                feature_status=FeatureStatus.PENDING
            )
            if done.count() == len(ids):
                break
            assert worker.poll() is None, f"qcluster exited early:\n{_tail(log_path)}"
            # A task that raised would only be retried until the timeout: fail now, with its error.
            failed = Task.objects.filter(success=False).first()
            assert failed is None, f"task {failed.name} failed: {failed.result}\n{_tail(log_path)}"
            time.sleep(0.5)
        else:
            pytest.fail(f"images not processed in {READY_TIMEOUT} s:\n{_tail(log_path)}")

        key = get_extractor().key
        images = list(StockImage.objects.filter(pk__in=ids).order_by("pk"))
        assert [image.feature_status for image in images] == [FeatureStatus.READY] * 3, [
            image.feature_error for image in images
        ]
        matrix = np.stack([vectors.from_bytes(image.vector) for image in images])
        assert matrix.shape == (3, get_extractor().dim)
        np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
        assert {image.extractor_key for image in images} == {key}
        assert {image.feature_attempts for image in images} == {1}
        # Different pictures, different vectors: the worker did not store one thing three times.
        assert not np.allclose(matrix[0], matrix[1])
    finally:
        _stop_worker(worker)
    assert worker.returncode is not None


@pytest.mark.skipif(
    connection.vendor != "sqlite", reason="SQLite's lock upgrade; PostgreSQL locks rows instead"
)
def test_feature_write_waits_for_another_writer_instead_of_failing(
    transactional_db, make_post, monkeypatch
):
    """The cause of the flaky worker test: storing a vector while another process writes.

    compute_features stores a batch in ``transaction.atomic()``: it reads the rows, then writes.
    Under SQLite's default deferred ``BEGIN`` the read takes a shared lock, and upgrading it to a
    write lock while another connection holds one (a qcluster monitor saving the previous task's
    result) fails at once with "database is locked": SQLite does not wait there (the busy
    timeout would deadlock), whatever ``timeout`` says. tests/settings.py begins every atomic
    block with ``BEGIN IMMEDIATE``, so the write lock is taken, and waited for, up front.
    """
    from imagetags.services import features

    image = make_post(tags=["x"], pattern="noise").images.get()
    other = sqlite3.connect(
        connection.settings_dict["NAME"], isolation_level=None, check_same_thread=False
    )
    times: dict[str, float] = {}

    def release() -> None:
        times["released"] = time.monotonic()
        other.execute("COMMIT")

    original = features._process_batch

    def while_another_process_writes(*args, **kwargs):
        other.execute("BEGIN IMMEDIATE")  # the other writer holds the write lock...
        timer = threading.Timer(1.0, release)  # ...and commits a moment later
        timer.start()
        try:
            return original(*args, **kwargs)
        finally:
            timer.join()
            times["stored"] = time.monotonic()

    monkeypatch.setattr(features, "_process_batch", while_another_process_writes)
    try:
        summary = features.compute_features([image.pk], force=True)
    finally:
        other.close()
    assert summary.ready == 1 and summary.errors == []
    # It waited for the other writer rather than failing, and then stored the vector.
    assert times["stored"] > times["released"]
    image.refresh_from_db()
    assert image.feature_status == FeatureStatus.READY and image.feature_attempts == 2


# The check reads settings only; the open connections are left alone, as Django warns.
@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
@pytest.mark.parametrize(
    ("options", "warned"),
    [
        ({"timeout": 30}, True),
        ({"timeout": 30, "transaction_mode": "DEFERRED"}, True),
        ({"timeout": 30, "transaction_mode": "IMMEDIATE"}, False),
        ({"transaction_mode": "EXCLUSIVE"}, False),
    ],
)
def test_sqlite_without_immediate_transactions_is_warned_about(settings, options, warned):
    """A site on SQLite hits the same "database is locked" as the test worker did: say so."""
    from imagetags.checks import check_sqlite_transactions

    settings.DATABASES = {"default": {**settings.DATABASES["default"], "OPTIONS": options}}
    found = check_sqlite_transactions()
    assert [w.id for w in found] == (["imagetags.W003"] if warned else [])
    if warned:
        assert "'database is locked'" in found[0].msg and "IMMEDIATE" in found[0].hint
    # PostgreSQL waits for row locks: nothing to say there.
    settings.DATABASES = {
        "default": {"ENGINE": "django.db.backends.postgresql", "NAME": "x", "OPTIONS": options}
    }
    assert check_sqlite_transactions() == []
