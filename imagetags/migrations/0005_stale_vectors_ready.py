"""Vectors flagged ``stale`` by older versions become ``ready`` again.

Staleness is now derived from the key (a vector is usable exactly when its key is the configured
extractor's), so a stored ``stale`` flag would only hide vectors that are still good: the key in
the row says which extractor made them. A ``stale`` row without a vector (none should exist) goes
back to ``pending`` so that it is computed again.
"""

from django.db import migrations


def stale_to_ready(apps, schema_editor) -> None:
    StockImage = apps.get_model("imagetags", "StockImage")
    rows = StockImage.objects.using(schema_editor.connection.alias).filter(feature_status="stale")
    rows.filter(vector__isnull=False).exclude(extractor_key="").update(feature_status="ready")
    rows.update(feature_status="pending", extractor_key="", vector=None)


class Migration(migrations.Migration):
    dependencies = [("imagetags", "0004_rebuildlock")]

    # Going back needs nothing: older versions mark vectors of another key stale themselves.
    operations = [migrations.RunPython(stale_to_ready, migrations.RunPython.noop, elidable=True)]
