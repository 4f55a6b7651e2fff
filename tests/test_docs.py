"""The documentation lives in the repository: no code, config or document points at a file a clone does not have,
and every ``docs/<file>.md §N`` a comment cites is a section of that file."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The reference files beside a checkout, written as patterns ([/], [.]) so this file does not itself read as a
# reference to it.
OUTSIDE = re.compile(r"DESIGN[.]md|shared[/]spec|(?<![\w/])(?:defenses|attacks)\.md|\bspec §")
CITED = re.compile(r"docs/(\w+)\.md ((?:§[\d.]+(?:, | and )?)+)")


def tracked() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "*.py", "*.yaml", "*.md", "*.toml"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    return [ROOT / n for n in names if "/records/" not in n]


def test_nothing_points_outside_the_repository():
    found = [f"{p.relative_to(ROOT)}:{i}" for p in tracked() if p.name != "test_docs.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert found == []


def test_a_section_is_cited_with_its_file():
    """A bare "§5.4" in code or config read as the outside spec's numbering; outside docs/ a section is cited as
    ``docs/<file>.md §N``."""
    bare = [f"{p.relative_to(ROOT)}:{i}" for p in tracked() if p.name != "test_docs.py" and p.parent.name != "docs"
            for i, line in enumerate(p.read_text().splitlines(), 1) if "§" in CITED.sub("", line)]
    assert bare == []


def test_every_cited_section_exists():
    sections = {}
    for doc in (ROOT / "docs").glob("*.md"):
        sections[doc.stem] = set(re.findall(r"^#+ ([\d.]+?)\.? ", doc.read_text(), flags=re.M))
    missing = []
    for p in tracked():
        for name, cites in CITED.findall(p.read_text()):
            for number in re.findall(r"§([\d]+(?:\.\d+)?)", cites):
                if number not in sections.get(name, set()):
                    missing.append(f"{p.relative_to(ROOT)}: docs/{name}.md §{number}")
    assert missing == []
    assert sections["defense_methods"] >= {"1.3", "2.2", "7.6"} and sections["attack_methods"] >= {"4.3", "7"}  # the check reads
