"""The user pages name only what exists and speak to users.

The user pages are README.md and docs/**/*.md outside the docs/history/ archive (the pages tests/test_docs.py
runs). On them:

- every repository path written in the text (`src/...`, `tests/...`, `benchmarks/...`, `docs/...`,
  `examples/...`, `scripts/...`, `configs/...`, `convert_checkpoints/...`, also as `$REPO/...` in commands)
  exists; `tests/x.py::name` names a test or helper defined in that file; `{a,b}` alternatives and `*` globs
  must each match something;
- every relative Markdown link resolves from the page that holds it, and its `#anchor`, when it points into a
  Markdown page, is one of that page's headings (GitHub's anchors);
- no page speaks of the project's tracker or its work rounds, or of how busy the machine was: run logs, their
  conditions and their history go to docs/history/;
- docs/performance.md stays a page of at most 200 lines (the runs behind it are in docs/history/benchmarks.md).

docs/history/ is an archive: its pages quote the paths and conditions of their time and are not checked.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import doc_files
from paths import REPO

TOP_FOLDERS = ("src", "tests", "benchmarks", "docs", "examples", "scripts", "configs", "convert_checkpoints")
# A repository path: one of the top folders, not preceded by a path or word character (so `../shared/docs/x`,
# URLs and `$DATA/tests` are not taken), except after `$REPO/`; it ends at a space, a quote, a bracket, `#` or a
# backslash (`{a,b}` groups are part of it).
REPO_PATH = re.compile(
    r"(?:(?<=\$REPO/)|(?<![\w./$~-]))"
    r"(?P<path>(?:" + "|".join(TOP_FOLDERS) + r")/(?:[^\s`'\"()\[\]<>:;,|#{}\\]|\{[^{}\s]*\})*)"
    r"(?:::(?P<name>\w+))?"
)
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<title>.+?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"(?P<id>[^\"]+)\"")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")

# What a user page must not say: the tracker, work rounds, and how busy the machine was. Case-insensitive.
NOT_FOR_USERS = {
    "an issue number": r"\bissues?\s*#\s*\d+|\bissues?\s+\d+\b",
    "the tracker": r"\bthe issue\b|\bthis issue\b|\btracker\b",
    "a work round": r"\b(?:review|work)\s+rounds?\b|\bround\s+\d+\b|\b(?:this|last|previous|next|earlier)\s+round\b",
    "the machine's load": r"\bload average\b|\bother (?:jobs|helpers|sessions|processes)\b|\bheavily shared\b"
    r"|\bmachine (?:was|is) (?:otherwise )?(?:shared|busy|idle|quiet(?:er)?)\b|\botherwise idle\b"
    r"|\b(?:idle|busy|quiet(?:er)?) (?:machine|cores?)\b|\boversubscribed\b",
    "who lent a machine": r"\blent\b|\bno GPU (?:was )?(?:available )?(?:to|for) this work\b|\bthis work\b",
}


@dataclass(frozen=True)
class Line:
    path: str  # relative to the repository
    number: int  # 1-based
    text: str


def user_pages(root: Path = REPO) -> list[Path]:
    return doc_files(root)


def lines_of(page: Path, root: Path = REPO) -> list[Line]:
    rel = page.relative_to(root).as_posix()
    return [Line(rel, i, text) for i, text in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)]


def prose_lines(page: Path, root: Path = REPO) -> list[Line]:
    """The lines outside fenced blocks (links and headings live there)."""
    out, fence = [], None
    for line in lines_of(page, root):
        match = FENCE.match(line.text)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and line.text.strip().startswith(fence):
            fence = None
        elif fence is None:
            out.append(line)
    return out


def expand_braces(path: str) -> list[str]:
    """`src/x/{a,b}.py` -> [`src/x/a.py`, `src/x/b.py`] (every brace group, combined)."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def missing_paths(line: Line, root: Path = REPO) -> list[str]:
    """The repository paths written on a line that do not exist, each with why."""
    problems = []
    for match in REPO_PATH.finditer(line.text):
        written, name = match["path"].rstrip("."), match["name"]
        for path in expand_braces(written):
            found = sorted(root.glob(path.rstrip("/"))) if "*" in path else [root / path]
            if not any(f.exists() for f in found):
                problems.append(f"{line.path}:{line.number}: `{path}` does not exist")
            elif name and not re.search(
                rf"^\s*(?:async\s+)?(?:def|class)\s+{name}\b|^{name}\s*=",
                found[0].read_text(encoding="utf-8"),
                re.MULTILINE,
            ):
                problems.append(f"{line.path}:{line.number}: `{path}::{name}`: {path} defines no `{name}`")
    return problems


def github_anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (not `-` or `_`), spaces to hyphens."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors_of(page: Path) -> set[str]:
    anchors, seen = set(), {}
    for line in prose_lines(page, page.parent):
        if heading := HEADING.match(line.text):
            slug = github_anchor(heading["title"])
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
        anchors.update(m["id"] for m in HTML_ANCHOR.finditer(line.text))
    return anchors


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    problems = []
    for line in prose_lines(page, root):
        for match in LINK.finditer(line.text):
            target = match["target"]
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            where = f"{line.path}:{line.number}: link `{target}`"
            if not linked.exists():
                shown = linked.relative_to(root.resolve()) if linked.is_relative_to(root.resolve()) else linked
                problems.append(f"{where}: {shown} does not exist")
            elif anchor and linked.suffix == ".md" and anchor not in anchors_of(linked):
                problems.append(f"{where}: {linked.name} has no heading with the anchor #{anchor}")
    return problems


def words_not_for_users(line: Line) -> list[str]:
    return [
        f"{line.path}:{line.number}: {what} ({m.group(0)!r}): run logs and their conditions go to docs/history/"
        for what, pattern in NOT_FOR_USERS.items()
        for m in re.finditer(pattern, line.text, re.IGNORECASE)
    ]


# ------------------------------------------------------------------------------------ the checkers themselves


def test_path_checker_finds_missing_paths_and_names(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("def real():\n    pass\n")
    text = (
        "`src/a.py`, `src/gone.py`, $REPO/src/a.py, src/{a,b}.py, src/*.py, src/*.txt, `src/a.py::real`, "
        "`src/a.py::fake`, ../shared/src/x.py, https://x.org/src/y.py, $DATA/src/z.py, `src/`."
    )
    assert missing_paths(Line("p.md", 3, text), tmp_path) == [
        "p.md:3: `src/gone.py` does not exist",
        "p.md:3: `src/b.py` does not exist",
        "p.md:3: `src/*.txt` does not exist",
        "p.md:3: `src/a.py::fake`: src/a.py defines no `fake`",
    ]


def test_link_checker_resolves_files_and_anchors(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "b.md").write_text(
        "# B\n\n## Key/value cache (`kv_cache`)\n\n## Notes\n\n## Notes\n\n```\n# not a heading\n```\n"
    )
    page = docs / "a.md"
    page.write_text(
        "[ok](b.md#keyvalue-cache-kv_cache) [dup](b.md#notes-1) [code](b.md#not-a-heading) "
        "[gone](c.md) [self](#a) [web](https://example.org/x#y)\n\n# A\n"
    )
    assert broken_links(page, tmp_path) == [
        "docs/a.md:1: link `b.md#not-a-heading`: b.md has no heading with the anchor #not-a-heading",
        "docs/a.md:1: link `c.md`: docs/c.md does not exist",
    ]


@pytest.mark.parametrize(
    "text",
    [
        "As the issue asked",
        "see issue #15",
        "issues 3 and 4",
        "in round 3",
        "this round",
        "load average 12",
        "shared with other jobs",
        "the machine was heavily shared",
        "on an otherwise idle machine",
        "no GPU was lent",
        "(no GPU for this work)",
    ],
)
def test_words_not_for_users_are_found(text):
    assert words_not_for_users(Line("p.md", 1, text))


@pytest.mark.parametrize(
    "text",
    [
        "the other way round",
        "round(x * 255)",
        "rounds the batch length up",
        "a GitHub issue template",
        "the batch's extra rows",
        "two idle replicas are removed",
    ],
)
def test_ordinary_words_pass(text):
    assert not words_not_for_users(Line("p.md", 1, text))


# ------------------------------------------------------------------------------------ the pages


def test_every_repository_path_in_the_docs_exists():
    problems = [p for page in user_pages() for line in lines_of(page) for p in missing_paths(line)]
    assert not problems, "\n".join(problems)


def test_every_relative_link_in_the_docs_resolves():
    problems = [p for page in user_pages() for p in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_user_pages_do_not_speak_of_the_tracker_or_the_machine_load():
    problems = [p for page in user_pages() for line in lines_of(page) for p in words_not_for_users(line)]
    assert not problems, "\n".join(problems)


def test_performance_page_is_short():
    lines = (REPO / "docs" / "performance.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"docs/performance.md has {len(lines)} lines (at most 200; runs go to docs/history/)"
