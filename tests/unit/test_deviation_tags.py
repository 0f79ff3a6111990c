"""Every numbered deviation or assumption a method's docstring lists is tagged where the code makes it, and every tag
names one the docstring lists (DESIGN.md: "a numbered deviation in the method file's docstring and a ``# DEVIATION(n)``
tag"; ``# ASSUMPTION(n)`` for a paper without code). A deviation added to the code without its docstring entry, a
docstring entry whose code was removed, or an item renumbered on one side only fails here. A method is covered once it
is registered."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from repro.registry import METHODS

ROOT = Path(__file__).resolve().parents[2]
UNITS = {  # every registered method's file, and the fine-tune package (its ``__init__`` docstring lists them all)
    **{name: [Path(inspect.getfile(cls)).relative_to(ROOT).as_posix()] for name, cls in METHODS.items()},
    "finetune": ["evals/finetune/__init__.py", *sorted(p.relative_to(ROOT).as_posix()
                                                       for p in (ROOT / "evals" / "finetune").glob("[!_]*.py"))],
}
HEADER = re.compile(r"^(?:Deviations|Assumptions)\b.*:\s*$|^Deviations:", re.M)
ITEM = re.compile(r"^(\d+)\. ", re.M)
TAG = re.compile(r"\b(?:DEVIATION|ASSUMPTION)\((\d+)\)")
"""A tag, read in a line's comment (after its first ``#``)."""
EXEMPT = "(not a deviation"
"""An item that explains why something is *not* a deviation (ConMIM's teacher-update timing) has no code to tag."""


def listed(doc: str) -> dict[int, str]:
    """The numbered items of the docstring's first "Deviations..." / "Assumptions..." section, by number."""
    m = HEADER.search(doc)
    if m is None:
        return {}
    items: dict[int, str] = {}
    for line in doc[m.end():].splitlines():
        item = ITEM.match(line)
        if item:
            n = int(item.group(1))
            items[n] = line[item.end():]
        elif line.startswith(" ") and items:
            items[n] += "\n" + line.strip()
        elif line.strip() and items:
            break  # an unindented line that is not an item ends the section
    return items


def tags(files: list[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for f in files:
        for lineno, line in enumerate((ROOT / f).read_text().splitlines(), 1):
            for n in TAG.findall(line.partition("#")[2]):
                out.setdefault(int(n), []).append(f"{f}:{lineno}")
    return out


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_each_listed_deviation_is_tagged_in_the_code_and_each_tag_is_listed(unit: str):
    files = UNITS[unit]
    doc = ast.get_docstring(ast.parse((ROOT / files[0]).read_text())) or ""
    items, found = listed(doc), tags(files)
    untagged = [n for n, text in items.items() if not text.startswith(EXEMPT) and n not in found]
    unlisted = {n: where for n, where in found.items() if n not in items}
    assert untagged == [], f"{unit}: docstring items {untagged} have no # DEVIATION(n) / # ASSUMPTION(n) tag"
    assert unlisted == {}, f"{unit}: tags name items the docstring does not list: {unlisted}"


def test_the_check_reads_a_numbered_list_and_its_tags():
    doc = "Title.\n\nDeviations:\n1. one\n   more\n\n2. two\nNotes:\n3. not part of it\n"
    assert listed(doc) == {1: "one\nmore", 2: "two"}
    assert listed("No section.\n1. item") == {}
    assert TAG.findall("# DEVIATION(2): why; ASSUMPTION(3) too") == ["2", "3"]
    assert TAG.findall("# see Deviation 1") == []  # prose is not a tag
