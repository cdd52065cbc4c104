"""The documentation's relative links resolve, and the README stays short.

Every relative Markdown link (``[text](path)``, ``[text](path#anchor)``) in README.md, CONTRIBUTING.md and
docs/*.md must name an existing file or folder, relative to the file that links; an ``#anchor`` into a Markdown
file must be one of that file's headings, slugged as GitHub does. Links to http(s)://, mailto: and pure
``#anchor`` links are not checked. Links inside code (fenced blocks, inline code spans) are not links.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import REPO

README_MAX_LINES = 200

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+).*?\1")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SKIP = ("http://", "https://", "mailto:")


def doc_files(root: Path = REPO) -> list[Path]:
    """The files whose links are checked."""
    return [root / "README.md", root / "CONTRIBUTING.md", *sorted((root / "docs").glob("*.md"))]


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (hyphens, spaces and word characters kept),
    spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading counts by its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(text: str) -> list[str]:
    """The targets of the Markdown links in a text, outside code."""
    found = []
    for line in _prose_lines(text):
        found += _LINK.findall(_INLINE_CODE.sub("", line))
    return found


def broken_links(path: Path, text: str | None = None) -> list[str]:
    """The relative links of one Markdown file that do not resolve, each as 'file: target (why)'."""
    text = path.read_text(encoding="utf-8") if text is None else text
    problems = []
    for target in links(text):
        if target.startswith(_SKIP) or target.startswith("#"):
            continue
        where, _, anchor = target.partition("#")
        resolved = (path.parent / where).resolve()
        if not resolved.exists():
            problems.append(f"{path.name}: {target} (no such file or folder)")
        elif anchor and resolved.is_file() and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{path.name}: {target} (no heading with that anchor)")
    return problems


def test_every_relative_link_resolves():
    files = doc_files()
    assert all(f.is_file() for f in files)
    assert len(files) > 2, "docs/ has no pages"
    problems = [p for f in files for p in broken_links(f)]
    assert not problems, "\n".join(problems)


def test_a_broken_link_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Second part, here\n")
    readme = tmp_path / "README.md"
    good = "[a](docs/page.md) [b](docs/page.md#second-part-here) [c](docs/) [d](https://x.org/none) [e](#top)"
    bad = "[f](docs/missing.md) [g](docs/page.md#no-such-part)"
    code = "`[h](nowhere.md)`\n```\n[i](nowhere.md)\n```\n"
    readme.write_text(f"# Top\n\n{good}\n{bad}\n{code}")
    assert broken_links(readme) == [
        "README.md: docs/missing.md (no such file or folder)",
        "README.md: docs/page.md#no-such-part (no heading with that anchor)",
    ]


def test_slugs_follow_github():
    assert slug("The main job (`make demo`)") == "the-main-job-make-demo"
    assert slug("An example: the demo's leaderboard") == "an-example-the-demos-leaderboard"
    assert slug("Checkpoint formats accepted by `--backbone`") == "checkpoint-formats-accepted-by---backbone"


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details to docs/"
