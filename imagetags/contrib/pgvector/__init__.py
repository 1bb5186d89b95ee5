"""``imagetags.contrib.pgvector``: creates PostgreSQL's ``vector`` extension by migration.

Add ``"imagetags.contrib.pgvector"`` to ``INSTALLED_APPS`` and ``migrate``: on PostgreSQL its one
migration runs ``CREATE EXTENSION IF NOT EXISTS vector`` (a superuser's right: pgvector is not a
trusted extension); on any other database it does nothing, so one settings file serves a SQLite
development machine and the PostgreSQL site alike.
"""
