"""Chinese by locale (issue 15): every user-facing string has a zh_CN entry; the locale or `[ui] language`
picks the language; `--help` speaks it too; `--json` stays English and byte-identical.

The check extracts the marked strings from the source with Babel (the same extraction scripts/i18n.sh runs,
babel.cfg's method map) and compares them with the committed zh_CN catalog, so a new string without its
translation fails here; every help text of the built command tree must be among them.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import typer.main
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.pofile import read_po
from rich.cells import cell_len
from typer.testing import CliRunner

from edge_agent import i18n
from edge_agent.cli import app
from edge_agent.cli.fleet import status_lines
from edge_agent.ui.strings import ADVICE, ALL_STRINGS, STUCK, page_strings
from tests.helpers import agent_config, make_recorder_volume

ROOT = Path(__file__).resolve().parents[1]
PO = ROOT / "edge_agent" / "locale" / "zh_CN" / "LC_MESSAGES" / "edge_agent.po"
TERMS = ("执法记录仪", "采集", "上传", "已同步", "告警", "可取走", "存储空间")


def extracted() -> set[str]:
    keywords = {"_": None, "N_": None, "gettext": None}
    with open(ROOT / "babel.cfg", encoding="utf-8") as cfg:
        method_map, options_map = parse_mapping_cfg(cfg)
    found = extract_from_dir(str(ROOT), method_map=method_map, options_map=options_map, keywords=keywords)
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


CJK = re.compile(r"[\u4e00-\u9fff]")


def help_texts(command: click.Command) -> set[str]:
    """Every help text of the command tree as Typer builds it (English: nothing has translated it yet)."""
    texts, todo = set(), [command]
    while todo:
        cmd = todo.pop()
        texts |= {t for t in (cmd.help, cmd.short_help) if t}
        texts |= {p.help for p in cmd.params if getattr(p, "help", None)}  # type: ignore[attr-defined]
        todo.extend(getattr(cmd, "commands", {}).values())
    return texts


def test_every_help_text_is_extracted_and_has_a_chinese_entry() -> None:
    texts = help_texts(typer.main.get_command(app))
    assert len(texts) > 80 and "List and inspect collected files." in texts
    unmarked = sorted(texts - extracted())
    assert not unmarked, f"a --help text Babel does not extract (an f-string? a computed help=): {unmarked}"
    translated = zh_catalog()
    assert not sorted(t for t in texts if not translated.get(t))


def run_cli(*args: str, lang: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LANG": lang, "LC_ALL": "", "LC_MESSAGES": "", "LANGUAGE": "", "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60, check=True)


def test_help_is_chinese_under_a_chinese_locale_and_english_otherwise() -> None:
    zh_root, zh_files = (run_cli(*a, "--help", lang="zh_CN.UTF-8").stdout for a in ((), ("files",)))
    en_root, en_files = (run_cli(*a, "--help", lang="C.UTF-8").stdout for a in ((), ("files",)))
    assert "采集、封存并同步执法音视频" in zh_root and "执法记录仪" in zh_root and "选项" in zh_root
    assert "列出并查看已采集的文件" in zh_files and "显示此帮助并退出" in zh_files and "命令" in zh_files
    assert "用法：" in zh_files and "Usage:" not in zh_root + zh_files and "Usage:" in en_files
    assert "collect, seal and sync enforcement footage" in en_root and "Options" in en_root
    assert "List and inspect collected files." in en_files and "Show this message and exit." in en_files
    assert not CJK.search(en_root + en_files)
    fleet = run_cli("fleet", "status", "--help", lang="C.UTF-8").stdout   # plain text, not taken for rich markup
    assert "fleet.toml ([mqtt] and [fleet];" in fleet and "[mqtt] 和 [fleet]" in run_cli(
        "fleet", "status", "--help", lang="zh_CN.UTF-8").stdout


def test_help_follows_the_configured_language_under_an_english_locale(tmp_path: Path) -> None:
    (tmp_path / "zh").mkdir(), (tmp_path / "en").mkdir()
    chinese, _ = agent_config(tmp_path / "zh", ui={"language": "zh_CN"})
    english, _ = agent_config(tmp_path / "en", ui={"language": "en"})
    assert "列出并查看已采集的文件" in run_cli("--config", str(chinese), "files", "--help", lang="C.UTF-8").stdout
    assert "List and inspect" in run_cli(f"--config={english}", "files", "--help", lang="zh_CN.UTF-8").stdout


def test_json_output_is_byte_identical_in_both_locales(tmp_path: Path) -> None:
    config_path, _ = agent_config(tmp_path)
    card = make_recorder_volume(tmp_path, "SDCARD", {"DCIM/100/MOV_0001.MP4": 4_000})
    run_cli("--config", str(config_path), "--json", "import", str(card), "--device", "ZFY0777", "--reason", "test",
            lang="C.UTF-8")
    for args in (("config", "check"), ("keys", "show"), ("files", "list", "--all"), ("devices", "list"),
                 ("alarms", "list"), ("holds",)):
        english = run_cli("--config", str(config_path), "--json", *args, lang="C.UTF-8").stdout
        chinese = run_cli("--config", str(config_path), "--json", *args, lang="zh_CN.UTF-8").stdout
        assert english == chinese and not CJK.search(english), args
        json.loads(english)


@pytest.fixture
def english_afterwards() -> Iterator[None]:
    yield
    i18n.use(i18n.ENGLISH)   # this process's human output: the next test expects English


def cli(config_path: Path, *args: str, lang: str) -> str:
    env = {"LANG": lang, "LC_ALL": "", "LC_MESSAGES": "", "LANGUAGE": ""}
    result = CliRunner().invoke(app, ["--config", str(config_path), *args], env=env)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_custodian_commands_speak_chinese_under_a_chinese_locale(tmp_path: Path, english_afterwards: None) -> None:
    config_path, _ = agent_config(tmp_path)
    card = make_recorder_volume(tmp_path, "SDCARD", {"DCIM/100/MOV_0001.MP4": 4_000})
    cli(config_path, "--json", "import", str(card), "--device", "ZFY0777", "--reason", "test", lang="C.UTF-8")
    file_id = json.loads(cli(config_path, "--json", "files", "list", lang="C.UTF-8"))["files"][0]["file_id"]
    assert cli(config_path, "hold", file_id, "--reason", "test", lang="C.UTF-8").startswith(f"Held {file_id}")
    expected = {("hold", file_id, "--reason", "案件"): f"已保全 {file_id}",
                ("holds",): "生效中的保全",
                ("tag", file_id, "--case", "A-1"): "已标记 1 个文件",
                ("release", file_id, "--reason", "结案"): "已解除",
                ("audit", "show"): "审计日志",
                ("audit", "verify"): "哈希链完整",
                ("keys", "show"): "密钥编号",
                ("config", "check"): "个采集站",
                ("devices", "locations"): "摄像机位置",
                ("sync", "now"): "等待上传",
                ("status",): "已封存待上传",                # a file's state, in words (sealed)
                ("files", "list"): "已封存待上传"}
    for args, chinese in expected.items():
        out = cli(config_path, *args, lang="zh_CN.UTF-8")
        assert chinese in out, (args, out)
    assert "│ sealed" in cli(config_path, "files", "list", lang="C.UTF-8")   # English: the value --state takes


def refusal(config_path: Path, *args: str, lang: str) -> str:
    """What a failing command prints (stderr), checked to have failed."""
    env = {"LANG": lang, "LC_ALL": "", "LC_MESSAGES": "", "LANGUAGE": "", "COLUMNS": "200"}
    result = CliRunner().invoke(app, ["--config", str(config_path), *args], env=env)
    assert result.exit_code != 0, result.output
    return " ".join(result.stderr.split())


def test_refusals_are_chinese_under_a_chinese_locale_and_english_with_json(tmp_path: Path,
                                                                           english_afterwards: None) -> None:
    config_path, _ = agent_config(tmp_path)
    zh, en = "zh_CN.UTF-8", "C.UTF-8"
    assert "没有文件目录库：采集服务尚未以此配置运行过" in refusal(config_path, "files", "list", lang=zh)
    assert "the agent has not run with this config yet" in refusal(config_path, "--json", "files", "list", lang=zh)
    not_a_folder = str(tmp_path / "agent.toml")
    assert f"错误： {not_a_folder} 不是文件夹" in refusal(config_path, "import", not_a_folder, "--device", "ZFY0777",
                                                       "--reason", "test", lang=zh)
    card = make_recorder_volume(tmp_path, "SDCARD", {"DCIM/100/MOV_0001.MP4": 4_000})
    cli(config_path, "--json", "import", str(card), "--device", "ZFY0777", "--reason", "test", lang=en)
    chinese = refusal(config_path, "files", "show", "ZZZZ", lang=zh)
    assert "文件目录库中没有编号为 'ZZZZ' 的文件" in chinese and "in the catalog" not in chinese
    assert "no file with id 'ZZZZ' in the catalog" in refusal(config_path, "files", "show", "ZZZZ", lang=en)
    english = refusal(config_path, "--json", "files", "show", "ZZZZ", lang=zh)
    assert "no file with id 'ZZZZ' in the catalog" in english and not CJK.search(english)
    assert "没有键为 'nope' 的未处理告警" in refusal(config_path, "alarms", "clear", "nope", "--reason", "查过",
                                                 lang=zh)


def test_lower_layers_refusals_are_chinese_under_a_chinese_locale_and_english_with_json(
        tmp_path: Path, english_afterwards: None) -> None:
    """Holds, custody and export refuse in their own layers (HoldError, CustodyError, ExportError): the custodian
    reads their reasons in Chinese, with the file id or case filled in; scripts read the English sentence."""
    config_path, _ = agent_config(tmp_path)
    zh, en = "zh_CN.UTF-8", "C.UTF-8"
    card = make_recorder_volume(tmp_path, "SDCARD", {"DCIM/100/MOV_0001.MP4": 4_000})
    cli(config_path, "--json", "import", str(card), "--device", "ZFY0777", "--reason", "test", lang=en)
    file_id = json.loads(cli(config_path, "--json", "files", "list", lang=en))["files"][0]["file_id"]
    chinese = refusal(config_path, "release", file_id, "--reason", "结案", lang=zh)
    assert f"无可解除：{file_id} 没有生效中的保全" in chinese and not re.search(r"[A-Za-z]{4,} [a-z]{3,}", chinese)
    english = refusal(config_path, "--json", "release", file_id, "--reason", "closed", lang=zh)
    assert f"nothing to release: no active hold on {file_id}" in english and not CJK.search(english)
    assert "--retention 必须是 routine, evidence, long_term 之一，收到的是 'forever'" in refusal(
        config_path, "tag", file_id, "--retention", "forever", lang=zh)
    assert "没有文件标记为案件 'NOPE'" in refusal(config_path, "export", "--case", "NOPE", "--to",
                                             str(tmp_path / "bag"), "--reason", "移送", "--approved-by", "张队",
                                             lang=zh)
    assert "A-9 未被领用" in refusal(config_path, "return", "A-9", lang=zh)


def test_every_refusal_is_raised_with_a_marked_template() -> None:
    """A `Refusal` (ServiceError and every lower layer's: HoldError, StoreConfigError, ...) raised with an
    f-string would reach the custodian in English whatever the locale: each must be raised with `N_("...")`
    (or a module constant holding one) and its fields as keywords."""
    trees = {path: ast.parse(path.read_text(encoding="utf-8")) for path in (ROOT / "edge_agent").rglob("*.py")}
    refusals, grown = {"Refusal"}, True
    while grown:   # every class whose base is a refusal, in any module
        before = len(refusals)
        refusals |= {node.name for tree in trees.values() for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                     and any(isinstance(base, ast.Name) and base.id in refusals for base in node.bases)}
        grown = len(refusals) > before
    assert {"ServiceError", "HoldError", "CustodyError", "ExportError", "StoreConfigError"} <= refusals
    unmarked, raised = [], 0
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name) \
                    and node.exc.func.id in refusals:
                raised += 1
                first = node.exc.args[0] if node.exc.args else None
                if not (isinstance(first, ast.Name) or isinstance(first, ast.Call)
                        and isinstance(first.func, ast.Name) and first.func.id == "N_"):
                    unmarked.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert raised > 50 and not unmarked, unmarked


def alarm_kinds_raised() -> set[str]:
    """Every alarm kind the agent's code raises: the kind argument of each `raise_alarm(key, kind, ...)`,
    `Alarm(key, kind, ...)` and `_set(active, key, kind, ...)` call, as a literal or a module constant, with
    the two families built at run time (a camera's picture checks, its ONVIF tamper events) added from their
    tables. A call whose kind cannot be resolved must be one of the generic helpers listed here."""
    constants: dict[str, str] = {}
    arguments: list[tuple[str, ast.expr]] = []
    for path in (ROOT / "edge_agent").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants |= {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                      and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                      for target in node.targets if isinstance(target, ast.Name)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            at = {"raise_alarm": 1, "Alarm": 1, "_set": 2}.get(name or "")
            if at is not None and len(node.args) > at:
                arguments.append((str(path.relative_to(ROOT)), node.args[at]))
    kinds, generic = set(), []
    for path, argument in arguments:
        if isinstance(argument, ast.Constant):
            kinds.add(argument.value)
        elif isinstance(argument, ast.Name) and argument.id in constants:
            kinds.add(constants[argument.id])
        else:
            generic.append((path, ast.unparse(argument)))
    assert sorted(generic) == sorted([
        ("edge_agent/catalog/files.py", "columns"), ("edge_agent/catalog/files.py", "columns"),   # not alarms
        ("edge_agent/ops/alarms.py", "kind"), ("edge_agent/ops/alarms.py", "alarm['kind']"),      # pass-through
        ("edge_agent/sources/cameras/worker.py", "f'camera_{check}'"),
        ("edge_agent/sources/cameras/onvif_watch.py", "kind"), ("edge_agent/sources/docks/policy.py", "self.kind")])
    from drivers.image_checks import CHECKS
    from edge_agent.sources.cameras.onvif_watch import TAMPER
    return kinds | {f"camera_{check}" for check in CHECKS} | {kind for _, _, kind, _ in TAMPER}


def test_every_alarm_kind_tells_the_custodian_what_to_do_in_chinese() -> None:
    """`alarms list`, `status` and the page's banner show, in Chinese, what to do about an alarm by its kind: a
    kind raised somewhere without advice would fall back to the daemon's English sentence."""
    from edge_agent.services.alarms import ADVICE

    kinds = alarm_kinds_raised()
    assert {"tamper", "disk_full", "camera_frozen", "camera_scene_changed", "gb28181_unregistered"} <= kinds
    assert kinds - set(ADVICE) == set()
    i18n.use("zh_CN")
    try:
        assert all(CJK.search(i18n._(ADVICE[kind])) for kind in kinds)
    finally:
        i18n.use("en")


def test_fleet_status_columns_line_up_in_chinese(english_afterwards: None) -> None:
    result = {"agents": 2, "counts": {"offline": 1, "stale": 0, "r1_breach": 0, "regressed": 0, "with_problems": 1},
              "fleet": [{"agent_id": "ws-01", "online": False, "stale": False, "problems": ["offline for 2h"],
                         "figures": {"queue_files": 3, "oldest_unsynced_age_s": 7200, "disk_used_percent": 41.0,
                                     "cameras_connected": 1, "cameras": 2}}]}
    i18n.use("en")
    english = status_lines(result)
    i18n.use("zh_CN")
    chinese = status_lines(result)
    assert english[1] == "AGENT              STATE   BACKLOG      DISK CAMS  PROBLEM"
    assert chinese[0].startswith("2 个采集端：1 个离线") and chinese[2].startswith("ws-01              离线    3 2.0h")
    for line in (english, chinese):   # each heading starts where its column does
        header, row = line[1], line[2]
        starts = [cell_len(header[:header.index(word)]) for word in header.split()]
        assert starts == [0, 19, 27, 40, 45, 51], header
        assert cell_len(row[:row.index("3 2.0h")]) == 27 and cell_len(row[:row.index("1/2")]) == 45


def unmarked_prose(source: str) -> list[str]:
    """String literals of `source` that read as English prose (two words) but Babel does not extract: not inside
    `_()`/`N_()`, not a `help=` argument, not a docstring."""
    tree = ast.parse(source)
    extracted_nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("_", "N_"):
            extracted_nodes |= {id(n) for n in ast.walk(node)}
        elif isinstance(node, ast.keyword) and node.arg == "help":
            extracted_nodes |= {id(n) for n in ast.walk(node.value)}
        elif isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) and ast.get_docstring(node) is not None:
            extracted_nodes.add(id(node.body[0].value))  # type: ignore[attr-defined]
    prose = re.compile(r"[A-Za-z]{2,},? [A-Za-z]{2,}")
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in extracted_nodes and prose.search(node.value)]


def test_no_human_facing_cli_string_is_left_unmarked() -> None:
    found = {str(p.relative_to(ROOT)): unmarked_prose(p.read_text(encoding="utf-8"))
             for p in sorted((ROOT / "edge_agent" / "cli").glob("*.py"))}
    assert not {path: texts for path, texts in found.items() if texts}, "mark them with _() or N_()"
    assert unmarked_prose('fail(f"--at {text!r} is not a time")\nfail(_("no such file"))') == [" is not a time"]


def test_every_file_and_dock_slot_state_has_its_words_and_files_list_names_each_file_state() -> None:
    """STATE_WORDS and `files list --state`'s help spell the states out (Babel extracts only literals): a state
    added to the catalog or to a dock slot without its words would be shown raw to a custodian reading Chinese."""
    from edge_agent.catalog.states import State
    from edge_agent.cli.app import STATE_WORDS
    from edge_agent.sources.docks.slots import SlotState

    assert set(STATE_WORDS) == {s.value for s in State} | {s.value for s in SlotState}
    command = typer.main.get_command(app)
    files_list = command.commands["files"].commands["list"]   # type: ignore[attr-defined]
    state_help = next(p.help for p in files_list.params if p.name == "state")
    assert set(re.findall(r"[a-z_]+", state_help.split(":", 1)[1])) == {s.value for s in State}
