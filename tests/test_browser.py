"""The upload page in a real browser: Debian's headless Chromium driven by Playwright.

A small library (real feedme-dev photos when ../shared is present, else the demo's drawn dishes)
gets real features (the TFLite MobileNetV2 when present, else the suite's VGG16) and real
clusters through the services; then a person's session is played: log in, choose a photo, see
chips, click, type, save. Also the XSS case and the no-JavaScript two steps.

Never downloads a browser: Playwright is pointed at /usr/bin/chromium (``apt-get install -y
chromium``); without it these tests are skipped with that reason.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.core.files import File

from imagetags.models import FeedbackChannel, Post, PostTag, StockImage, SuggestionFeedback, Tag
from imagetags.services.extractors import extractor_config_from_spec
from imagetags.services.features import compute_features
from imagetags.services.pipeline_state import feature_tasks_suspended
from imagetags.services.rebuild import rebuild_clusters

from .conftest import (
    BROWSER_TEST_MARKS,
    CHROMIUM,
    CHROMIUM_ARGS,
    FEEDME_MANIFEST,
    SCREENSHOTS,
    TFLITE_MODEL,
)

XSS_TAG = "<img src=x onerror=alert(1)>"
PASSWORD = "correct horse battery"
# feedme-dev: dishes for the library, and a held-out pizza photo as the upload. The page the
# README shows gets a larger library, so that the neighbours that vote are mostly real look-alikes.
TOPICS = ("pizza", "burger", "pancakes", "salmon")
MORE_TOPICS = (*TOPICS, "pasta", "cake", "salad", "coffee")
PER_TOPIC = 6
QUERY_PHOTO = "images/0000476.jpg"  # "Pepperoni Pizza on Plate", Pexels (CC0 when collected)

pytestmark = BROWSER_TEST_MARKS


@pytest.fixture(scope="module")
def playwright() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip)")
    # Playwright's sync API keeps an asyncio loop running in this thread, which makes Django
    # refuse ORM calls from the test body; they are plain synchronous calls, so allow them.
    with pytest.MonkeyPatch.context() as patch, sync_api.sync_playwright() as driver:
        patch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        yield driver


@pytest.fixture
def open_page(playwright, tmp_path) -> Iterator[Callable[..., object]]:
    """open_page(javascript=True) -> a page in a fresh Chromium profile (its own user-data-dir)."""
    contexts = []

    def factory(javascript: bool = True):
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / f"profile-{len(contexts)}"),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            java_script_enabled=javascript,
            viewport={"width": 860, "height": 760},
        )
        context.set_default_timeout(15_000)
        contexts.append(context)
        return context.pages[0] if context.pages else context.new_page()

    yield factory
    for context in contexts:
        context.close()


@pytest.fixture
def extractor(settings) -> str:
    """The TFLite MobileNetV2 when ../shared has it (fast, meaningful), else the suite's VGG16."""
    if TFLITE_MODEL.exists() and not os.environ.get("IMAGETAGS_EXTRACTOR"):
        settings.IMAGETAGS = {
            **settings.IMAGETAGS,
            "EXTRACTOR": extractor_config_from_spec(f"tflite:{TFLITE_MODEL}"),
        }
    return settings.IMAGETAGS["EXTRACTOR"]["CLASS"]


def _feedme_library(
    topics: tuple[str, ...], per_topic: int
) -> tuple[list[tuple[Path, list[str]]], Path]:
    root = FEEDME_MANIFEST.parent
    rows = [json.loads(line) for line in FEEDME_MANIFEST.read_text().splitlines() if line]
    entries = []
    for topic in topics:
        others = set(topics) - {topic}
        chosen = [
            row
            for row in rows
            if topic in row["tags"] and not others & set(row["tags"]) and row["path"] != QUERY_PHOTO
        ][:per_topic]
        entries += [(root / row["path"], row["tags"]) for row in chosen]
    return entries, root / QUERY_PHOTO


def _drawn_library(folder: Path) -> tuple[list[tuple[Path, list[str]]], Path]:
    from demo_site.gallery.management.commands.make_demo_library import DISHES, draw_dish

    folder.mkdir()
    rng = random.Random(0)
    entries = []
    for dish in ("pizza", "salad", "blueberries", "pancakes"):
        spec = DISHES[dish]
        for i in range(PER_TOPIC):
            path = folder / f"{dish}-{i}.jpg"
            draw_dish(spec["draw"], spec["rgb"], rng).save(path, quality=85)
            entries.append((path, ["food", *spec["tags"]]))
    query = folder / "my-pizza.jpg"
    draw_dish("pizza", DISHES["pizza"]["rgb"], random.Random(99)).save(query, quality=85)
    return entries, query


@pytest.fixture
def library(extractor, tmp_path) -> Callable[..., Path]:
    """library(extra_tags=(), topics=TOPICS, per_topic=PER_TOPIC) -> the photo to upload; builds
    posts with features and clusters through the services (one post per image, tags as their
    owners gave them, about PER_TOPIC images per cluster)."""

    def build(
        extra_tags: tuple[str, ...] = (),
        topics: tuple[str, ...] = TOPICS,
        per_topic: int = PER_TOPIC,
    ) -> Path:
        if FEEDME_MANIFEST.exists():
            entries, query = _feedme_library(topics, per_topic)
        else:
            entries, query = _drawn_library(tmp_path / "drawn")
        # Features are computed below in batches, not one task per saved image.
        with feature_tasks_suspended():
            for path, tags in entries:
                post = Post.objects.create(title=path.stem)
                for name in [*tags, *extra_tags]:
                    tag, _created = Tag.objects.get_or_create(name=name)
                    PostTag.objects.create(post=post, tag=tag, source="imported")
                with path.open("rb") as fh:
                    StockImage.objects.create(post=post, image=File(fh, name=path.name))
        summary = compute_features(StockImage.objects.all())
        assert summary.failed == 0, summary
        rebuild_clusters(k=len(entries) // PER_TOPIC, algorithm="kmeans")
        return query

    return build


@pytest.fixture
def person(django_user_model):
    return django_user_model.objects.create_user("ana", password=PASSWORD, is_staff=True)


def log_in(page, live_server, person) -> None:
    """Open the upload page; it sends us to the admin's login form and back."""
    page.goto(live_server.url + "/imagetags/upload/")
    assert "/admin/login/" in page.url
    page.fill("#id_username", person.username)
    page.fill("#id_password", PASSWORD)
    page.click("[type=submit]")
    page.wait_for_url("**/imagetags/upload/")


def save_screenshot(page, name: str) -> Path | None:
    """Screenshots for the README are made from the real photos only (drawn dishes would
    replace them with something worse when ../shared is absent)."""
    if not FEEDME_MANIFEST.exists():
        return None
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size < 300_000, f"{name} is {path.stat().st_size:,} bytes"
    return path


def test_choose_click_type_and_save(live_server, open_page, library, person, media_root):
    from playwright.sync_api import expect

    photo = library(topics=MORE_TOPICS, per_topic=9)
    page = open_page()
    log_in(page, live_server, person)
    tags_input = page.locator("#id_tags")
    chips = page.locator(".imagetags-chip")
    expect(page.locator("[data-imagetags-nojs]")).to_have_count(0)  # one-step form with JS

    started = time.monotonic()
    page.set_input_files("#id_images", str(photo))
    expect(chips.first).to_be_visible()
    seconds = time.monotonic() - started
    # "Within a second or so" on a quiet machine; the bound leaves room for a busy CI runner.
    assert seconds < 5, f"chips took {seconds:.1f} s"
    names = [chip.get_attribute("data-tag") for chip in chips.all()]
    assert len(names) >= 3 and "sunday lunch" not in names
    first, second, third = (chips.nth(i) for i in range(3))
    expect(page.locator(".imagetags-preview img")).to_have_count(1)

    # Click one; use the keyboard (Tab from the text box, then Space) for the other.
    first.click()
    expect(first).to_have_attribute("aria-pressed", "true")
    tags_input.focus()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.dataset.tag") == names[0]
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.dataset.tag") == names[1]
    page.keyboard.press("Space")
    expect(second).to_have_attribute("aria-pressed", "true")
    # Evidence on focus: the tooltip the chip is described by.
    tip = page.locator(f"#{second.get_attribute('aria-describedby')}")
    expect(tip).to_contain_text("similar post")
    expect(tip).to_have_css("opacity", "1")

    # A third chip clicked twice is added, then removed again.
    third.click()
    expect(tags_input).to_have_value(
        f"{_quoted(names[0])}, {_quoted(names[1])}, {_quoted(names[2])}, "
    )
    third.click()
    expect(third).to_have_attribute("aria-pressed", "false")

    tags_input.press("End")
    tags_input.type('"Sunday Lunch"')
    page.fill("#id_title", "Pizza night")
    hovered = chips.nth(3)
    hovered.hover()
    expect(page.locator(f"#{hovered.get_attribute('aria-describedby')}")).to_have_css(
        "opacity", "1"
    )
    save_screenshot(page, "upload-suggestions.png")

    page.click("button[value=save]")
    expect(page.locator(".imagetags-message")).to_contain_text("Saved “Pizza night” with 3 tags")
    post = Post.objects.get(title="Pizza night")
    assert post.owner == person and post.images.count() == 1
    assert dict(post.post_tags.values_list("tag__name", "source")) == {
        names[0]: "suggested",
        names[1]: "suggested",
        "sunday lunch": "typed",
    }
    feedback = SuggestionFeedback.objects.filter(post=post).order_by("rank")
    assert [f.tag.name for f in feedback] == names
    assert [f.tag.name for f in feedback if f.accepted] == names[:2]
    assert {f.channel for f in feedback} == {FeedbackChannel.WIDGET}
    assert all(f.cluster_set_id and f.score is not None and f.method for f in feedback)


def _quoted(name: str) -> str:
    return f'"{name}"' if (" " in name or "," in name) else name


def test_a_tag_made_of_html_is_shown_as_text(live_server, open_page, library, person):
    from playwright.sync_api import expect

    photo = library(extra_tags=(XSS_TAG,))
    page = open_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    log_in(page, live_server, person)
    page.set_input_files("#id_images", str(photo))

    chip = page.locator(".imagetags-chip", has_text="onerror")
    expect(chip).to_have_count(1)
    assert chip.inner_text().strip() == XSS_TAG
    assert page.locator("img[src='x']").count() == 0
    chip.click()
    expect(page.locator("#id_tags")).to_have_value(f'"{XSS_TAG}", ')

    # A bad typed tag: the page comes back with the error, the image kept and the chips rebuilt
    # from the widget's state (still as text, still pressed).
    page.locator("#id_tags").press("End")
    page.locator("#id_tags").type("x" * 120)
    page.click("button[value=save]")
    expect(page.locator(".imagetags-field-invalid .errorlist")).to_contain_text("at most 100")
    expect(page.locator(".imagetags-kept")).to_contain_text(photo.name)
    chip = page.locator(".imagetags-chip", has_text="onerror")
    expect(chip).to_have_attribute("aria-pressed", "true")
    assert chip.inner_text().strip() == XSS_TAG and not Post.objects.filter(owner=person).exists()
    page.fill("#id_tags", f'"{XSS_TAG}"')
    page.click("button[value=save]")
    expect(page.locator(".imagetags-message")).to_be_visible()
    page.wait_for_timeout(300)  # give an injected handler every chance to fire
    assert dialogs == []
    assert PostTag.objects.filter(tag__name=XSS_TAG, source="suggested").count() == 1


def test_without_javascript_the_form_works_in_two_steps(
    live_server, open_page, library, person, media_root
):
    from playwright.sync_api import expect

    photo = library()
    page = open_page(javascript=False)
    log_in(page, live_server, person)
    page.set_input_files("#id_images", str(photo))
    page.fill("#id_title", "No script")
    page.fill("#id_tags", '"sunday lunch"')
    page.click("button[value=suggest]")

    boxes = page.locator("input[name=tags_accept]")
    expect(boxes.first).to_be_visible()
    names = [box.get_attribute("value") for box in boxes.all()]
    assert len(names) >= 2 and not Post.objects.filter(title="No script").exists()
    expect(page.locator(".imagetags-kept")).to_contain_text(photo.name)
    expect(page.locator("#id_title")).to_have_value("No script")
    boxes.nth(0).check()
    boxes.nth(1).check()
    save_screenshot(page, "upload-nojs.png")
    page.click("button[value=save]")

    expect(page.locator(".imagetags-message")).to_contain_text("with 3 tags")
    post = Post.objects.get(title="No script")
    assert post.images.get().image.name.endswith(photo.name)
    assert dict(post.post_tags.values_list("tag__name", "source")) == {
        names[0]: "suggested",
        names[1]: "suggested",
        "sunday lunch": "typed",
    }
    feedback = SuggestionFeedback.objects.filter(post=post)
    assert feedback.count() == len(names) and feedback.filter(accepted=True).count() == 2
    assert set(feedback.values_list("channel", flat=True)) == {FeedbackChannel.FORM}
    kept = media_root / "imagetags" / "pending"
    assert not kept.exists() or not any(kept.iterdir())


def test_errors_are_readable(live_server, open_page, person, add_post, tmp_path, settings):
    """No clusters yet, a file over the size limit (refused before any upload), not an image."""
    from playwright.sync_api import expect

    from .conftest import image_bytes

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes(size=(120, 90), pattern="noise"))
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list: eggs, flour\n")
    page = open_page()
    log_in(page, live_server, person)
    error = page.locator(".imagetags-error")

    page.set_input_files("#id_images", str(photo))
    expect(error).to_contain_text("No suggestions yet: this site's image library has not been")
    expect(error).to_contain_text("You can still type tags yourself.")
    expect(page.locator(".imagetags-chip")).to_have_count(0)

    # Clusters from hand-made vectors: enough for the file checks, which come after them.
    add_post(["soup"], [0])
    add_post(["cake"], [1])
    rebuild_clusters(k=2, algorithm="kmeans")
    page.set_input_files("#id_images", str(notes))
    expect(error).to_contain_text("notes.txt: The file is text, not an image")
    expect(page.locator(".imagetags-panel")).to_have_attribute("aria-busy", "false")

    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_UPLOAD_BYTES": 1000}
    page.reload()
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.set_input_files("#id_images", str(photo))
    expect(error).to_contain_text("photo.jpg is ")
    expect(error).to_contain_text("the limit is 1000 bytes per image")
    assert not [url for url in requests if "/suggestions/" in url]
