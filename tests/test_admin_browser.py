"""The admin's cluster page and library map in a real browser, and the README's screenshots.

A library is imported through ``services.library`` and clustered through the services: about
150 real feedme-dev photos with the TFLite MobileNetV2 when ../shared has them, else the demo's
drawn dishes with the suite's extractor. Debian's headless Chromium (never a downloaded browser)
then shows the pages as an admin sees them.

Only photos from Pexels (CC0 when collected) go into the library here, because the screenshots
it saves under ``docs/screenshots/`` are committed.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.management import call_command
from django.test import Client
from PIL import Image

from imagetags.models import Cluster, ClusterSet, StockImage
from imagetags.services.extractors import extractor_config_from_spec
from imagetags.services.library import import_manifest
from imagetags.services.library_map import cluster_labels
from imagetags.services.rebuild import rebuild_clusters
from imagetags.tasks import run_feature_pipeline

from .conftest import (
    BROWSER_TEST_MARKS,
    CHROMIUM,
    CHROMIUM_ARGS,
    FEEDME_MANIFEST,
    SCREENSHOTS,
    TFLITE_MODEL,
)

SCREENSHOT_MAX_BYTES = 300_000
LIBRARY_SIZE = 150

pytestmark = BROWSER_TEST_MARKS


def _real_photos() -> bool:
    return (
        FEEDME_MANIFEST.exists()
        and TFLITE_MODEL.exists()
        and not os.environ.get("IMAGETAGS_EXTRACTOR")
    )


def _pexels_manifest(folder: Path) -> Path:
    """A manifest of the first LIBRARY_SIZE feedme-dev photos credited to Pexels, with copies
    of them (an import only reads files inside its manifest's folder)."""
    root = FEEDME_MANIFEST.parent
    (folder / "images").mkdir(parents=True)
    chosen = []
    for line in FEEDME_MANIFEST.read_text().splitlines():
        row = json.loads(line)
        credit = root / "attributions" / (Path(row["path"]).name + ".txt")
        if row["tags"] and credit.exists() and "pexels.com" in credit.read_text():
            shutil.copyfile(root / row["path"], folder / row["path"])
            chosen.append(row)
        if len(chosen) == LIBRARY_SIZE:
            break
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in chosen))
    return manifest


def _drawn_manifest(folder: Path) -> Path:
    from demo_site.gallery.management.commands.make_demo_library import Command

    call_command(Command(), str(folder), per_dish=5, stdout=io.StringIO())
    return folder / "manifest.jsonl"


@pytest.fixture
def admin_library(settings, tmp_path) -> ClusterSet:
    """Import a library with features, cluster it (K chosen by the site's rule)."""
    if _real_photos():
        settings.IMAGETAGS = {
            **settings.IMAGETAGS,
            "EXTRACTOR": extractor_config_from_spec(f"tflite:{TFLITE_MODEL}"),
        }
        manifest = _pexels_manifest(tmp_path / "library")
    else:
        manifest = _drawn_manifest(tmp_path / "library")
    summary = import_manifest(manifest, feature_pipeline=run_feature_pipeline)
    assert not summary.rejected and summary.features["failed"] == 0, summary
    return rebuild_clusters(algorithm="kmeans", seed=0)


@pytest.fixture
def admin_page(live_server, admin_library, tmp_path, django_user_model) -> Iterator[object]:
    """A logged-in admin's page in headless Chromium; fails the test on any JS dialog."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip)")
    admin = django_user_model.objects.create_superuser("admin", password="x")
    client = Client()
    client.force_login(admin)
    session = client.cookies["sessionid"].value
    dialogs: list[str] = []
    # Playwright's sync API keeps an asyncio loop running in this thread, which makes Django
    # refuse ORM calls from the test body; they are plain synchronous calls, so allow them.
    with pytest.MonkeyPatch.context() as patch, sync_api.sync_playwright() as driver:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        browser = driver.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        context = browser.new_context(viewport={"width": 1100, "height": 900})
        # Screenshots show the page without the collapsible navigation sidebar.
        context.add_init_script("localStorage.setItem('django.admin.navSidebarIsOpen', 'false')")
        context.add_cookies([{"name": "sessionid", "value": session, "url": live_server.url}])
        context.set_default_timeout(15_000)
        page = context.new_page()
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        yield page
        browser.close()
    assert dialogs == [], f"a script ran: {dialogs}"


def save_screenshot(page, name: str, down_to: str) -> Path | None:
    """Save a README screenshot of the page from its top down to the element ``down_to``,
    squeezed to a 256-colour palette so it stays small.

    Only from the real photos: the drawn fallback would replace good pictures with worse ones
    wherever ../shared is absent.
    """
    if not _real_photos():
        return None
    box = page.locator(down_to).bounding_box()
    width = page.viewport_size["width"]
    png = page.screenshot(
        full_page=True,
        clip={"x": 0, "y": 0, "width": width, "height": box["y"] + box["height"] + 16},
    )
    image = Image.open(io.BytesIO(png)).convert("RGB")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    image.quantize(
        colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG
    ).save(path, optimize=True)
    size = path.stat().st_size
    assert size < SCREENSHOT_MAX_BYTES, f"{name} is {size:,} bytes"
    return path


def _showcase_cluster(cluster_set: ClusterSet) -> Cluster:
    """The cluster to photograph: on feedme-dev the desserts make the clearest picture of what a
    cluster is; any other library shows its biggest cluster."""
    labels = cluster_labels(cluster_set)
    clusters = Cluster.objects.filter(cluster_set=cluster_set).order_by("-size", "index")
    return next((c for c in clusters if labels[c.pk].text == "sweet"), clusters[0])


def test_cluster_page_shows_its_members_nearest_first(live_server, admin_page, admin_library):
    from playwright.sync_api import expect

    cluster = _showcase_cluster(admin_library)
    page = admin_page
    page.goto(f"{live_server.url}/admin/imagetags/cluster/{cluster.pk}/change/")
    grid = page.locator("#imagetags-members img")
    expect(grid).to_have_count(min(cluster.size, 60))
    page.wait_for_load_state("networkidle")
    # Every thumbnail really loaded (the media files are served and are images).
    broken = page.evaluate(
        "[...document.querySelectorAll('#imagetags-members img')]"
        ".filter(img => !(img.complete && img.naturalWidth > 0)).length"
    )
    assert broken == 0
    bars = page.locator("#imagetags-frequencies tr")
    assert bars.count() >= 3
    save_screenshot(page, "admin-cluster.png", down_to="#imagetags-cluster-overview")


def test_library_map_labels_every_cluster_and_links_to_it(live_server, admin_page, admin_library):
    page = admin_page
    page.goto(f"{live_server.url}/admin/imagetags/clusterset/map/")
    labels = page.locator("svg.imagetags-map a.imagetags-label")
    clusters = Cluster.objects.filter(cluster_set=admin_library)
    assert labels.count() == clusters.count()
    assert (
        page.locator("svg.imagetags-map g.imagetags-dots circle").count()
        == StockImage.objects.count()
    )
    # Labels sit inside the drawing.
    box = page.locator("svg.imagetags-map").bounding_box()
    for i in range(labels.count()):
        label = labels.nth(i).bounding_box()
        assert box["x"] <= label["x"] and label["x"] + label["width"] <= box["x"] + box["width"]
    save_screenshot(page, "admin-library-map.png", down_to="svg.imagetags-map")

    first = labels.first
    target = first.get_attribute("href")
    first.click()
    page.wait_for_url(f"**{target}")
    assert page.locator("#imagetags-members img").count() > 0
