"""Every relative link in README.md and docs/*.md resolves: the file exists and, for a
``#fragment``, the page has a heading that GitHub gives that anchor."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced blocks: a `#` comment in a shell block is no heading."""
    return _FENCE.sub("", text)


def anchors(page: Path) -> set:
    """The anchors GitHub derives from a page's headings (lower case, punctuation dropped,
    spaces to hyphens, repeats numbered)."""
    seen, out = {}, set()
    for title in _HEADING.findall(_prose(page.read_text())):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list:
    prose = _CODE.sub("", _prose(page.read_text()))
    return [t for t in _LINK.findall(prose) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_the_pages_are_there():
    assert len(PAGES) > 1 and all(p.exists() for p in PAGES)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    dead = []
    for target in links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        if not dest.exists():
            dead.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            dead.append(f"{target}: no heading with that anchor in {dest.relative_to(REPO)}")
    assert dead == [], f"{page.relative_to(REPO)}: " + "; ".join(dead)


def test_the_anchor_rule_is_githubs():
    """A few headings of these pages, with the anchors GitHub shows for them."""
    page = REPO / "docs" / "how-it-works.md"
    assert "differences-from-the-ruby-xcflushd-121" in anchors(page)
    assert "checking-a-release-by-rebuilding-it-make-reproduce" in anchors(REPO / "docs" / "releases.md")
    assert "xcflushd-status-and-xcflushd-dead-letter" in anchors(REPO / "docs" / "operations.md")
