"""The README's layout table and the repository's tree agree (no VMs).

A newcomer finds their way by that table, so every path it names must exist,
and every Python package of corral (a folder with an ``__init__.py`` under
actors/, protocol/, guest/ or config/) must have its row. The table is read
loosely: the section whose heading says "Layout", each table row's first
cell, the first `backticked` path in it (or the cell's text), with or without
a trailing slash.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PACKAGE_ROOTS = ("actors", "protocol", "guest", "config")

_HEADING = re.compile(r"^(#+)\s+(.*)$")
_SEPARATOR_CELL = re.compile(r"^:?-+:?$")


def layout_section(text: str) -> list[str]:
    """The lines under the first heading that says "Layout", up to the next
    heading of the same or a higher level."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        heading = _HEADING.match(line)
        if heading and re.search(r"\blayout\b", heading.group(2), re.IGNORECASE):
            level = len(heading.group(1))
            section = []
            for following in lines[i + 1:]:
                other = _HEADING.match(following)
                if other and len(other.group(1)) <= level:
                    break
                section.append(following)
            return section
    raise AssertionError("README.md has no section headed 'Layout'")


def first_cells(section: list[str]) -> list[str]:
    """The first cell of every row of the section's first table, header and
    separator rows left out."""
    rows = []
    in_table = False
    for line in section:
        stripped = line.strip()
        if not stripped.startswith("|"):
            if in_table:
                break  # the first table ended
            continue
        in_table = True
        cells = [cell.strip() for cell in stripped.strip("|").split("|")]
        rows.append(cells)
    if len(rows) < 3:
        raise AssertionError("the Layout section has no table with rows")
    header, separator, *body = rows
    assert all(_SEPARATOR_CELL.match(cell) for cell in separator), f"not a table separator: {separator}"
    return [cells[0] for cells in body]


def path_of(cell: str) -> str:
    """The path a first cell names: its first `backticked` span, else its text."""
    quoted = re.search(r"`([^`]+)`", cell)
    text = quoted.group(1) if quoted else re.sub(r"[*_\[\]]", "", cell).split()[0]
    return text.strip().removeprefix("./").rstrip("/")


def layout_paths() -> list[str]:
    return [path_of(cell) for cell in first_cells(layout_section(README.read_text()))]


def python_packages() -> set[str]:
    packages = set()
    for root in PACKAGE_ROOTS:
        for init in (REPO / root).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO)
            if not any(part.startswith(".") for part in relative.parts):
                packages.add(relative.as_posix())
    return packages


def test_the_layout_table_is_found_and_names_the_top_level_packages():
    paths = layout_paths()
    assert set(PACKAGE_ROOTS) <= set(paths), paths
    assert len(paths) == len(set(paths)), f"a path has two rows: {sorted(paths)}"


def test_every_path_in_the_layout_table_exists():
    missing = [path for path in layout_paths() if not (REPO / path).exists()]
    assert not missing, f"the README's layout table names paths that do not exist: {missing}"


def test_every_python_package_has_a_row_in_the_layout_table():
    packages = python_packages()
    assert {"actors", "protocol/channel", "guest/image", "config"} <= packages  # the walk finds them
    missing = sorted(packages - set(layout_paths()))
    assert not missing, f"packages without a row in the README's layout table: {missing}"


# --- the reader itself, on tables written other ways --------------------------------

def test_the_reader_takes_any_table_format_under_a_layout_heading():
    text = "\n".join([
        "# x", "## Layout and more", "",
        "Some words.", "",
        "| Folder | Holds |", "|:--|--:|",
        "| `actors/` (top) | a |",
        "| **protocol/wire** | b |",
        "|`guest/image`|c|",
        "", "| other | table |", "|---|---|", "| `ignored/` | x |",
        "### Sub heading stays in", "## Next", "| `outside/` | y |",
    ])
    paths = [path_of(cell) for cell in first_cells(layout_section(text))]
    assert paths == ["actors", "protocol/wire", "guest/image"]
