"""The documentation's pages as text, for the tests that check the figures printed there
against the code and the committed JSON: a page that drifts from what it describes (or the
code from the page) fails a test."""
from __future__ import annotations

from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@cache
def page(name: str) -> str:
    """The Markdown of docs/<name> ("export.md"), or of README.md."""
    return (ROOT / name if name == "README.md" else DOCS / name).read_text()


def flat(name: str) -> str:
    """The page with its line breaks as spaces, for sentences wrapped across lines."""
    return page(name).replace("\n", " ")


def table_rows(name: str, header_start: str) -> list[list[str]]:
    """The body rows of the table on page `name` whose header line starts with
    `header_start`, as lists of stripped cells."""
    lines = page(name).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:  # past the header and the --- line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def agrees(printed: str, measured: float) -> bool:
    """`measured` rounds to `printed` at the precision it is printed with ("4.28", "22.7")."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return f"{measured:.{decimals}f}" == printed
