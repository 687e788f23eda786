"""Chinese by locale (issue 15): every user-facing string has a zh_CN entry; the locale or `[ui] language`
picks the language; `--json` stays English.

The check extracts the marked strings from the source with Babel (the same extraction scripts/i18n.sh runs)
and compares them with the committed zh_CN catalog, so a new string without its translation fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

from babel.messages.extract import extract_from_dir
from babel.messages.pofile import read_po

from edge_agent import i18n
from edge_agent.ui.strings import ADVICE, ALL_STRINGS, STUCK, page_strings

ROOT = Path(__file__).resolve().parents[1]
PO = ROOT / "edge_agent" / "locale" / "zh_CN" / "LC_MESSAGES" / "edge_agent.po"
TERMS = ("执法记录仪", "采集", "上传", "已同步", "告警", "可取走", "存储空间")


def extracted() -> set[str]:
    keywords = {"_": None, "N_": None, "gettext": None}
    found = extract_from_dir(str(ROOT / "edge_agent"), method_map=[("**.py", "python")], keywords=keywords)
    return {message for _file, _line, message, _comments, _context in found if isinstance(message, str)}


def zh_catalog() -> dict[str, str]:
    with open(PO, "rb") as f:
        catalog = read_po(f, locale="zh_CN")
    return {m.id: ("" if m.fuzzy else m.string) for m in catalog if m.id}


def test_every_user_facing_string_has_a_chinese_entry() -> None:
    strings = extracted()
    assert len(strings) > 100 and set(ALL_STRINGS) <= strings
    translated = zh_catalog()
    missing = sorted(s for s in strings if not translated.get(s))
    assert not missing, f"no zh_CN entry (run scripts/i18n.sh and translate in {PO.name}): {missing}"


def test_placeholders_survive_translation() -> None:
    for msgid, msgstr in zh_catalog().items():
        assert sorted(re.findall(r"{[^}]*}", msgid)) == sorted(re.findall(r"{[^}]*}", msgstr)), msgid


def test_no_string_is_marked_inside_an_f_string_where_babel_cannot_see_it() -> None:
    marked_in_fstring = re.compile(r"""f["'][^"'\n]*\{_\(""")
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "edge_agent").rglob("*.py")
                 if marked_in_fstring.search(p.read_text(encoding="utf-8"))]
    assert not offenders


def test_the_regulations_terms_are_used() -> None:
    chinese = "".join(zh_catalog().values())
    assert all(term in chinese for term in TERMS), [t for t in TERMS if t not in chinese]
    page = page_strings("zh_CN")
    assert page["Safe to take"] == "可取走" and page["Body-worn recorders"] == "执法记录仪"
    assert page["Alarms"] == "告警" and page["Storage"] == "存储空间" and page["All synced"] == "全部已同步"
    assert set(ADVICE) >= {"disk_high", "unsynced_overdue", "tamper"} and set(STUCK) == {
        "unidentified", "disk_full", "read_error"}


def test_the_locale_or_the_config_picks_the_language() -> None:
    assert i18n.language_from_env({"LANG": "zh_CN.UTF-8"}) == "zh_CN"
    assert i18n.language_from_env({"LANG": "en_US.UTF-8"}) == "en"
    assert i18n.language_from_env({"LC_ALL": "C", "LANG": "zh_CN.UTF-8"}) == "en"
    assert i18n.language_from_env({}) == "en"
    assert i18n.choose("zh_CN", {"LANG": "C"}) == "zh_CN"
    assert i18n.choose(None, {"LANG": "zh_CN.UTF-8"}) == "zh_CN"
    assert i18n.translations("zh_CN").gettext("Safe to take") == "可取走"
    assert i18n.translations("en").gettext("Safe to take") == "Safe to take"
