"""Tag names: NFKC, hidden characters, refused categories, on every path; slugs; round trips."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import unicodedata
from io import StringIO

import pytest
from django import forms
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, transaction
from django.utils.text import slugify

from imagetags.forms import SuggestedTagsField
from imagetags.models import InvalidTagName, Post, PostTag, SuggestionFeedback, Tag, TagSource
from imagetags.services.library import import_manifest
from imagetags.services.tagging import add_tags, clean_tag_name, parse_tag_input
from imagetags.services.vocabulary import TagMergeError, merge_tags
from imagetags.widgets import format_tag_input

from .conftest import PROJECT_ROOT, image_bytes

# --- normalisation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("food\u200b", "food"),  # zero-width space
        ("\ufefffood", "food"),  # byte-order mark
        ("fo\u00adod", "food"),  # soft hyphen
        ("fo\u2060od", "food"),  # word joiner
        ("ｆｏｏｄ", "food"),  # fullwidth letters (NFKC)
        ("ﬁsh", "fish"),  # ligature (NFKC)
        ("cuba\u00a0libre", "cuba libre"),  # no-break space
        ("Cafe\u0301", "café"),  # combining accent composed (NFKC)
        ("food\u200d", "food"),  # a joiner at the end hides nothing useful: stripped
        ("\u200cfood", "food"),
        ("a \u200d b", "a b"),  # next to a space
        ("a\u200d\u200db", "ab"),  # next to another joiner
    ],
)
def test_names_are_nfkc_and_hidden_characters_are_stripped(db, raw, expected):
    assert clean_tag_name(raw) == expected
    assert Tag.objects.create(name=raw).name == expected


@pytest.mark.parametrize(
    "name",
    [
        "می\u200cخواهم",  # Persian: ZWNJ inside a word
        "क्\u200dष",  # Devanagari half form: ZWJ after a virama (a combining mark)
        "👩\u200d💻",  # emoji ZWJ sequence
        "❤\ufe0f\u200d🔥",  # after a variation selector
    ],
)
def test_joiners_between_visible_characters_are_kept(db, name):
    expected = clean_tag_name(name)
    assert ("\u200c" in name) == ("\u200c" in expected)
    assert ("\u200d" in name) == ("\u200d" in expected)
    assert Tag.objects.create(name=name).name == expected


def test_a_name_with_hidden_characters_is_the_same_tag(make_post):
    post = make_post(tags=["food"])
    assert add_tags(post, ["food\u200b", "\ufeffFOOD"]) == []
    assert Tag.objects.count() == 1 and post.post_tags.count() == 1


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("evil\u202egnp", "U+202E RIGHT-TO-LEFT OVERRIDE"),
        ("a\u200eb", "U+200E LEFT-TO-RIGHT MARK"),
        ("flag\U000e0041", "U+E0041 TAG LATIN CAPITAL LETTER A"),
        ("a\u2066b", "U+2066 LEFT-TO-RIGHT ISOLATE"),
        ("pua\ue000", r"U+E000 \(a private-use character\)"),
        ("half\ud800", r"U+D800 \(a surrogate\)"),
        ("bell\x07", r"U+0007 \(a control character\)"),
        ("del\x7f", r"U+007F \(a control character\)"),
    ],
)
def test_refused_characters_are_named(db, name, message):
    with pytest.raises(InvalidTagName, match=message.replace("+", r"\+")) as caught:
        clean_tag_name(name)
    # The message escapes the character: a bidi override cannot reorder the admin's text.
    refused = [ch for ch in name if unicodedata.category(ch) in {"Cc", "Cf", "Co", "Cs"}]
    assert refused and not any(ch in str(caught.value) for ch in refused)
    # Tag.save is the last line of defence: nothing stores what the checks refuse.
    with pytest.raises(InvalidTagName, match=message.replace("+", r"\+")):
        Tag.objects.create(name=name)
    assert not Tag.objects.exists()


@pytest.mark.parametrize("name", ["\u200b", "\u200b\ufeff\u00ad", " \u200d ", "\u2060"])
def test_invisible_names_are_errors(db, name):
    with pytest.raises(InvalidTagName, match="cannot be empty or invisible"):
        clean_tag_name(name)
    with pytest.raises(InvalidTagName, match="cannot be empty or invisible"):
        Tag.objects.create(name=name)


# --- every path --------------------------------------------------------------------------------

BIDI = "invoice\u202efdp.exe"


def test_the_form_refuses_a_bidi_override():
    field = SuggestedTagsField(required=False)
    with pytest.raises(forms.ValidationError, match="U\\+202E RIGHT-TO-LEFT OVERRIDE"):
        field.clean({"text": f"ok, {BIDI}", "ticked": [], "state": ""})


def test_the_api_refuses_a_bidi_override(admin_client, make_upload, media_root):
    response = admin_client.post(
        "/api/imagetags/posts/", {"images": make_upload(), "suggested_tags": BIDI}
    )
    assert response.status_code == 400
    assert "U+202E RIGHT-TO-LEFT OVERRIDE" in response.json()["suggested_tags"][0]
    assert not Post.objects.exists() and not Tag.objects.exists()


def test_the_tag_admin_refuses_a_bidi_override_and_normalises(admin_client):
    response = admin_client.post("/admin/imagetags/tag/add/", {"name": BIDI})
    assert response.status_code == 200
    assert "U+202E RIGHT-TO-LEFT OVERRIDE" in response.content.decode()
    assert not Tag.objects.exists()

    Tag.objects.create(name="food")
    # "food" + ZWSP is "food": the form's uniqueness check sees it, no IntegrityError (500).
    response = admin_client.post("/admin/imagetags/tag/add/", {"name": "Food\u200b"})
    assert response.status_code == 200
    assert "Tag with this Name already exists." in response.content.decode()
    assert Tag.objects.count() == 1


def test_manifests_refuse_what_typed_input_refuses(db, tmp_path, media_root):
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    (tmp_path / "b.jpg").write_bytes(image_bytes(seed=3, pattern="noise"))
    lines = [
        {"path": "a.jpg", "tags": ["ok", BIDI]},
        {"path": "b.jpg", "tags": ["food\u200b", "bell\x07"]},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    summary = import_manifest(tmp_path / "m.jsonl")
    assert summary.imported == 0
    reasons = [r.reason for r in summary.rejected]
    assert "tag #2: " in reasons[0] and "U+202E RIGHT-TO-LEFT OVERRIDE" in reasons[0]
    assert "tag #2: " in reasons[1] and "U+0007 (a control character)" in reasons[1]
    assert not Tag.objects.exists() and not Post.objects.exists()


# --- rows stored under the old rules -------------------------------------------------------------


def _legacy(name: str) -> Tag:
    """A row as the old normalisation stored it (update() skips today's Tag.save)."""
    tag = Tag.objects.create(name=f"legacy-{Tag.objects.count()}")
    Tag.objects.filter(pk=tag.pk).update(name=name)
    return Tag.objects.get(pk=tag.pk)


def test_normalize_tags_lists_then_merges_or_renames_old_rows(make_post):
    food = make_post(tags=["food"]).tags.get()
    hidden = _legacy("food\u200b")
    wide = _legacy("ｃａｋｅ")
    bidi = _legacy("x\u202ey")
    post = make_post(tags=[])
    PostTag.objects.create(post=post, tag=hidden, source=TagSource.TYPED)

    out = StringIO()
    with pytest.raises(CommandError, match="3 tags need attention"):
        call_command("normalize_tags", "--check", stdout=out)
    listing = out.getvalue()
    assert f"(tag {hidden.pk}): merge -> 'food' (tag {food.pk})" in listing
    assert f"(tag {wide.pk}): rename -> 'cake'" in listing
    assert f"(tag {bidi.pk}): rename by hand -> " in listing and "U+202E" in listing

    call_command("normalize_tags", "--apply", stdout=StringIO())
    assert set(Tag.objects.values_list("name", flat=True)) == {"food", "cake", "x\u202ey"}
    assert list(post.tags.values_list("name", flat=True)) == ["food"]
    out = StringIO()
    call_command("normalize_tags", stdout=out)
    assert "1 tags need attention" in out.getvalue()


def test_merging_into_an_invalid_old_name_is_refused(make_post):
    good = make_post(tags=["food"]).tags.get()
    bad = _legacy("fo\u202eod")
    with pytest.raises(TagMergeError, match="U\\+202E"):
        merge_tags([good], bad)
    assert merge_tags([bad], good).merged == ["fo\u202eod"]
    assert list(Tag.objects.values_list("name", flat=True)) == ["food"]
    assert not SuggestionFeedback.objects.exists()


# --- slugs ---------------------------------------------------------------------------------------


def test_colliding_slugs_cost_a_bounded_number_of_queries(db, django_assert_max_num_queries):
    names = list(
        dict.fromkeys(clean_tag_name("!" * n + "?" * m) for n in range(1, 21) for m in range(20))
    )
    assert len(names) == 400  # every one slugifies to nothing, i.e. the base "tag"
    # Per tag: is "tag" free, is "tag-<hash>" free, INSERT inside a savepoint (SAVEPOINT,
    # RELEASE). The old loop asked once per suffix already taken: 80,000 queries for 400 names.
    with django_assert_max_num_queries(5 * len(names)):
        tags = [Tag.objects.create(name=name) for name in names]
    assert len({tag.slug for tag in tags}) == 400
    assert tags[0].slug == "tag" and all(tag.slug.startswith("tag-") for tag in tags[1:])


def test_a_hash_collision_falls_back_to_counting(db, monkeypatch):
    import imagetags.models as models

    class Same:
        def __init__(self, data: bytes) -> None:
            pass

        def hexdigest(self) -> str:
            return "0" * 64

    first = Tag.objects.create(name="a!")
    monkeypatch.setattr(models.hashlib, "sha256", Same)
    second, third = Tag.objects.create(name="a?"), Tag.objects.create(name="a#")
    assert [first.slug, second.slug, third.slug] == ["a", "a-00000000", "a-00000000-2"]


def test_a_slug_taken_between_the_check_and_the_insert_gets_the_names_suffix(db, monkeypatch):
    # Two requests storing "c" and "c++" at once: both found the slug "c" free. The loser's
    # insert violates the slug's unique index; it must store under its own suffix, not fail
    # (a 500), and leave the surrounding transaction usable.
    Tag.objects.create(name="c")
    monkeypatch.setattr(Tag, "_unique_slug", _race_then_real(Tag._unique_slug))
    with transaction.atomic():
        late = Tag.objects.create(name="c++")
        assert Tag.objects.count() == 2
    assert late.slug.startswith("c-") and late.slug != "c"


def test_the_same_name_stored_twice_at_once_is_left_to_get_or_create(db, monkeypatch):
    Tag.objects.create(name="soup")
    monkeypatch.setattr(Tag, "_unique_slug", _race_then_real(Tag._unique_slug))
    with pytest.raises(IntegrityError):
        Tag.objects.create(name="soup")
    tag, created = Tag.objects.get_or_create(name="soup")
    assert not created and tag.slug == "soup"


def _race_then_real(real):
    """``_unique_slug`` as a request that lost the race sees it: the plain slug looked free."""

    def unique_slug(self, *, skip_plain: bool = False) -> str:
        if skip_plain:
            return real(self, skip_plain=True)
        return slugify(self.name, allow_unicode=True) or "tag"

    return unique_slug


# --- round trips through the text input ------------------------------------------------------------

NASTY = [
    '"',
    '""',
    ",",
    " ",
    "a",
    "B",
    "é",
    "ß",
    "İ",
    "\u200d",
    "\u200b",
    "'",
    "\\",
    "<",
    "👩",
    "ﬁ",
    "\t",
]


def _random_names(seed: int, count: int) -> list[list[str]]:
    rng = random.Random(seed)
    lists = []
    for _ in range(count):
        names: list[str] = []
        for _ in range(rng.randint(1, 5)):
            raw = "".join(rng.choice(NASTY) for _ in range(rng.randint(1, 8)))
            try:
                name = clean_tag_name(raw)
            except InvalidTagName:
                continue
            # Normalising is idempotent: a stored name is its own normal form.
            assert clean_tag_name(name) == name
            if name not in names:
                names.append(name)
        lists.append(names)
    return lists


EDGE_CASES = [['say "hi"'], ["a,b"], ['"'], ["cuba libre", "a, b"], ['""', '"a"', "x"], []]


def test_format_tag_input_round_trips_any_valid_names():
    for names in EDGE_CASES + _random_names(seed=10, count=2000):
        text = format_tag_input(names)
        assert parse_tag_input(text) == names, (names, text)
    assert format_tag_input(['say "hi"', "a,b"]) == '"say ""hi""", "a,b"'


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_scripts_format_and_parse_round_trip_like_python():
    lists = EDGE_CASES + _random_names(seed=11, count=500)
    script = PROJECT_ROOT / "imagetags" / "static" / "imagetags" / "tag-suggestions.js"
    runner = f"""
        global.window = {{}};
        global.document = {{ readyState: "complete", querySelectorAll: () => [] }};
        require({json.dumps(str(script))});
        const lists = JSON.parse(require("fs").readFileSync(0, "utf8"));
        const t = window.ImageTags;
        console.log(JSON.stringify(lists.map((n) => [t.formatTags(n), t.parseTags(t.formatTags(n))])));
    """
    done = subprocess.run(
        ["node", "-e", runner], input=json.dumps(lists), capture_output=True, text=True, check=True
    )
    for names, (text, parsed) in zip(lists, json.loads(done.stdout), strict=True):
        assert text == format_tag_input(names) and parsed == names, (names, text, parsed)
