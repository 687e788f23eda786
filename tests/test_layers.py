"""Layering rules checked on the source tree.

The catalog (`edge_agent/catalog/`) is the only code that speaks SQL: everything else calls a repository
method. The detector reads each module's syntax tree (not its raw text, so docstrings and comments may
talk about SQL) and flags string literals that read as SQL, `.execute(...)`-style calls and SQL fragments
handed to `catalog.files(where=..., order=...)`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("edge_agent", "drivers")
CATALOG = ROOT / "edge_agent" / "catalog"

SQL_TEXT = re.compile(
    r"\bSELECT\s|\bINSERT\s+(OR\s+\w+\s+)?INTO\b|\bUPDATE\s+\w+\s+SET\b|\bDELETE\s+FROM\b"
    r"|\bCREATE\s+((UNIQUE\s+)?INDEX|TABLE|VIEW|TRIGGER)\b|\bDROP\s+(TABLE|INDEX)\b|\bALTER\s+TABLE\b"
    r"|\bPRAGMA\b|\bINDEXED\s+BY\b|\sWHERE\s|\bORDER\s+BY\b|\bGROUP\s+BY\b|\bCOALESCE\(|\bCOUNT\(\*\)"
)
EXECUTE_CALLS = frozenset({"execute", "executemany", "executescript"})
SQL_KEYWORD_ARGS = frozenset({"where", "order"})

# Files the catalog helper owns and cleaned: they must stay free of SQL from now on.
CLEANED = (
    "edge_agent/ops/custody.py", "edge_agent/evidence/export.py", "edge_agent/evidence/scrub.py",
    "edge_agent/evidence/verify.py", "edge_agent/ops/alarms.py", "edge_agent/ops/retention.py",
    "edge_agent/sync/commands.py",
)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (prose, may mention SQL)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _literal_text(node: ast.AST) -> str | None:
    """The text of a string literal; an f-string's literal parts with `{}` for each placeholder."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)  # type: ignore[misc]
    return None


def sql_hits(source: str, name: str = "<source>") -> list[tuple[int, str]]:
    """(line, what) for each place in `source` that speaks SQL."""
    tree = ast.parse(source, filename=name)
    docstrings = _docstrings(tree)
    inner: set[int] = set()  # the constant parts of an f-string, reported once with the f-string
    hits: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            inner.update(id(v) for v in node.values)
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in EXECUTE_CALLS:
                hits.append((node.lineno, f".{func.attr}(...) call"))
            hits.extend((kw.value.lineno, f"SQL fragment passed as {kw.arg}=") for kw in node.keywords
                        if kw.arg in SQL_KEYWORD_ARGS and _literal_text(kw.value) is not None)
    for node in ast.walk(tree):
        if id(node) in docstrings or id(node) in inner:
            continue
        text = _literal_text(node)
        if text is not None and (match := SQL_TEXT.search(text)):
            hits.append((node.lineno, f"SQL text {match.group(0).strip()[:40]!r}"))
    return sorted(set(hits))


def tree_hits() -> list[str]:
    """'path:line: what' for every place outside the catalog that speaks SQL."""
    out = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.is_relative_to(CATALOG):
                continue
            rel = path.relative_to(ROOT).as_posix()
            out.extend(f"{rel}:{line}: {what}" for line, what in sql_hits(path.read_text("utf-8"), rel))
    return out


def test_detector_flags_sql() -> None:
    planted = '''
"""Docstrings may say SELECT * FROM files WHERE state = 'x' ORDER BY id."""
def f(catalog, conn, n):
    rows = catalog.query("SELECT COUNT(*) FROM files")          # 4
    conn.execute("PRAGMA user_version")                          # 5
    catalog.query(f"SELECT * FROM files LIMIT {n}")              # 6
    catalog.query("UPDATE files"
                  " SET state = ?")                              # 7
    catalog.files(where="file_id > ?", params=(n,))              # 9
    x = "DELETE FROM outbox"                                     # 10
    y = f"{n} WHERE {n}"                                         # 11
    return "select a file, then update it"                       # prose, not SQL
'''
    assert [line for line, _ in sql_hits(planted)] == [4, 5, 5, 6, 7, 9, 10, 11]


def test_detector_leaves_plain_code() -> None:
    plain = '''
def f(catalog, pool):
    pool.submit(len, "x")
    return catalog.files.of_case("case 7"), "Update the firmware, then select a slot"
'''
    assert sql_hits(plain) == []


def test_no_sql_in_cleaned_files() -> None:
    """The files already moved onto catalog repositories stay that way."""
    hits = [h for h in tree_hits() if h.split(":", 1)[0] in CLEANED]
    assert not hits, "SQL outside edge_agent/catalog/ (add a repository method):\n" + "\n".join(hits)


def test_no_sql_outside_catalog() -> None:
    hits = tree_hits()
    assert not hits, "SQL outside edge_agent/catalog/ (add a repository method):\n" + "\n".join(hits)
