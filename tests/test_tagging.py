"""Tag names, typed-tag parsing, tag sources and auto-tagging."""

from __future__ import annotations

import re

import pytest

from imagetags.models import PostTag, Tag, TagSource, normalize_tag_name
from imagetags.services.rebuild import rebuild_clusters
from imagetags.services.tagging import (
    InvalidTagName,
    add_tags,
    apply_auto_tags,
    clean_tag_name,
    parse_tag_input,
    remove_auto_tags,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("  Cuba   Libre ", "cuba libre"), ("SALMON", "salmon"), ("a\tb\nc", "a b c")],
)
def test_tag_names_are_normalised(db, raw, expected):
    assert normalize_tag_name(raw) == expected
    assert Tag.objects.create(name=raw).name == expected


def test_tag_slugs_stay_unique(db):
    first, second = Tag.objects.create(name="c++"), Tag.objects.create(name="c")
    # On a collision the suffix is a short hash of the name: free at once, and stable.
    assert first.slug == "c" and re.fullmatch(r"c-[0-9a-f]{8}", second.slug)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('salmon, "cuba libre", sushi rice', ["salmon", "cuba libre", "sushi rice"]),
        ("salmon sushi", ["salmon", "sushi"]),
        ('"a, b", c', ["a, b", "c"]),
        ("Food, food ,FOOD", ["food"]),
        ("", []),
        (" , ,", []),
    ],
)
def test_parse_tag_input_like_taggit(text, expected):
    assert parse_tag_input(text) == expected


def test_clean_tag_name_refuses_empty_long_and_control_characters():
    with pytest.raises(InvalidTagName, match="cannot be empty or invisible"):
        clean_tag_name("   ")
    with pytest.raises(InvalidTagName, match="at most 100 characters"):
        clean_tag_name("x" * 101)
    with pytest.raises(InvalidTagName, match=r"U\+0000 \(a control character\)"):
        clean_tag_name("bad\x00name")
    assert clean_tag_name("<img src=x onerror=alert(1)>") == "<img src=x onerror=alert(1)>"


def test_add_tags_records_source_and_is_all_or_nothing(make_post):
    post = make_post(tags=["food"])
    added = add_tags(post, ["Salmon", "food", "salmon"], source=TagSource.SUGGESTED)
    assert [(pt.tag.name, pt.source) for pt in added] == [("salmon", "suggested")]
    with pytest.raises(InvalidTagName):
        add_tags(post, ["fine", ""])
    assert not Tag.objects.filter(name="fine").exists()


def test_auto_tags_off_by_default(add_post):
    add_post(["soup"], [1])
    rebuild_clusters(k=1)
    post = add_post([], [1])
    assert apply_auto_tags(post) == []


def test_auto_tags_are_marked_removable_and_not_counted(add_post, settings):
    for _ in range(3):
        add_post(["soup", "food"], [1])
    add_post(["food"], [1])
    rebuild_clusters(k=1)
    settings.IMAGETAGS = {**settings.IMAGETAGS, "AUTO_TAG": True, "AUTO_TAG_THRESHOLD": 0.5}
    post = add_post([], [1])

    applied = apply_auto_tags(post)

    assert sorted(pt.tag.name for pt in applied) == ["food", "soup"]
    assert set(post.post_tags.values_list("source", flat=True)) == {"auto"}
    assert apply_auto_tags(post) == []  # already there
    # A rebuild does not learn from the auto tags: soup is still on 3 posts, not 4.
    cluster = rebuild_clusters(k=1).clusters.get()
    assert dict(cluster.tag_frequencies.values_list("tag__name", "post_count")) == {
        "food": 4,
        "soup": 3,
    }
    assert remove_auto_tags(post) == 2
    assert not PostTag.objects.filter(post=post).exists()
