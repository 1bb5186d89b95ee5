"""Real Django processes for tests: ``qcluster`` workers and one-off scripts on the test database.

A child process is pointed at the test's database (``IMAGETAGS_TEST_DB``: the SQLite file, or the
PostgreSQL test database's name) and media folder through environment variables, runs in its own
process group (so a kill reaches the pool it forks) and writes to a log file whose tail is shown
when a test fails. Tests that use these need ``transactional_db``: a child sees only committed rows.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PROJECT_ROOT

# Generous: a worker imports TensorFlow and builds the model before its first task, and CI
# shares two cores between this and everything else.
READY_TIMEOUT = 180
STOP_TIMEOUT = 20

REDIS_URL = os.environ.get("IMAGETAGS_TEST_REDIS", "")
DATABASE_URL = os.environ.get("IMAGETAGS_TEST_DATABASE_URL", "")

requires_production_stack = pytest.mark.skipif(
    not (REDIS_URL and DATABASE_URL),
    reason="needs PostgreSQL and Redis: set IMAGETAGS_TEST_DATABASE_URL and IMAGETAGS_TEST_REDIS "
    "(.ci/run starts both and sets them for its second run)",
)

QCLUSTER = "from django.core.management import call_command\ncall_command('qcluster')\n"


class DjangoProcess:
    def __init__(self, popen: subprocess.Popen, log_path: Path, label: str) -> None:
        self.popen = popen
        self.log_path = log_path
        self.label = label

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return f"--- {self.label} (pid {self.pid}, {self._state()}) ---\n{text[-chars:]}"

    def _state(self) -> str:
        """How the process is doing, for a failure message: exit code, or state and wait channel."""
        code = self.popen.poll()
        if code is not None:
            return f"exited with {code}"
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            state = next(line for line in status.splitlines() if line.startswith("State:"))
            wchan = Path(f"/proc/{self.pid}/wchan").read_text().strip()
        except (OSError, StopIteration):
            return "running"
        return f"{state.split(':', 1)[1].strip()}, waiting in {wchan or '-'}"

    def kill(self) -> None:
        """SIGKILL the whole process group (the process and any pool it forked), then reap it."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=STOP_TIMEOUT)
        self._reap_group()

    def stop(self) -> None:
        """SIGTERM (qcluster stops its pool and exits), SIGKILL if it does not within a while."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=STOP_TIMEOUT)
        self.kill()

    def _reap_group(self) -> None:
        # Children of a killed leader are re-parented; make sure none of the group is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


class DjangoProcesses:
    """Starts Django child processes for one test and stops every one of them afterwards."""

    def __init__(self, settings: Any, media_root: Path, tmp_path: Path) -> None:
        self.settings = settings
        self.media_root = media_root
        self.tmp_path = tmp_path
        self.started: list[DjangoProcess] = []
        self.queue_env: dict[str, str] = {}

    def env(self, **extra: str | None) -> dict[str, str]:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "IMAGETAGS_TEST_DB": str(self.settings.DATABASES["default"]["NAME"]),
            "IMAGETAGS_TEST_MEDIA": str(self.media_root),
            # A real worker must be asynchronous (see tests/settings.py).
            "IMAGETAGS_TEST_SYNC": "0",
            "PYTHONUNBUFFERED": "1",
            **self.queue_env,
        }
        for key, value in extra.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def start(self, code: str, *, label: str = "django", **env: str | None) -> DjangoProcess:
        """Run ``code`` after ``django.setup()`` in a new Python process."""
        script = "import django\ndjango.setup()\n" + textwrap.dedent(code)
        log_path = self.tmp_path / f"{label}-{len(self.started)}.log"
        log = log_path.open("wb")
        try:
            popen = subprocess.Popen(
                [sys.executable, "-c", script],
                cwd=PROJECT_ROOT,
                env=self.env(**env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()  # the child has its own copy
        process = DjangoProcess(popen, log_path, label)
        self.started.append(process)
        return process

    def qcluster(self, *, preamble: str = "", label: str = "qcluster", **env: str | None):
        """A ``manage.py qcluster`` worker; ``preamble`` runs first (fault injection)."""
        return self.start(textwrap.dedent(preamble) + QCLUSTER, label=label, **env)

    def logs(self) -> str:
        return "\n".join(process.tail() for process in self.started)

    def stop_all(self) -> None:
        for process in self.started:
            process.stop()


def isolated_queue(monkeypatch: pytest.MonkeyPatch, processes: DjangoProcesses, broker: str) -> str:
    """Make ``async_task`` really enqueue, on a queue of this test's own, with ``broker``.

    ``broker`` is "orm" (the database) or "redis" (``IMAGETAGS_TEST_REDIS``). django-q2 read
    Q_CLUSTER at import, so its ``Conf`` is patched here and the workers get the same settings
    through their environment.
    """
    from django_q.conf import Conf

    name = f"imagetags-test-{uuid.uuid4().hex[:10]}"
    monkeypatch.setattr(Conf, "SYNC", False)
    monkeypatch.setattr(Conf, "PREFIX", name)
    monkeypatch.setattr(Conf, "CLUSTER_NAME", name)
    processes.queue_env["IMAGETAGS_TEST_Q_NAME"] = name
    if broker == "orm":
        monkeypatch.setattr(Conf, "ORM", "default")
        processes.queue_env.pop("IMAGETAGS_TEST_REDIS", None)
        # env() starts from os.environ: say explicitly that the workers use the ORM broker.
        processes.queue_env["IMAGETAGS_TEST_REDIS"] = ""
    elif broker == "redis":
        assert REDIS_URL, "IMAGETAGS_TEST_REDIS is not set"
        monkeypatch.setattr(Conf, "ORM", None)
        monkeypatch.setattr(Conf, "REDIS", REDIS_URL)
        processes.queue_env["IMAGETAGS_TEST_REDIS"] = REDIS_URL
    else:
        raise ValueError(broker)
    return name


def wait_for(
    condition: Callable[[], bool],
    *,
    timeout: float,
    processes: DjangoProcesses,
    what: str,
    interval: float = 0.3,
    explain: Callable[[], str] | None = None,
) -> None:
    """Poll ``condition`` until true; fail with the children's logs on timeout or early death.

    ``explain()`` adds what else the failure message should say (e.g. the state of a queue).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        dead = [p for p in processes.started if p.popen.poll() not in (None, -9)]
        if dead:
            pytest.fail(
                f"{dead[0].label} exited early while waiting for {what}:\n{processes.logs()}"
            )
        time.sleep(interval)
    extra = f"\n{explain()}" if explain else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:{extra}\n{processes.logs()}")


def redis_queue_state(queue: str) -> str:
    """Length of a django-q2 Redis queue and the clients connected, for failure messages."""
    import redis

    client = redis.from_url(REDIS_URL)
    key = f"django_q:{queue}:q"
    clients = "\n".join(
        f"  {c.get('addr')} cmd={c.get('cmd')} age={c.get('age')} idle={c.get('idle')}"
        for c in client.client_list()
    )
    return f"redis {key}: {client.llen(key)} task(s) waiting; clients:\n{clients}"


def log_contains(process: DjangoProcess, text: str) -> bool:
    try:
        return text in process.log_path.read_text(errors="replace")
    except FileNotFoundError:
        return False
