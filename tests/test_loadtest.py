"""scripts/loadtest.py's ``--search`` and ``--library-size``: parsed, handed to the site's
settings, and the synthetic images that make a library that large."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from scripts import loadtest
from tests.conftest import PROJECT_ROOT

PG_URL = "postgresql://load:pw@127.0.0.1:5432/loaddb"


def site_settings(argv: list[str]) -> dict:
    """The load test site's settings module, imported as gunicorn and manage.py would."""
    site = loadtest.Site(loadtest.parse_args(argv))
    try:
        code = (
            "import json, loadtest_settings as s; print(json.dumps({"
            "'search': s.IMAGETAGS.get('SEARCH'), "
            "'contrib': 'imagetags.contrib.pgvector' in s.INSTALLED_APPS, "
            "'engine': s.DATABASES['default']['ENGINE']}))"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=PROJECT_ROOT,
            env=site.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        found = json.loads(done.stdout.splitlines()[-1])
        found["search_dir"] = str(site.root / "search")
        found["search_dir_exists"] = (site.root / "search").is_dir()
        return found
    finally:
        site.stop()


def test_the_options_default_to_exact_on_the_drawn_library():
    args = loadtest.parse_args([])
    assert (args.search, args.library_size) == ("exact", 0)
    found = site_settings([])
    assert found["search"] is None  # the app's default engine, whatever it is
    assert not found["contrib"]


def test_pgvector_is_set_up_in_the_database_of_the_run():
    args = loadtest.parse_args(
        ["--search", "pgvector", "--database-url", PG_URL, "--library-size", "100000"]
    )
    assert (args.search, args.library_size) == ("pgvector", 100_000)
    found = site_settings(["--search", "pgvector", "--database-url", PG_URL])
    assert found["search"] == {"BACKEND": "pgvector", "OPTIONS": {"DATABASE": "default"}}
    assert found["contrib"]  # its migration creates the extension
    assert found["engine"] == "django.db.backends.postgresql"


def test_usearch_keeps_its_files_in_the_run_folder():
    found = site_settings(["--search", "usearch"])
    assert found["search"] == {"BACKEND": "usearch", "OPTIONS": {"PATH": found["search_dir"]}}
    assert found["search_dir_exists"]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--search", "pgvector"], "--search pgvector needs --database-url"),
        (["--search", "faiss"], "invalid choice: 'faiss'"),
        (["--library-size", "-1"], "--library-size must be between 0 and 2,000,000"),
    ],
)
def test_bad_options_are_refused(argv, words, capsys):
    with pytest.raises(SystemExit) as exited:
        loadtest.parse_args(argv)
    assert exited.value.code == 2
    assert words in capsys.readouterr().err


def test_pad_library_adds_tagged_images_near_the_drawn_ones(add_post):
    from imagetags.core.vectors import from_bytes
    from imagetags.models import FeatureStatus, PostTag, StockImage
    from imagetags.services.rebuild import current_extractor_key

    add_post(["food", "cake"], [0])
    add_post(["food", "soup"], [1, 1])
    drawn = {image.pk: from_bytes(image.vector) for image in StockImage.objects.all()}

    assert loadtest.pad_library(40) == 40

    added = StockImage.objects.exclude(pk__in=drawn)
    assert added.count() == 37
    assert set(added.values_list("feature_status", "extractor_key")) == {
        (FeatureStatus.READY, current_extractor_key())
    }
    sources = np.stack(list(drawn.values()))
    nearest = []
    for image in added:
        vector = from_bytes(image.vector)
        assert abs(np.linalg.norm(vector) - 1) < 1e-3
        nearest.append(float((sources @ vector).max()))
        tags = set(PostTag.objects.filter(post=image.post).values_list("tag__name", flat=True))
        assert tags in ({"food", "cake"}, {"food", "soup"})
        assert image.post.images.count() == 1
    # Near a drawn image (cosine 0.9 on average at 8 dimensions, so spread), never a copy.
    assert min(nearest) > 0.6 and max(nearest) < 0.9999
    assert 0.8 < np.mean(nearest) < 0.98
    assert loadtest.pad_library(40) == 40  # already that large: nothing more
    assert StockImage.objects.count() == 40
