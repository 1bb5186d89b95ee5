"""The system checks of ``IMAGETAGS["SEARCH"]`` (imagetags.checks), the migration of
``imagetags.contrib.pgvector``, and the suite's own ``IMAGETAGS_TEST_SEARCH``.

The checks find the search database in ``django.db.connections``; each test adds an alias of its
own there (``vectors``): an in-memory SQLite, or databases on the
session's embedded PostgreSQL 18 (``pgvector_url``) with and without the extension.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.core.management.base import CommandError
from django.db import connections
from django.db.utils import ConnectionHandler
from django.test import override_settings

from imagetags.checks import PGVECTOR_APP, check_pgvector_extension, check_search_backend
from imagetags.contrib.pgvector.extension import VectorExtensionUnavailable, extension_installed
from tests.conftest import PROJECT_ROOT
from tests.pgvector_server import free_port

PGVECTOR = {"BACKEND": "pgvector", "OPTIONS": {"DATABASE": "vectors"}}
SQLITE = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}
CONTRIB_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "imagetags",
    "imagetags.contrib.pgvector",
]
MIGRATION = ("imagetags_pgvector", "0001_vector_extension")


def search(config: dict) -> override_settings:
    return override_settings(IMAGETAGS={"SEARCH": config})


def ids(messages: list) -> list[str]:
    return [message.id for message in messages]


@pytest.fixture
def use_databases(django_db_blocker) -> Iterator[Callable[..., None]]:
    """``use_databases(vectors={...})``: aliases added to ``django.db.connections`` for one test
    (the checks, transactions and migrations all look them up there), closed and removed after."""
    added: list[str] = []

    def install(**databases: dict) -> None:
        # A handler of its own fills in the defaults Django expects of a configured alias.
        filled = ConnectionHandler({"default": SQLITE, **databases}).settings
        for alias in databases:
            assert alias not in connections.settings, alias
            connections.settings[alias] = filled[alias]
            added.append(alias)

    with django_db_blocker.unblock():
        yield install
        for alias in added:
            if hasattr(connections._connections, alias):
                connections[alias].close()
                delattr(connections._connections, alias)
            del connections.settings[alias]


def pg_config(url: str, *, database: str, user: str, password: str) -> dict:
    parts = urlsplit(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": database,
        "USER": user,
        "PASSWORD": password,
        "HOST": parts.hostname,
        "PORT": str(parts.port),
    }


@pytest.fixture(scope="module")
def pg(pgvector_url: str) -> Iterator[Callable[..., dict]]:
    """``pg(database, superuser=False)``: a connection config for a database on the embedded
    server, made on first use: ``with_vector`` (from template1, which has the extension) or any
    other name (from template0: no extension), owned by a role that is no superuser."""
    import psycopg

    suffix = secrets.token_hex(4)
    role, password = f"imagetags_checks_{suffix}", secrets.token_hex(8)
    admin = psycopg.connect(pgvector_url, autocommit=True)
    admin.execute(f"CREATE ROLE {role} LOGIN NOSUPERUSER PASSWORD '{password}'")
    created: dict[str, str] = {}
    superuser = urlsplit(pgvector_url)

    def make(database: str, *, superuser_role: bool = False) -> dict:
        if database not in created:
            created[database] = f"{database}_{suffix}"
            template = "template1" if database == "with_vector" else "template0"
            admin.execute(f"CREATE DATABASE {created[database]} OWNER {role} TEMPLATE {template}")
        if superuser_role:
            return pg_config(
                pgvector_url,
                database=created[database],
                user=superuser.username,
                password=superuser.password,
            )
        return pg_config(pgvector_url, database=created[database], user=role, password=password)

    yield make
    for name in created.values():
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.execute(f"DROP ROLE {role}")
    admin.close()


def migrate_contrib(connection) -> None:
    """Apply the contrib app's migration to ``connection`` as ``migrate`` would."""
    from django.db.migrations.executor import MigrationExecutor

    MigrationExecutor(connection).migrate([MIGRATION])


# --- configuration checks (no database opened) -----------------------------------------------


def test_no_search_setting_and_exact_need_nothing(use_databases):
    use_databases(vectors=SQLITE)
    with override_settings(IMAGETAGS={}):
        assert check_search_backend() == []
        assert check_pgvector_extension(databases=["vectors"]) == []
    with search({"BACKEND": "exact", "OPTIONS": {}}):
        assert check_search_backend() == []


def test_pgvector_on_sqlite_is_an_error(use_databases):
    use_databases(vectors=SQLITE)
    with search(PGVECTOR):
        found = check_search_backend()
    assert ids(found) == ["imagetags.E004"]
    assert "'vectors' is a sqlite database" in found[0].msg
    assert "PostgreSQL" in found[0].msg


def test_pgvector_on_an_alias_that_does_not_exist_is_an_error(use_databases):
    use_databases(vectors=SQLITE)
    with search({"BACKEND": "pgvector", "OPTIONS": {"DATABASE": "elsewhere"}}):
        found = check_search_backend()
    assert ids(found) == ["imagetags.E004"]
    assert "'elsewhere' is not in DATABASES" in found[0].msg


def test_pgvector_database_defaults_to_default(settings):
    on_postgresql = settings.DATABASES["default"]["ENGINE"].endswith("postgresql")
    with search({"BACKEND": "pgvector"}):
        assert ids(check_search_backend()) == ([] if on_postgresql else ["imagetags.E004"])


def test_pgvector_on_postgresql_with_psycopg_passes(use_databases):
    # The vendor is the backend class's: no server is needed (nor contacted) here.
    use_databases(
        vectors=pg_config("postgresql://u:p@127.0.0.1:1/x", database="x", user="u", password="p")
    )
    with search(PGVECTOR):
        assert check_search_backend() == []


def test_pgvector_without_psycopg_is_an_error(use_databases, monkeypatch):
    use_databases(
        vectors=pg_config("postgresql://u:p@127.0.0.1:1/x", database="x", user="u", password="p")
    )
    connections["vectors"]  # the backend imports psycopg: load it before psycopg "goes missing"
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what find_spec says of a missing package
    with search(PGVECTOR):
        found = check_search_backend()
    assert ids(found) == ["imagetags.E006"]
    assert found[0].hint == "pip install 'django-imagetags[pgvector]'"


def test_usearch_without_the_package_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "usearch", None)
    with search({"BACKEND": "usearch", "OPTIONS": {"PATH": str(tmp_path)}}):
        found = check_search_backend()
    assert ids(found) == ["imagetags.E007"]
    assert "django-imagetags[usearch]" in found[0].hint


@pytest.mark.parametrize("case", ["unset", "missing", "a file"])
def test_usearch_needs_a_writable_directory(tmp_path, case):
    options = {
        "unset": {},
        "missing": {"PATH": str(tmp_path / "nowhere")},
        "a file": {"PATH": str(tmp_path / "index.usearch")},
    }[case]
    (tmp_path / "index.usearch").write_bytes(b"")
    with search({"BACKEND": "usearch", "OPTIONS": options}):
        found = check_search_backend()
    assert ids(found) == ["imagetags.E008"]
    assert "web and worker processes" in found[0].hint


def test_usearch_with_a_writable_directory_passes(tmp_path):
    with search({"BACKEND": "usearch", "OPTIONS": {"PATH": str(tmp_path)}}):
        assert check_search_backend() == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory")
def test_usearch_directory_that_is_not_writable_is_an_error(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with search({"BACKEND": "usearch", "OPTIONS": {"PATH": str(tmp_path)}}):
            found = check_search_backend()
    finally:
        tmp_path.chmod(0o755)
    assert ids(found) == ["imagetags.E008"]
    assert "is not writable" in found[0].msg


# --- the extension check (a database check: it connects) -------------------------------------


def test_the_extension_check_connects_only_when_its_database_is_named(use_databases):
    # Nothing listens on this port: a connection attempt would fail loudly.
    closed = f"postgresql://u:p@127.0.0.1:{free_port()}/x"
    use_databases(vectors=pg_config(closed, database="x", user="u", password="p"))
    from django.db import OperationalError

    with search(PGVECTOR):
        assert check_pgvector_extension(databases=None) == []
        assert check_pgvector_extension(databases=["default"]) == []
        with pytest.raises(OperationalError):
            check_pgvector_extension(databases=["vectors"])


def test_the_extension_check_passes_where_the_extension_is(use_databases, pg):
    use_databases(vectors=pg("with_vector"))
    with search(PGVECTOR):
        assert check_pgvector_extension(databases=["vectors"]) == []


@pytest.fixture
def without_contrib_app(monkeypatch) -> None:
    """A site that does not list imagetags.contrib.pgvector (the pgvector pass of .ci/run
    installs it, and the check is quiet while its migration is pending)."""
    from django.apps import apps

    installed = apps.is_installed
    monkeypatch.setattr(apps, "is_installed", lambda name: name != PGVECTOR_APP and installed(name))


def test_a_database_without_the_extension_is_an_error(use_databases, pg, without_contrib_app):
    use_databases(vectors=pg("checked_without"))
    with search(PGVECTOR):
        found = check_pgvector_extension(databases=["vectors"])
    assert ids(found) == ["imagetags.E005"]
    assert "'vectors' has no 'vector' extension" in found[0].msg
    for words in (
        "CREATE EXTENSION vector;",
        "superuser",
        "'imagetags.contrib.pgvector'",
        "postgresql-NN-pgvector",
        "pgvector/pgvector",
    ):
        assert words in found[0].hint


def test_the_contrib_app_waiting_to_migrate_is_no_error_until_its_migration_ran(use_databases, pg):
    use_databases(vectors=pg("pending_without"))
    with override_settings(INSTALLED_APPS=CONTRIB_APPS), search(PGVECTOR):
        # migrate checks its database before migrating: an error here would stop the very
        # migration that creates the extension.
        assert check_pgvector_extension(databases=["vectors"]) == []
        from django.db.migrations.recorder import MigrationRecorder

        MigrationRecorder(connections["vectors"]).record_applied(*MIGRATION)  # and then dropped
        assert ids(check_pgvector_extension(databases=["vectors"])) == ["imagetags.E005"]


# --- the contrib app's migration -------------------------------------------------------------


def test_the_migration_creates_the_extension_as_a_superuser(use_databases, pg):
    use_databases(vectors=pg("migrated_by_superuser", superuser_role=True))
    connection = connections["vectors"]
    assert not extension_installed(connection)
    with override_settings(INSTALLED_APPS=CONTRIB_APPS):
        migrate_contrib(connection)
    assert extension_installed(connection)


def test_the_migration_needs_no_privilege_when_the_extension_exists(use_databases, pg):
    use_databases(vectors=pg("with_vector"))
    with override_settings(INSTALLED_APPS=CONTRIB_APPS):
        migrate_contrib(connections["vectors"])
    assert extension_installed(connections["vectors"])


def test_the_migration_says_what_a_superuser_must_run(use_databases, pg):
    use_databases(vectors=pg("refused_without"))
    connection = connections["vectors"]
    with (
        override_settings(INSTALLED_APPS=CONTRIB_APPS),
        pytest.raises(VectorExtensionUnavailable) as raised,
    ):
        migrate_contrib(connection)
    message = str(raised.value)
    # A CommandError: migrate prints this sentence and exits 1, no traceback.
    assert isinstance(raised.value, CommandError)
    assert "psql -d refused_without_" in message and "-c 'CREATE EXTENSION vector;'" in message
    assert "as a superuser" in message and "imagetags_checks_" in message
    connection.close()
    assert not extension_installed(connection)


def test_the_migration_does_nothing_on_sqlite(use_databases):
    use_databases(vectors=SQLITE)
    with override_settings(INSTALLED_APPS=CONTRIB_APPS):
        migrate_contrib(connections["vectors"])
        from django.db.migrations.recorder import MigrationRecorder

        assert MIGRATION in MigrationRecorder(connections["vectors"]).applied_migrations()


# --- tests/settings.py: IMAGETAGS_TEST_SEARCH ------------------------------------------------


def load_test_settings(search_env: str | None) -> dict:
    """tests/settings.py's IMAGETAGS and apps, imported afresh under ``IMAGETAGS_TEST_SEARCH``."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("IMAGETAGS_TEST_SEARCH", None)
    env.pop("IMAGETAGS_TEST_SEARCH_PATH", None)
    if search_env is not None:
        env["IMAGETAGS_TEST_SEARCH"] = search_env
    code = (
        "import json, os, tests.settings as s; print(json.dumps({'search': "
        "s.IMAGETAGS.get('SEARCH'), 'contrib': 'imagetags.contrib.pgvector' in s.INSTALLED_APPS}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_suite_runs_with_the_default_search_unless_told():
    assert load_test_settings(None) == {"search": None, "contrib": False}
    assert load_test_settings("exact") == {"search": None, "contrib": False}


def test_the_suite_can_search_with_pgvector_in_its_database():
    assert load_test_settings("pgvector") == {
        "search": {"BACKEND": "pgvector", "OPTIONS": {"DATABASE": "default"}},
        "contrib": True,
    }


def test_the_suite_can_search_with_usearch_in_a_directory_of_its_own():
    found = load_test_settings("usearch")
    assert found["search"]["BACKEND"] == "usearch"
    path = Path(found["search"]["OPTIONS"]["PATH"])
    assert path.name.startswith("imagetags-usearch-")
    assert not path.exists()  # removed when the process that made it exits


def test_an_unknown_search_is_refused():
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "IMAGETAGS_TEST_SEARCH": "faiss"}
    done = subprocess.run(
        [sys.executable, "-c", "import tests.settings"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "IMAGETAGS_TEST_SEARCH must be exact, usearch or pgvector, not 'faiss'" in done.stderr


@pytest.mark.django_db
def test_the_migration_names_the_package_when_the_server_lacks_pgvector():
    from django.db import connection

    from imagetags.contrib.pgvector.extension import (
        create_vector_extension,
        extension_available,
        server_major_version,
    )

    if connection.vendor != "postgresql" or extension_available(connection):
        pytest.skip("needs a PostgreSQL without pgvector: .ci/run's second run (Debian's)")
    with pytest.raises(VectorExtensionUnavailable) as raised, connection.schema_editor() as editor:
        create_vector_extension(None, editor)
    message = str(raised.value)
    assert f"postgresql-{server_major_version(connection)}-pgvector" in message
    assert "pgvector/pgvector image" in message and "has no pgvector extension" in message


def test_a_process_imports_the_configured_engine_while_it_starts_not_in_its_first_request(
    tmp_path,
):
    # A fresh interpreter, as a web process: django.setup() runs the app's ready().
    script = (
        "import sys, django\n"
        "from django.conf import settings\n"
        "settings.configure(INSTALLED_APPS=['django.contrib.contenttypes', 'django.contrib.auth',"
        " 'imagetags'], DATABASES={'default': {'ENGINE': 'django.db.backends.sqlite3',"
        " 'NAME': ':memory:'}}, IMAGETAGS={'SEARCH': {'BACKEND': sys.argv[1], 'OPTIONS':"
        " {'PATH': sys.argv[2]}}})\n"
        "django.setup()\n"
        "print('usearch.index' in sys.modules, 'numpy.ma' in sys.modules)\n"
    )
    run = [sys.executable, "-c", script]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}

    def started(backend: str) -> str:
        done = subprocess.run(
            [*run, backend, str(tmp_path)], capture_output=True, text=True, env=env, check=True
        )
        return done.stdout.strip()

    assert started("usearch") == "True True"
    assert started("exact") == "False True"
    # A wrong setting is the system checks' to report: the process still starts.
    assert started("no-such-engine") == "False True"
