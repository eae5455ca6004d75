"""The README's claims table says what results/reproduction/claims.md says: the same claims in the same order,
each with the same paired difference and interval and the same verdict (issue 24: a test compares them)."""
from __future__ import annotations

import re

from tests.conftest import ROOT


def table_rows(text: str) -> list[list[str]]:
    """The cells of the first markdown table in `text` (header and separator dropped)."""
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows[1:] if not row.startswith("|---")]


def section(text: str, heading: str) -> str:
    return text.split(heading, 1)[1].split("\n## ", 1)[0]


def evidence(ours: str) -> str:
    """What a row's 'Ours' cell asserts: its paired difference with interval, or its count of differences."""
    found = re.search(r"Δ [+-−]?\d+\.\d \[[^\]]+\]", ours) or re.search(r"\d+ paired differences", ours)
    assert found, ours
    return found.group(0).replace("−", "-")


def test_readme_claims_table_matches_claims_md():
    readme = table_rows(section((ROOT / "README.md").read_text(), "## The paper's claims"))
    claims = table_rows((ROOT / "results/reproduction/claims.md").read_text())
    assert len(readme) == len(claims) >= 10
    for ours, theirs in zip(readme, claims):
        assert ours[-1] == theirs[-1], (ours[0], ours[-1], theirs[-1])
        assert evidence(ours[2]) == evidence(theirs[2]), ours[0]
