from django.db import migrations

from imagetags.contrib.pgvector.extension import create_vector_extension


class Migration(migrations.Migration):
    dependencies = []

    operations = [
        # Not pgvector.django.VectorExtension (Django's CreateExtension): it is a no-op off
        # PostgreSQL too, but it needs psycopg and the pgvector package at import time, and a role
        # that may not create the extension gets a raw "permission denied" traceback. Backwards:
        # nothing, since other apps' columns may use the extension.
        migrations.RunPython(create_vector_extension, migrations.RunPython.noop, elidable=False),
    ]
