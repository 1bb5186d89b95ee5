"""create_post: all-or-nothing saving of uploads, tag sources and suggestion feedback."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from imagetags.images import InvalidImage
from imagetags.models import Post, PostTag, StockImage, SuggestionFeedback, Tag
from imagetags.services.posts import ShownSuggestion, TooManyFiles, create_post
from imagetags.services.suggest import SuggestedTag, Suggestions, merge_suggestions
from imagetags.services.tagging import InvalidTagName


def stored_files(media_root: Path) -> list[Path]:
    return [p for p in media_root.rglob("*") if p.is_file()] if media_root.exists() else []


def test_create_post_saves_images_tags_with_sources_and_feedback(db, make_upload, media_root):
    shown = [
        ShownSuggestion("soup", 0.8, 1),
        ShownSuggestion("bowl", 0.5, 2),
        ShownSuggestion("red", 0.3, 3),
    ]
    post = create_post(
        files=[make_upload("a.jpg"), make_upload("b.png", fmt="PNG")],
        title="Lunch",
        typed_tags=["Tomato", "soup"],
        accepted_tags=["soup", "bowl"],
        shown=shown,
    )
    assert post.images.count() == 2 and len(stored_files(media_root)) == 2
    assert dict(post.post_tags.values_list("tag__name", "source")) == {
        "soup": "suggested",
        "bowl": "suggested",
        "tomato": "typed",
    }
    # "red" was shown but is no tag (any more): no feedback row, and no Tag row made for it.
    feedback = dict(SuggestionFeedback.objects.values_list("tag__name", "accepted"))
    assert feedback == {"soup": True, "bowl": True}
    assert not Tag.objects.filter(name="red").exists()


def test_a_bad_file_saves_nothing(db, make_upload, media_root):
    bad = SimpleUploadedFile("evil.jpg", b"<html>not an image</html>", content_type="image/jpeg")
    with pytest.raises(InvalidImage, match=r"^evil\.jpg: "):
        create_post(files=[make_upload("ok.jpg"), bad], typed_tags=["x"])
    assert not Post.objects.exists() and not Tag.objects.exists()
    assert stored_files(media_root) == []


def test_a_bad_tag_saves_nothing(db, make_upload, media_root):
    with pytest.raises(InvalidTagName):
        create_post(files=[make_upload()], typed_tags=["fine", "x" * 300])
    assert not Post.objects.exists() and stored_files(media_root) == []


def test_a_database_failure_removes_the_stored_files(db, make_upload, media_root, monkeypatch):
    import imagetags.services.posts as posts

    def broken(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(posts, "record_feedback", broken)
    with pytest.raises(RuntimeError):
        create_post(
            files=[make_upload("a.jpg"), make_upload("b.jpg")], shown=[ShownSuggestion("x")]
        )
    assert not StockImage.objects.exists() and not PostTag.objects.exists()
    assert stored_files(media_root) == []


def test_file_count_limit(db, make_upload, settings):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "MAX_FILES_PER_POST": 2}
    with pytest.raises(TooManyFiles, match="At most 2 images per post; 3 were sent"):
        create_post(files=[make_upload(f"{i}.jpg") for i in range(3)])
    with pytest.raises(InvalidImage, match="at least one image"):
        create_post(files=[])


def test_file_names_cannot_escape_the_upload_folder(db, media_root):
    from .conftest import image_bytes

    upload = SimpleUploadedFile(
        "../../etc/pass\x00wd.jpg", image_bytes(), content_type="image/jpeg"
    )
    post = create_post(files=[upload])
    path = Path(post.images.get().image.path).resolve()
    assert path.is_relative_to(media_root.resolve())
    assert "\x00" not in path.name and ".." not in post.images.get().image.name


def _result(cluster: int, *tags: tuple[str, float]) -> Suggestions:
    return Suggestions(
        tags=[
            SuggestedTag(n, s, int(s * 10), 10, f"in {int(s * 10)} of 10 similar posts")
            for n, s in tags
        ],
        cluster=cluster,
        cluster_index=cluster,
        cluster_set=1,
        similarity=0.9,
        extractor="x",
    )


def test_merge_keeps_best_score_and_prefers_tags_of_more_images():
    merged = merge_suggestions(
        [
            _result(1, ("soup", 0.5), ("red", 0.4)),
            _result(2, ("soup", 0.7), ("bowl", 0.4), ("red", 0.2)),
        ],
        limit=5,
    )
    assert [(t.name, t.score) for t in merged.tags] == [("soup", 0.7), ("red", 0.4), ("bowl", 0.4)]
    assert merged.tags[0].evidence == "in 7 of 10 similar posts"
    assert merged.as_dict()["clusters"] == [1, 2]
    assert [t.name for t in merge_suggestions(merged.per_image, limit=1).tags] == ["soup"]


# -- validation holds one decoded upload at a time --------------------------------------------


def test_validate_uploads_returns_facts_and_keeps_no_decoded_image(
    decoded_images_alive, make_upload
):
    from imagetags.images import ImageInfo
    from imagetags.services.posts import validate_uploads

    alive = decoded_images_alive
    files = [make_upload(f"{i}.png", fmt="PNG", size=(60, 40)) for i in range(5)]
    infos = validate_uploads(files)
    assert infos == [ImageInfo(format="PNG", width=60, height=40, frames=1)] * 5
    assert alive == [0, 0, 0, 0, 0]  # each decoded image let go before the next file


def test_validate_model_inputs_keeps_only_model_inputs(decoded_images_alive, make_upload):
    from imagetags.services.extractors import get_extractor
    from imagetags.services.posts import validate_model_inputs

    extractor = get_extractor()
    alive = decoded_images_alive
    files = [make_upload(f"{i}.png", fmt="PNG", size=(900, 700), pattern="noise") for i in range(4)]
    inputs = validate_model_inputs(files, extractor)
    assert alive == [0, 0, 0, 0]
    assert all(max(image.size) <= extractor.decode_size for image in inputs)
    # Preparing a prepared image changes nothing: the model sees what the files give it.
    for upload, image in zip(files, inputs, strict=True):
        direct = extractor.prepare(extractor.open_image(upload))
        assert (extractor.prepare(image) == direct).all()


def test_validate_model_inputs_names_the_bad_file(make_upload):
    from imagetags.services.extractors import get_extractor
    from imagetags.services.posts import validate_model_inputs

    bad = SimpleUploadedFile("bad.png", b"not an image")
    with pytest.raises(InvalidImage, match=r"^bad\.png: "):
        validate_model_inputs([make_upload(), bad], get_extractor())
