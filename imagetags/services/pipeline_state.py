"""Process-local switches of the feature pipeline, set by bulk work and read by the signal handlers.

It lives at the bottom of the services so that a service (``library.import_manifest``, which
embeds a whole import itself) can switch the per-image feature tasks off without importing the
pipeline layer (``signal_handlers``) above it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_suspended: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "imagetags_feature_tasks_suspended", default=False
)


@contextlib.contextmanager
def feature_tasks_suspended() -> Iterator[None]:
    """Do not enqueue feature tasks inside this block (bulk work that computes features itself)."""
    token = _suspended.set(True)
    try:
        yield
    finally:
        _suspended.reset(token)


def feature_tasks_are_suspended() -> bool:
    """Whether the current context is inside :func:`feature_tasks_suspended`."""
    return _suspended.get()
