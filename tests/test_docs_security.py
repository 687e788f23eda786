"""docs/SECURITY.md's threat model ties each "cannot" to a test by name: every test it names must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITED = re.compile(r"`([\w/]+\.py)::(test_\w+)`")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_the_threat_model_names_exists() -> None:
    text = (ROOT / "docs" / "SECURITY.md").read_text(encoding="utf-8")
    section = text.split("## Threat model", 1)[1].split("\n## ", 1)[0]
    cited = CITED.findall(section)
    assert len(cited) >= 20, "the threat model names fewer tests than it should; was the table removed?"
    missing = [f"{file}::{name}" for file, name in cited
               if not (ROOT / "tests" / file).is_file() or name not in _tests_in(ROOT / "tests" / file)]
    assert missing == [], f"docs/SECURITY.md names tests that do not exist: {missing}"
