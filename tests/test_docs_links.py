"""Every relative link in README.md and docs/*.md leads somewhere: a file that exists and, for a
``#fragment``, a heading of that file (GitHub's anchors). Web links are not fetched."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import PROJECT_ROOT

# [text](target) and ![alt](target), with an optional "title"; reference-style links are unused.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:


def markdown_pages() -> list[Path]:
    return [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]


def _prose(text: str) -> str:
    """The text outside fenced code blocks, with inline code removed (links there are code)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(INLINE_CODE.sub("", line))
    return "\n".join(kept)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as
    hyphens, "-1", "-2" … for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(page.read_text()).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(page: Path) -> list[str]:
    """The page's local links that lead nowhere, each with the reason."""
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if EXTERNAL.match(target):
            continue
        path_part, _hash, fragment = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading #{fragment} in {linked.name}")
    return broken


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda page: page.name)
def test_every_local_link_resolves(page):
    assert broken_links(page) == []


def test_the_readme_links_every_docs_page():
    readme = PROJECT_ROOT / "README.md"
    linked = {
        (readme.parent / target.partition("#")[0]).resolve()
        for target in LINK.findall(_prose(readme.read_text()))
        if not EXTERNAL.match(target)
    }
    unlinked = [p.name for p in markdown_pages()[1:] if p.resolve() not in linked]
    assert unlinked == []


def test_a_broken_link_is_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Speed at 100,000 images\n")
    (tmp_path / "picture.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[fine](other.md) [fine too](other.md#speed-at-100000-images) ![a](picture.png)\n"
        "[same page](#page) [web](https://example.com/missing.md)\n"
        "`[in code](nowhere.md)`\n\n"
        "```\n[in a block](nowhere.md)\n```\n\n"
        "[gone](missing.md) ![gone too](screenshots/none.png) [no heading](other.md#speed)\n"
        "| a | [in a table](missing-too.md) |\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "screenshots/none.png: no such file",
        "other.md#speed: no heading #speed in other.md",
        "missing-too.md: no such file",
    ]
