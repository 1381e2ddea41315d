"""The documentation: the README's length, every relative link, every setting documented.

Pure: reads the Markdown files and server/config.py's table of variable names; starts nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.config import ENV_NAMES, load_settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
WIRE_PROTOCOL = ROOT / "docs" / "wire-protocol.md"
README_MAX_LINES = 200
# Read by name pattern (server/upstream/proxies.py), not through ENV_NAMES; test_the_proxy_variables_are_read
# proves that the configuration reads each of them.
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY")

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def pages() -> list[Path]:
    """Every page whose links are checked: the README, docs/*.md and the benchmark's README."""
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        opened = _FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            lines.append((number, line))
    return lines


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: its text lowercased, punctuation removed, spaces to '-'.

    Code spans keep their text, link syntax keeps the link's text; letters, digits, '_' and '-' stay.
    """
    text = _CODE_SPAN.sub(lambda match: match.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of `path`'s headings, with GitHub's -1, -2 suffixes for repeated ones."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        heading = _HEADING.match(line)
        if heading is None:
            continue
        anchor = github_anchor(heading.group(2))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


@dataclass(frozen=True)
class BrokenLink:
    page: Path
    line: int
    target: str
    reason: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page}:{self.line}: " \
               f"({self.target}) {self.reason}"


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline, image and reference link in `path` that has no scheme."""
    links: list[tuple[int, str]] = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = _CODE_SPAN.sub("", line)
        targets = [match.group(1) for match in _INLINE_LINK.finditer(line)]
        reference = _REFERENCE.match(line)
        if reference:
            targets.append(reference.group(1))
        links.extend((number, target) for target in targets if not _SCHEME.match(target))
    return links


def broken_links(path: Path, root: Path = ROOT) -> list[BrokenLink]:
    """The links of `path` that lead to no file under `root`, or to a heading its Markdown file lacks."""
    broken: list[BrokenLink] = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.is_relative_to(root.resolve()):
            broken.append(BrokenLink(path, number, target, "leads outside the repository"))
        elif not destination.exists():
            broken.append(BrokenLink(path, number, target, f"no such file: {destination}"))
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(BrokenLink(path, number, target, f"no heading with the anchor #{anchor}"))
    return broken


def documented_variables() -> set[str]:
    """The variable names in the first column of docs/configuration.md's tables."""
    names: set[str] = set()
    for _, line in prose_lines(CONFIGURATION.read_text(encoding="utf-8")):
        cells = line.strip().split("|")
        if line.lstrip().startswith("|") and len(cells) > 2:
            names.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[1]))
    return names


def table_rows(path: Path, header: str) -> list[str]:
    """The rows of the table in `path` whose header line is `header`, header and separator included."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_the_readme_is_under_200_lines():
    """Fails when the README grows to 200 lines: the rest belongs in docs/ (issue 15)."""
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


@pytest.mark.parametrize("page", pages(), ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    """Fails when a relative link in the page names a missing file, or `file.md#anchor` a heading `file.md`
    does not have (GitHub's anchors: lowercase, spaces to '-', punctuation removed). Renaming the heading
    "## When the storage fails" in docs/reliability.md, or moving docs/configuration.md, makes it fail."""
    assert page.exists(), f"{page} is missing"
    assert not broken_links(page), "\n".join(map(str, broken_links(page)))


def test_the_link_checker_reports_a_missing_file_and_a_missing_heading(tmp_path):
    """The checker itself can fail: a link to a file that does not exist, to a heading the target lacks, and
    outside the repository are each reported; links in code blocks and code spans, and URLs, are not links."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## What `REDIS_URL` changes\n\n## Notes\n\n## Notes\n")
    page = tmp_path / "README.md"
    page.write_text(
        "# Title\n\n"
        "[ok](docs/other.md#what-redis_url-changes) [ok](docs/other.md#notes-1) [ok](#title)\n"
        "[gone](docs/missing.md) [bad anchor](docs/other.md#what-redis-url-changes) [up](../outside.md)\n"
        "[no heading](#nowhere) [web](https://example.com/nothing.md) `[code](missing.md)`\n\n"
        "```md\n[fenced](missing.md)\n```\n"
    )
    reported = [(link.line, link.target) for link in broken_links(page, root=tmp_path)]
    assert reported == [(4, "docs/missing.md"), (4, "docs/other.md#what-redis-url-changes"), (4, "../outside.md"),
                        (5, "#nowhere")]


@pytest.mark.parametrize(("heading", "anchor"), [
    ("Before traffic: `deltarelay check`", "before-traffic-deltarelay-check"),
    ("What `REDIS_URL` changes", "what-redis_url-changes"),
    ("Deployment: several instances behind one address", "deployment-several-instances-behind-one-address"),
    ("The JS client and the demo page", "the-js-client-and-the-demo-page"),
    ("Arguments and services", "arguments-and-services"),
])
def test_anchors_follow_githubs_rules(heading, anchor):
    assert github_anchor(heading) == anchor


def test_every_variable_the_configuration_reads_is_documented():
    """Fails when server/config.py's ENV_NAMES (or the proxy variables) gains a name that docs/configuration.md's
    table lacks: deleting the `RELAY_IDLE_TIMEOUT` row makes it fail."""
    missing = (set(ENV_NAMES.values()) | set(PROXY_VARIABLES)) - documented_variables()
    assert not missing, f"docs/configuration.md does not document {sorted(missing)}"


def test_the_configuration_documents_no_variable_it_does_not_read():
    """Fails on a row for a variable server/config.py no longer reads (a row `RELAY_GONE` makes it fail)."""
    extra = documented_variables() - set(ENV_NAMES.values()) - set(PROXY_VARIABLES)
    assert not extra, f"docs/configuration.md documents {sorted(extra)}, which server/config.py does not read"


@pytest.mark.parametrize("name", PROXY_VARIABLES)
def test_the_proxy_variables_are_read(name):
    """Each name in PROXY_VARIABLES changes the settings, so the documentation check above covers real names."""
    value = "localhost" if name == "NO_PROXY" else "http://proxy.example:3128"
    environ = {"HTTPS_PROXY": "http://other.example:3128"} if name == "NO_PROXY" else {}
    assert load_settings({**environ, name: value}).proxies != load_settings(environ).proxies


def test_the_readmes_event_table_is_the_wire_protocols():
    """The README shows the wire protocol's event table; a row changed in one of them only makes this fail."""
    header = "| event | data |"
    assert table_rows(README, header) == table_rows(WIRE_PROTOCOL, header)
