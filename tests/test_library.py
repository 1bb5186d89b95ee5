"""import_library: manifest parsing, idempotent import, confinement, atomicity, command output."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import DatabaseError

from imagetags.models import (
    ClusterMembership,
    FeatureStatus,
    Post,
    PostTag,
    StockImage,
    Tag,
    TagSource,
)
from imagetags.services.library import import_manifest, parse_manifest
from tests.conftest import image_bytes

# Distinct colours give distinct files (and checksums).
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


def write_image(folder: Path, name: str, n: int = 0) -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(color=COLORS[n % len(COLORS)], pattern="noise", seed=n))
    return name


def write_manifest(folder: Path, rows: list[dict | str], name: str = "manifest.jsonl") -> Path:
    """Rows are dicts (written as JSON) or raw strings (written as they are)."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / name
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def row(path: str, tags: list[str] = (), post: str | None = None, owner: str | None = None):
    return {"path": path, "tags": list(tags), "post": post, "owner": owner}


@pytest.fixture
def lib(tmp_path: Path) -> Path:
    return tmp_path / "lib"


def media_files(media_root: Path) -> list[Path]:
    return [p for p in media_root.rglob("*") if p.is_file()] if media_root.exists() else []


def table_counts() -> dict[str, int]:
    return {model.__name__: model.objects.count() for model in (Post, PostTag, StockImage, Tag)}


# --- parsing ---------------------------------------------------------------------------------


def test_parse_reports_line_numbers_and_skips_blank_lines(lib: Path) -> None:
    write_image(lib, "a.jpg")
    manifest = write_manifest(lib, [row("a.jpg", ["x"]), "", "{not json", row("a.jpg")])

    entries = parse_manifest(manifest)

    assert [entry.line for entry in entries] == [1, 3, 4]
    assert entries[0].ok and entries[0].file == (lib / "a.jpg").resolve()
    assert not entries[1].ok and "not valid JSON" in entries[1].errors[0]
    assert entries[2].ok and entries[2].tags == ()


# --- importing -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_import_groups_posts_and_saves_imported_tags_and_owner(lib: Path, media_root) -> None:
    write_image(lib, "img/a.jpg", 0)
    write_image(lib, "img/b.jpg", 1)
    write_image(lib, "img/c.jpg", 2)
    write_image(lib, "img/d.jpg", 3)
    manifest = write_manifest(
        lib,
        [
            row("img/a.jpg", ["ramen", "noodles"], post="p1", owner="flickr:1"),
            row("img/c.jpg", ["ramen"], post=None),
            row("img/b.jpg", ["Soup"], post="p1", owner="flickr:1"),
            row("img/d.jpg", ["ramen"], post=None),
        ],
    )

    summary = import_manifest(manifest)

    assert (summary.imported, summary.skipped, summary.rejected) == (4, 0, [])
    assert summary.posts_created == 3
    keyed = Post.objects.get(import_key="lib/manifest.jsonl:p1")
    assert keyed.external_owner == "flickr:1"
    assert sorted(keyed.tags.values_list("name", flat=True)) == ["noodles", "ramen", "soup"]
    assert keyed.images.count() == 2
    # Null post keys: each image is a post of its own, even with identical tags.
    singles = Post.objects.exclude(pk=keyed.pk)
    assert singles.count() == 2
    assert all(post.images.count() == 1 and post.import_key == "" for post in singles)
    assert set(PostTag.objects.values_list("source", flat=True)) == {TagSource.IMPORTED}
    assert StockImage.objects.filter(sha256="").count() == 0
    assert len(media_files(media_root)) == 4


@pytest.mark.django_db
def test_second_run_imports_nothing_and_finds_keyed_posts_again(lib: Path) -> None:
    write_image(lib, "a.jpg", 0)
    write_image(lib, "b.jpg", 1)
    rows = [row("a.jpg", ["x"], post="p1"), row("b.jpg", ["y"])]
    manifest = write_manifest(lib, rows)
    import_manifest(manifest)
    before = table_counts()

    again = import_manifest(manifest)

    assert (again.imported, again.skipped, len(again.rejected)) == (0, 2, 0)
    assert (again.posts_created, again.posts_updated) == (0, 0)
    assert table_counts() == before

    # The manifest grows: the new image of post p1 joins the existing post.
    write_image(lib, "c.jpg", 2)
    write_manifest(lib, [*rows, row("c.jpg", ["z"], post="p1")])
    grown = import_manifest(manifest)

    assert (grown.imported, grown.posts_created, grown.posts_updated) == (1, 0, 1)
    post = Post.objects.get(import_key="lib/manifest.jsonl:p1")
    assert post.images.count() == 2
    assert sorted(post.tags.values_list("name", flat=True)) == ["x", "z"]


@pytest.mark.django_db
@pytest.mark.parametrize("dry_run", [True, False])
def test_byte_identical_line_is_skipped(lib: Path, dry_run: bool) -> None:
    write_image(lib, "a.jpg", 0)
    (lib / "copy.jpg").write_bytes((lib / "a.jpg").read_bytes())
    # Same post: neither copy is in the database yet when the post is checked.
    manifest = write_manifest(
        lib, [row("a.jpg", ["x"], post="p"), row("copy.jpg", ["y"], post="p")]
    )

    summary = import_manifest(manifest, dry_run=dry_run)

    assert (summary.imported, summary.skipped) == (1, 1)
    assert StockImage.objects.count() == (0 if dry_run else 1)


def _outside_file(lib: Path) -> Path:
    outside = lib.parent / "outside.jpg"
    outside.write_bytes(image_bytes())
    return outside


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("make_path", "reason"),
    [
        (lambda lib: "../outside.jpg", "outside the manifest's folder"),
        (lambda lib: "img/../../outside.jpg", "outside the manifest's folder"),
        (lambda lib: str(_outside_file(lib)), "absolute"),
        (lambda lib: "link.jpg", "outside the manifest's folder"),
        (lambda lib: "a.jpg\x00.png", "NUL byte"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "nul"],
)
def test_paths_are_confined_to_the_manifest_folder(lib: Path, make_path, reason) -> None:
    write_image(lib, "a.jpg", 0)
    (lib / "link.jpg").symlink_to(_outside_file(lib))
    manifest = write_manifest(lib, [row("a.jpg", ["ok"]), row(make_path(lib), ["bad"])])

    summary = import_manifest(manifest)

    assert summary.imported == 1
    assert [(r.line, reason in r.reason) for r in summary.rejected] == [(2, True)]
    assert not Tag.objects.filter(name="bad").exists()


@pytest.mark.django_db
def test_symlink_inside_the_folder_is_allowed(lib: Path) -> None:
    write_image(lib, "real/a.jpg", 0)
    (lib / "alias.jpg").symlink_to(lib / "real" / "a.jpg")
    manifest = write_manifest(lib, [row("alias.jpg", ["x"])])

    assert import_manifest(manifest).imported == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"path": "a.jpg", "tags": [], "colour": "red"}', "unknown key(s) 'colour'"),
        ('{"path": "a.jpg", "tags": [}', "not valid JSON"),
        ('["a.jpg"]', "not a JSON object"),
        ('{"tags": ["x"]}', '"path" is missing'),
        ('{"path": "missing.jpg", "tags": []}', "does not exist"),
        ('{"path": "text.jpg", "tags": []}', "not an image"),
        ('{"path": "a.jpg", "tags": "x"}', "must be a list"),
        ('{"path": "a.jpg", "tags": ["ok", "   "]}', "tag #2: A tag name cannot be empty"),
        ('{"path": "a.jpg", "tags": [7]}', "tag #1 is not a string"),
        (
            '{"path": "a.jpg", "tags": ["' + "x" * 101 + '"]}',
            "tag #1: Tag names are at most 100 characters",
        ),
        ('{"path": "a.jpg", "post": 3}', '"post" must be a string'),
    ],
    ids=[
        "unknown-key",
        "bad-json",
        "not-object",
        "no-path",
        "missing-file",
        "text-as-jpg",
        "tags-not-list",
        "empty-tag",
        "tag-not-string",
        "long-tag",
        "post-not-string",
    ],
)
def test_bad_lines_are_rejected_with_line_number_and_reason(lib: Path, line, reason) -> None:
    write_image(lib, "a.jpg", 0)
    write_image(lib, "good.jpg", 1)
    (lib / "text.jpg").write_text("this is not a JPEG")
    manifest = write_manifest(lib, [row("good.jpg", ["fine"]), line])

    summary = import_manifest(manifest)

    assert summary.imported == 1
    assert len(summary.rejected) == 1
    assert summary.rejected[0].line == 2
    assert reason in summary.rejected[0].reason
    assert StockImage.objects.count() == 1


@pytest.mark.django_db
def test_tag_names_are_normalised_and_deduplicated(lib: Path) -> None:
    write_image(lib, "a.jpg", 0)
    Tag.objects.create(name="food")
    manifest = write_manifest(lib, [row("a.jpg", ["  Cuba   Libre ", "FOOD", "food", "x" * 100])])

    import_manifest(manifest)

    post = Post.objects.get()
    assert sorted(post.tags.values_list("name", flat=True)) == ["cuba libre", "food", "x" * 100]
    assert Tag.objects.filter(name="food").count() == 1


@pytest.mark.django_db
def test_failure_mid_post_leaves_no_rows_and_no_files(lib: Path, media_root, monkeypatch) -> None:
    for n, name in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        write_image(lib, name, n)
    manifest = write_manifest(
        lib,
        [
            row("a.jpg", ["only-in-p1"], post="p1"),
            row("b.jpg", ["only-in-p1"], post="p1"),
            row("c.jpg", ["elsewhere"]),
        ],
    )
    original_save = StockImage.save
    calls = {"n": 0}

    def failing_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second image of post p1, after its file was stored
            raise DatabaseError("disk full")
        return original_save(self, *args, **kwargs)

    monkeypatch.setattr(StockImage, "save", failing_save)

    summary = import_manifest(manifest)

    assert [(r.line, "disk full" in r.reason) for r in summary.rejected] == [(1, True), (2, True)]
    assert summary.imported == 1  # the next post still imports
    assert not Post.objects.filter(import_key__endswith=":p1").exists()
    assert not Tag.objects.filter(name="only-in-p1").exists()
    assert StockImage.objects.count() == 1
    files = media_files(media_root)
    assert [path.name for path in files] == [StockImage.objects.get().image.name.rsplit("/")[-1]]


@pytest.mark.django_db
def test_dry_run_writes_nothing(lib: Path, media_root) -> None:
    write_image(lib, "a.jpg", 0)
    write_image(lib, "b.jpg", 1)
    manifest = write_manifest(lib, [row("a.jpg", ["x"], post="p"), row("b.jpg", ["y"], post="p")])

    summary = import_manifest(manifest, dry_run=True)

    assert (summary.imported, summary.posts_created, summary.dry_run) == (2, 1, True)
    assert table_counts() == {"Post": 0, "PostTag": 0, "StockImage": 0, "Tag": 0}
    assert media_files(media_root) == []


@pytest.mark.django_db
def test_limit_reads_only_the_first_entries(lib: Path) -> None:
    rows = [row(write_image(lib, f"{n}.jpg", n), ["x"]) for n in range(3)]
    manifest = write_manifest(lib, rows)

    assert import_manifest(manifest, limit=2).imported == 2
    assert StockImage.objects.count() == 2


# --- the command -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_command_json_summary(lib: Path) -> None:
    write_image(lib, "a.jpg", 0)
    manifest = write_manifest(lib, [row("a.jpg", ["x"]), row("nope.jpg")])
    out = StringIO()

    call_command("import_library", str(manifest), "--json", stdout=out)

    data = json.loads(out.getvalue())
    assert set(data) >= {"imported", "skipped", "rejected", "rejections", "dry_run", "features"}
    assert (data["imported"], data["skipped"], data["rejected"]) == (1, 0, 1)
    assert data["rejections"] == [
        {"line": 2, "path": "nope.jpg", "reason": "the file does not exist"}
    ]


@pytest.mark.django_db
def test_command_text_summary_lists_first_rejections(lib: Path) -> None:
    write_image(lib, "a.jpg", 0)
    manifest = write_manifest(lib, [row("a.jpg"), *[row(f"gone{n}.jpg") for n in range(3)]])
    out = StringIO()

    call_command("import_library", str(manifest), "--show-rejected", "2", stdout=out)

    text = out.getvalue()
    assert "Imported 1 images" in text and "rejected 3" in text
    assert "line 2 (gone0.jpg): the file does not exist" in text
    assert "gone2.jpg" not in text and "and 1 more" in text


@pytest.mark.django_db
def test_command_dry_run_says_so_and_writes_nothing(lib: Path) -> None:
    write_image(lib, "a.jpg", 0)
    manifest = write_manifest(lib, [row("a.jpg", ["x"])])
    out = StringIO()

    call_command("import_library", str(manifest), "--dry-run", stdout=out)

    assert "Would import 1 images" in out.getvalue()
    assert StockImage.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("what", ["missing", "folder"])
def test_command_refuses_a_missing_manifest(tmp_path: Path, what: str) -> None:
    target = tmp_path / "nothing.jsonl" if what == "missing" else tmp_path
    with pytest.raises(CommandError, match="does not exist|is a folder"):
        call_command("import_library", str(target))


@pytest.mark.django_db
def test_command_refuses_an_unreadable_manifest(lib: Path, monkeypatch) -> None:
    manifest = write_manifest(lib, [row("a.jpg")])

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    # chmod would not stop root (the CI user here), so the read itself is made to fail.
    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(CommandError, match="could not be read .Permission denied"):
        call_command("import_library", str(manifest))


@pytest.mark.slow
@pytest.mark.django_db
def test_compute_features_embeds_in_batches_without_enqueuing_tasks(
    lib: Path, monkeypatch, django_capture_on_commit_callbacks
) -> None:
    enqueued: list[int] = []
    monkeypatch.setattr("imagetags.signal_handlers.enqueue_feature_extraction", enqueued.append)
    rows = [row(write_image(lib, f"{n}.jpg", n), ["x"]) for n in range(3)]
    manifest = write_manifest(lib, rows)
    out = StringIO()

    # Run on_commit callbacks, as they would run outside the test's transaction.
    with django_capture_on_commit_callbacks(execute=True):
        call_command("import_library", str(manifest), "--compute-features", "--json", stdout=out)

    data = json.loads(out.getvalue())
    assert data["features"]["ready"] == 3
    assert enqueued == []
    assert set(StockImage.objects.values_list("feature_status", flat=True)) == {FeatureStatus.READY}


@pytest.mark.django_db
def test_compute_features_runs_the_whole_pipeline(lib: Path) -> None:
    """--compute-features embeds through tasks.run_feature_pipeline: the new images join the
    active clustering at once, as the per-image tasks would have made them."""
    from imagetags.services.rebuild import rebuild_clusters

    first = write_manifest(lib, [row(write_image(lib, f"{n}.jpg", n), ["x"]) for n in range(2)])
    call_command("import_library", str(first), "--compute-features", stdout=StringIO())
    active = rebuild_clusters(k=1, algorithm="kmeans")
    later = write_manifest(lib, [row(write_image(lib, "9.jpg", 9), ["y"])], name="later.jsonl")

    call_command("import_library", str(later), "--compute-features", stdout=StringIO())

    image = StockImage.objects.get(post__tags__name="y")
    assert ClusterMembership.objects.filter(image=image, cluster_set=active).count() == 1


@pytest.mark.django_db
def test_without_compute_features_each_image_enqueues_a_task(
    lib: Path, monkeypatch, django_capture_on_commit_callbacks
) -> None:
    enqueued: list[int] = []
    monkeypatch.setattr("imagetags.signal_handlers.enqueue_feature_extraction", enqueued.append)
    manifest = write_manifest(lib, [row(write_image(lib, f"{n}.jpg", n)) for n in range(2)])
    with django_capture_on_commit_callbacks(execute=True):
        import_manifest(manifest)

    assert sorted(enqueued) == sorted(StockImage.objects.values_list("pk", flat=True))
