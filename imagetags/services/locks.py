"""Only one cluster rebuild at a time, on PostgreSQL and on SQLite.

Two rebuilds running side by side would both cluster the whole library and then activate one
after the other: double the work, and a set that is replaced as soon as it goes live. So
:func:`rebuild_lock` lets one caller in and refuses every other with :class:`RebuildInProgress`,
a message saying which rebuild is running and how far it has got.

- **PostgreSQL**: a session-level advisory lock (``pg_try_advisory_lock``) held on a connection
  of its own for as long as the rebuild runs. The server releases it when that connection goes
  away, so a killed worker never leaves a stale lock behind. (Session locks need a direct
  connection or session pooling: behind a transaction-pooling PgBouncer they do not hold.)
- **Other databases (SQLite)**: a :class:`~imagetags.models.RebuildLock` row whose primary key
  makes taking it atomic. A killed rebuild leaves its row; the next caller takes it over when the
  owner is provably gone: a process on this host that no longer runs, or — for an owner on
  another host — no sign of life (the building set's ``heartbeat``) for
  :data:`REMOTE_OWNER_STALE_AFTER`.

The admin's button queues at most one rebuild: :func:`reserve_queued_rebuild` takes the one
queued place (a ``RebuildLock`` row of its own name, on every database and broker) or says what is
already queued or running; the task gives the place back when it ends.

Whoever holds the lock knows that any set still ``building`` was abandoned by a rebuild that
died: :func:`cleanup_abandoned_sets` marks it failed and deletes its partial rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

from django.db import DEFAULT_DB_ALIAS, IntegrityError, connections, transaction
from django.utils import timezone

from imagetags.models import (
    Cluster,
    ClusterMembership,
    ClusterSet,
    ClusterSetStatus,
    RebuildLock,
    TagFrequency,
)
from imagetags.services.errors import ClusteringError

logger = logging.getLogger(__name__)

LOCK_NAME = "rebuild_clusters"
# One 64-bit advisory lock key for "imagetags: rebuild_clusters" (stable across processes and
# versions; advisory keys are global to a PostgreSQL database, so it is derived from a name).
ADVISORY_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"imagetags:rebuild_clusters").digest()[:8], "big", signed=True
)
# An owner on another host is presumed dead after this long without a heartbeat. Generous: the
# k-means fit itself reports no progress, and taking over a live rebuild is worse than waiting.
REMOTE_OWNER_STALE_AFTER = timedelta(hours=1)

ABANDONED_ERROR = (
    "Abandoned: the rebuild stopped before it finished (its process was killed or crashed). "
    "Its partial rows were deleted by the next rebuild; the previously active set stayed active."
)


class RebuildInProgress(ClusteringError):
    """Another rebuild holds the lock. The message says which one and how far it has got."""


@dataclass
class RebuildLease:
    """The lock as held by one rebuild."""

    backend: str  # "advisory" or "row"
    owner: str
    using: str = DEFAULT_DB_ALIAS

    def attach(self, cluster_set: ClusterSet) -> None:
        """Record the set being built, so that a refused caller can be told about it."""
        if self.backend == "row":
            RebuildLock.objects.using(self.using).filter(name=LOCK_NAME, owner=self.owner).update(
                cluster_set=cluster_set
            )


def _new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def rebuild_lock(using: str = DEFAULT_DB_ALIAS) -> Iterator[RebuildLease]:
    """Hold the one rebuild lock for the duration of the block, or raise :class:`RebuildInProgress`.

    Not re-entrant: a second rebuild in the same process (another thread) is refused too.
    """
    if connections[using].vendor == "postgresql":
        with _advisory_lock(using) as lease:
            yield lease
    else:
        with _row_lock(using) as lease:
            yield lease


# --- PostgreSQL ------------------------------------------------------------------------------


@contextlib.contextmanager
def _advisory_lock(using: str) -> Iterator[RebuildLease]:
    # A connection of its own: the lock must not depend on the transaction state of the
    # connection doing the work (a test's wrapping transaction, an aborted statement), and
    # unlocking must always be possible.
    lock_connection = connections[using].copy()
    try:
        with lock_connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s)", [ADVISORY_LOCK_KEY])
            (acquired,) = cursor.fetchone()
        if not acquired:
            raise RebuildInProgress(_in_progress_message(using, holder=_advisory_holder(using)))
        try:
            yield RebuildLease(backend="advisory", owner=_new_owner(), using=using)
        finally:
            try:
                with lock_connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s)", [ADVISORY_LOCK_KEY])
            except Exception:  # closing the connection below releases it all the same
                logger.exception("Could not release the rebuild advisory lock explicitly")
    finally:
        lock_connection.close()


def _advisory_holder(using: str) -> str:
    """Who holds the advisory lock, from pg_locks (best effort, for the message)."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            """
            SELECT a.pid, a.client_addr, a.application_name, a.backend_start
            FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.locktype = 'advisory' AND l.granted AND l.database = (
                SELECT oid FROM pg_database WHERE datname = current_database()
            ) AND ((l.classid::bigint << 32) | l.objid::bigint) = %s
            """,
            [ADVISORY_LOCK_KEY],
        )
        row = cursor.fetchone()
    if row is None:
        return ""
    pid, client, application, _started = row
    where = f" from {client}" if client else ""
    return f"PostgreSQL backend {pid}{where}" + (f" ({application})" if application else "")


# --- other databases (SQLite) ----------------------------------------------------------------


@contextlib.contextmanager
def _row_lock(using: str) -> Iterator[RebuildLease]:
    owner = _new_owner()
    _acquire_row(owner, using)
    try:
        yield RebuildLease(backend="row", owner=owner, using=using)
    finally:
        RebuildLock.objects.using(using).filter(name=LOCK_NAME, owner=owner).delete()


def _acquire_row(owner: str, using: str) -> None:
    locks = RebuildLock.objects.using(using)
    for _attempt in range(3):
        try:
            with transaction.atomic(using=using):
                locks.create(name=LOCK_NAME, owner=owner)
            return
        except IntegrityError:
            pass
        current = locks.select_related("cluster_set").filter(name=LOCK_NAME).first()
        if current is None:
            continue  # released in between: try again
        reason = stale_reason(current)
        if reason is None:
            raise RebuildInProgress(_in_progress_message(using, holder=current.owner, lock=current))
        # Compare-and-swap on the old owner: of two callers taking over at once, one wins.
        taken = locks.filter(name=LOCK_NAME, owner=current.owner).update(
            owner=owner, acquired=timezone.now(), cluster_set=None
        )
        if taken:
            logger.warning("Took over the rebuild lock from %s: %s", current.owner, reason)
            return
    raise RebuildInProgress(
        _in_progress_message(using, holder=locks.filter(name=LOCK_NAME).first())
    )


def stale_reason(lock: RebuildLock) -> str | None:
    """Why ``lock``'s owner is known to be gone, or None while it may still be working."""
    host, _sep, rest = lock.owner.partition(":")
    pid_text = rest.split(":", 1)[0]
    if host == socket.gethostname() and pid_text.isdigit():
        pid = int(pid_text)
        if pid == os.getpid():
            return None  # this very process (another thread) is rebuilding
        if not _process_alive(pid):
            return f"its process {pid} on this host is no longer running"
        return None
    last_sign = lock.acquired
    if lock.cluster_set is not None and lock.cluster_set.heartbeat:
        last_sign = max(last_sign, lock.cluster_set.heartbeat)
    if timezone.now() - last_sign > REMOTE_OWNER_STALE_AFTER:
        return f"no heartbeat from {host} since {last_sign:%Y-%m-%d %H:%M:%S %Z}"
    return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    # A killed child that its parent has not reaped yet is a zombie: dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


# --- messages and clean-up -------------------------------------------------------------------


def _in_progress_message(using: str, holder: object = "", lock: RebuildLock | None = None) -> str:
    building = lock.cluster_set if lock is not None and lock.cluster_set is not None else None
    if building is None:
        building = (
            ClusterSet.objects.using(using)
            .filter(status=ClusterSetStatus.BUILDING)
            .order_by("-created", "-pk")
            .first()
        )
    details = []
    if building is not None:
        details.append(f"cluster set {building.pk}, started {building.created:%H:%M:%S %Z}")
        if building.progress_message:
            details.append(f"{building.progress:.0%}: {building.progress_message}")
        if building.heartbeat:
            seconds = (timezone.now() - building.heartbeat).total_seconds()
            details.append(f"last heartbeat {seconds:.0f} s ago")
    if holder:
        details.append(f"held by {getattr(holder, 'owner', holder)}")
    described = f" ({'; '.join(details)})" if details else ""
    return (
        f"Another rebuild of the clusters is already running{described}. "
        "Wait for it to finish: its cluster set becomes active by itself. "
        "No second rebuild was started."
    )


def cleanup_abandoned_sets(using: str = DEFAULT_DB_ALIAS) -> list[int]:
    """Mark sets left ``building`` by a dead rebuild as failed and delete their partial rows.

    Call only while holding :func:`rebuild_lock`: then no live rebuild can own a building set.
    Failed sets keep their row (with the error) but lose their clusters, members and tag
    frequencies, which nothing reads. Returns the ids of the sets that were abandoned.
    """
    sets = ClusterSet.objects.using(using)
    abandoned = list(sets.filter(status=ClusterSetStatus.BUILDING).values_list("pk", flat=True))
    if abandoned:
        sets.filter(pk__in=abandoned, status=ClusterSetStatus.BUILDING).update(
            status=ClusterSetStatus.FAILED, error=ABANDONED_ERROR
        )
        logger.warning("Cluster sets %s were abandoned half-built; cleaning them up", abandoned)
    leftovers = list(
        Cluster.objects.using(using)
        .filter(cluster_set__status=ClusterSetStatus.FAILED)
        .values_list("cluster_set_id", flat=True)
        .distinct()
    )
    for set_id in leftovers:
        with transaction.atomic(using=using):
            ClusterMembership.objects.using(using).filter(cluster_set_id=set_id).delete()
            TagFrequency.objects.using(using).filter(cluster__cluster_set_id=set_id).delete()
            Cluster.objects.using(using).filter(cluster_set_id=set_id).delete()
    return abandoned


# --- at most one queued rebuild --------------------------------------------------------------

QUEUED_NAME = "rebuild_queued"
# A queued rebuild that no worker has finished after this long (no worker running, or a task
# lost with its broker) no longer holds the place: the next request takes it over.
QUEUED_EXPIRES_AFTER = timedelta(hours=1)


def reserve_queued_rebuild(using: str = DEFAULT_DB_ALIAS) -> str:
    """Take the one place for a queued rebuild; returns the token the task releases it with.

    Raises :class:`RebuildInProgress` saying which when a rebuild is already queued, holds the
    rebuild lock, or is building a set that still shows signs of life. The place is a
    :class:`~imagetags.models.RebuildLock` row under its own name, so that of two requests at
    the same moment exactly one inserts it (its primary key), whatever the broker; the task
    deletes it when it ends (:func:`release_queued_rebuild`).
    """
    running = _running_rebuild(using)
    if running:
        raise RebuildInProgress(
            f"A rebuild is already running ({running}); no second one was queued. "
            "Its cluster set becomes active by itself when it is done."
        )
    token = uuid.uuid4().hex
    locks = RebuildLock.objects.using(using)
    current = None
    for _attempt in range(3):
        try:
            with transaction.atomic(using=using):
                locks.create(name=QUEUED_NAME, owner=token)
            return token
        except IntegrityError:
            pass
        current = locks.filter(name=QUEUED_NAME).first()
        if current is None:
            continue  # the queued task ended in between: try again
        if timezone.now() - current.acquired <= QUEUED_EXPIRES_AFTER:
            break
        # Compare-and-swap on the old owner: of two requests taking over at once, one wins.
        if locks.filter(name=QUEUED_NAME, owner=current.owner).update(
            owner=token, acquired=timezone.now()
        ):
            logger.warning("The rebuild queued at %s never ran; queued a new one", current.acquired)
            return token
    since = f" (since {current.acquired:%Y-%m-%d %H:%M:%S %Z})" if current is not None else ""
    raise RebuildInProgress(
        f"A rebuild is already queued{since}; no second one was queued. "
        "A django-q2 worker (manage.py qcluster) runs it."
    )


def release_queued_rebuild(token: str, using: str = DEFAULT_DB_ALIAS) -> None:
    """Give the queued place back (the task calls this when it ends, however it ends)."""
    RebuildLock.objects.using(using).filter(name=QUEUED_NAME, owner=token).delete()


def queued_rebuild(using: str = DEFAULT_DB_ALIAS) -> RebuildLock | None:
    """The queued rebuild's row while it holds the place, else None."""
    current = RebuildLock.objects.using(using).filter(name=QUEUED_NAME).first()
    if current is None or timezone.now() - current.acquired > QUEUED_EXPIRES_AFTER:
        return None
    return current


def _running_rebuild(using: str) -> str:
    """What says a rebuild is running now ("" if nothing does): a building set with a recent
    sign of life, or a live holder of the rebuild lock (still reading vectors, say)."""
    now = timezone.now()
    for cluster_set in ClusterSet.objects.using(using).filter(status=ClusterSetStatus.BUILDING):
        if now - (cluster_set.heartbeat or cluster_set.created) < REMOTE_OWNER_STALE_AFTER:
            detail = f"cluster set {cluster_set.pk}, started {cluster_set.created:%H:%M:%S %Z}"
            if cluster_set.progress_message:
                detail += f"; {cluster_set.progress:.0%}: {cluster_set.progress_message}"
            return detail
    if connections[using].vendor == "postgresql":
        holder = _advisory_holder(using)
        return f"the rebuild lock is held by {holder}" if holder else ""
    lock = RebuildLock.objects.using(using).select_related("cluster_set").filter(name=LOCK_NAME)
    current = lock.first()
    if current is not None and stale_reason(current) is None:
        return f"the rebuild lock is held by {current.owner}"
    return ""
