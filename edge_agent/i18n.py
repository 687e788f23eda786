"""The custodian's language: gettext catalogs (domain `edge_agent`) under edge_agent/locale, managed with
Babel (scripts/i18n.sh: extract, update, compile).

`use(language)` picks the catalog the human-facing strings of this process come from; `_` translates with it;
`N_` only marks a string for extraction (it is translated where it is shown). `--json` output and log lines
never go through here: they stay English and stable. A catalog not compiled yet (no .mo: setup has not run)
is read from its .po, so a checkout without a build still speaks Chinese.
"""

from __future__ import annotations

import ast
import gettext
import inspect
import io
import os
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path

DOMAIN = "edge_agent"
LOCALE_DIR = Path(__file__).parent / "locale"
LANGUAGES = ("en", "zh_CN")
ENGLISH = "en"

_active: gettext.NullTranslations = gettext.NullTranslations()
_language = ENGLISH


def language_from_env(environ: Mapping[str, str] | None = None) -> str:
    """`zh_CN` when the locale is Chinese (LC_ALL, LC_MESSAGES, LANG, LANGUAGE in gettext's order), else `en`."""
    env = os.environ if environ is None else environ
    for name in ("LANGUAGE", "LC_ALL", "LC_MESSAGES", "LANG"):
        value = env.get(name, "")
        if value:
            return "zh_CN" if value.split(":")[0].lower().startswith("zh") else ENGLISH
    return ENGLISH


def choose(configured: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The configured language (`[ui] language`) if set, else the locale's."""
    return configured if configured in LANGUAGES else language_from_env(environ)


@cache
def translations(language: str) -> gettext.NullTranslations:
    """The catalog of `language` (English: none, the msgids are English)."""
    if language == ENGLISH:
        return gettext.NullTranslations()
    messages = LOCALE_DIR / language / "LC_MESSAGES"
    mo, po = messages / f"{DOMAIN}.mo", messages / f"{DOMAIN}.po"
    if mo.exists() and (not po.exists() or mo.stat().st_mtime >= po.stat().st_mtime):
        with open(mo, "rb") as f:
            return gettext.GNUTranslations(f)
    if not po.exists():
        return gettext.NullTranslations()
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po

    with open(po, "rb") as f:
        catalog = read_po(f, locale=language)
    buffer = io.BytesIO()
    write_mo(buffer, catalog)
    buffer.seek(0)
    return gettext.GNUTranslations(buffer)


def use(language: str) -> None:
    """Translate this process's human-facing strings into `language` from now on."""
    global _active, _language
    _active, _language = translations(language), language


def language() -> str:
    """The language this process's human-facing strings are in (`use`)."""
    return _language


def _(message: str) -> str:
    return _active.gettext(message)


def N_(message: str) -> str:  # noqa: N802 - gettext's name for "mark for extraction only"
    return message


class Refusal(Exception):
    """A request refused, or settings that cannot be used, by any layer: `template` is English, marked with
    `N_` where it is raised, and its `{fields}` are filled from the keywords. `str()` is the English sentence
    (logs, `--json` runs, the daemon's control socket); `for_user()` the same in the custodian's language, or
    English where the catalog has no entry (or a translation's fields do not match the template's)."""

    def __init__(self, template: str, /, **values: object):
        super().__init__(template.format(**values) if values else template)
        self.template, self.values = template, values

    def for_user(self) -> str:
        translated = _(self.template)
        try:
            return translated.format(**self.values) if self.values else translated
        except (KeyError, IndexError, ValueError):
            return str(self)


def extract_with_help(fileobj: io.BufferedIOBase, keywords: Mapping[str, object], comment_tags: list[str],
                      options: dict[str, object]) -> Iterator[tuple[int, str, str, list[str]]]:
    """Babel's extraction method for edge_agent (babel.cfg): the strings marked with `_`/`N_`, and the texts
    Typer shows in `--help` without a marker: the docstring of every function decorated with `.command(...)` or
    `.callback(...)` (as `inspect.getdoc` gives it to Typer), and every literal `help="..."` argument."""
    from babel.messages.extract import extract_python

    source = fileobj.read()
    yield from extract_python(io.BytesIO(source), keywords, comment_tags, options)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr in ("command", "callback")
                for d in node.decorator_list):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield node.lineno, "N_", inspect.cleandoc(doc), []
        elif isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == "help" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                    yield kw.value.lineno, "N_", kw.value.value, []
