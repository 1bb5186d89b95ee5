"""Rebuilds asked for from the admin: queue one, and say what is queued, running or finished.

The ClusterSet change list has a "Rebuild" button and a panel that refreshes itself while a
rebuild waits in django-q2's queue or runs. This module is what that page reads: the queue
(django-q2's ``Task`` rows), the one place a queued rebuild holds (``services.locks``) and the
sets being built. The admin only renders what it returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.utils import timezone
from django_q.models import Task
from django_q.tasks import async_task

from imagetags.models import ClusterSet, ClusterSetStatus
from imagetags.services.errors import ClusteringError
from imagetags.services.locks import (
    queued_rebuild,
    release_queued_rebuild,
    reserve_queued_rebuild,
)

__all__ = [
    "REBUILD_GROUP",
    "REBUILD_SILENT_AFTER",
    "REBUILD_TASK",
    "REFRESH_SECONDS",
    "RebuildStatus",
    "queue_rebuild",
    "rebuild_status",
]

REBUILD_TASK = "imagetags.tasks.rebuild_clusters"
REBUILD_GROUP = "imagetags-rebuild"
# The change list refreshes itself while a rebuild runs; a building set silent for longer than
# this is presumed dead (its worker was killed) and no longer keeps the page refreshing.
REBUILD_SILENT_AFTER = timedelta(hours=1)
REFRESH_SECONDS = 3


def queue_rebuild() -> dict[str, Any]:
    """Queue a rebuild with the site's default settings; one queued or running at most.

    Returns the record of the queued task (``{"id": task id, "at": timestamp}``, JSON-ready) that
    the caller keeps, for instance in the session, and hands back to :func:`rebuild_status`.
    Raises :class:`~imagetags.services.locks.RebuildInProgress` when a rebuild is queued or runs
    already (nothing is queued), and, only with django-q2's ``sync`` option (development, tests),
    the task's own :class:`~imagetags.services.errors.ClusteringError` ("no vectors yet"): the
    task then ran here and its refusal comes back as an exception instead of a result.
    """
    token = reserve_queued_rebuild()
    try:
        task_id = async_task(
            REBUILD_TASK, queued_as=token, task_name="imagetags-rebuild", group=REBUILD_GROUP
        )
    except ClusteringError:
        raise  # the task ran (sync) and gave its place back itself
    except BaseException:
        release_queued_rebuild(token)  # nothing was queued (the broker is down, say)
        raise
    return {"id": task_id, "at": timezone.now().timestamp()}


@dataclass(frozen=True)
class RebuildStatus:
    """What the ClusterSet change list says about rebuilds."""

    #: Every set being built, with whether it still shows signs of life.
    building: list[tuple[ClusterSet, bool]]
    #: A rebuild waits in the queue or runs (queued by anyone, or the caller's own).
    pending: bool
    #: django-q2's record of the latest finished rebuild task, if any.
    last_task: Task | None

    @property
    def refresh_seconds(self) -> int | None:
        """How often the page reloads itself; None when nothing is under way."""
        if self.pending or any(alive for _set, alive in self.building):
            return REFRESH_SECONDS
        return None


def rebuild_status(queued: Mapping[str, Any] | None = None) -> RebuildStatus:
    """The rebuilds now; ``queued`` is the record :func:`queue_rebuild` returned to this caller."""
    now = timezone.now()
    building = []
    for cluster_set in ClusterSet.objects.filter(status=ClusterSetStatus.BUILDING):
        last_sign = cluster_set.heartbeat or cluster_set.created
        building.append((cluster_set, now - last_sign < REBUILD_SILENT_AFTER))
    pending = False
    if queued:
        # Still pending while django-q2 has no result for it (queued or running).
        pending = not Task.objects.filter(id=queued["id"]).exists() and (
            now.timestamp() - queued["at"] < REBUILD_SILENT_AFTER.total_seconds()
        )
    # Queued by anyone (the one place a queued rebuild holds): every admin's page refreshes.
    pending = pending or queued_rebuild() is not None
    last_task = Task.objects.filter(group=REBUILD_GROUP).order_by("-stopped").first()
    return RebuildStatus(building=building, pending=pending, last_task=last_task)
