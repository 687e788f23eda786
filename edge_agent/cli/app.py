"""The custodian's command line (DESIGN.md section 7): the shared app and its helpers.

Commands live in the modules beside this one; each registers itself on `app`. A command parses its
arguments, calls `edge_agent.services` and renders what it returns: human output by default (rich tables,
progress bars), the result's `as_dict()` with `--json` for scripts. A service's `ServiceError` ends any
command with its message and exit code (`_Commands.invoke`).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from edge_agent import i18n
from edge_agent.config import AgentConfig, ConfigError, load_config, resolve_config_path
from edge_agent.i18n import N_, _
from edge_agent.services import ServiceError, Workspace

# Typer's and click's own words on a help screen, in the custodian's language too.
_TYPER_WORDS = {"ARGUMENTS_PANEL_TITLE": N_("Arguments"), "OPTIONS_PANEL_TITLE": N_("Options"),
                "COMMANDS_PANEL_TITLE": N_("Commands"), "DEFAULT_STRING": N_("[default: {}]"),
                "REQUIRED_LONG_STRING": N_("[required]"), "ERRORS_PANEL_TITLE": N_("Error"),
                "ABORTED_TEXT": N_("Aborted."),
                "RICH_HELP": N_("Try [blue]'{command_path} {help_option}'[/] for help.")}
HELP_OPTION = N_("Show this message and exit.")


class _HelpFormatter(typer.Context.formatter_class):   # Typer's own (vendored) click
    def write_usage(self, prog: str, args: str = "", prefix: str | None = None) -> None:
        super().write_usage(prog, args, _("Usage:") + " " if prefix is None else prefix)


class _Context(typer.Context):
    """A command's context whose usage line speaks the custodian's language (click's own "Usage:" does not)."""

    formatter_class = _HelpFormatter


def translate_help(command: TyperGroup) -> None:
    """Put every help text of `command` and its subcommands (docstrings, `help=`, Typer's panel titles, the usage
    line) through gettext. Typer fixes help texts when the app is built; this runs when the command line does, so
    `--help` speaks the custodian's language. The English texts are the msgids (scripts/i18n.sh extracts them).
    Help texts are plain text: escaped, so that `[store]` or `[mqtt]` is shown rather than taken for rich markup."""
    import typer.rich_utils

    for name, text in _TYPER_WORDS.items():
        setattr(typer.rich_utils, name, _(text))
    todo = [command]
    while todo:
        cmd = todo.pop()
        cmd.help = escape(_(cmd.help)) if cmd.help else cmd.help
        cmd.short_help = escape(_(cmd.short_help)) if cmd.short_help else cmd.short_help
        cmd.context_class = _Context
        help_option = cmd.get_help_option(typer.Context(cmd))
        for param in [*cmd.params, *([help_option] if help_option else [])]:
            text = getattr(param, "help", None)
            if text:
                param.help = escape(_(HELP_OPTION if param is help_option else text))  # type: ignore[attr-defined]
        if isinstance(cmd, TyperGroup):
            todo.extend(cmd.commands.values())


def configured_language(args: list[str]) -> str | None:
    """`[ui] language` of the agent config the command line names (or the default one), read before the command
    line is parsed so that `--help` follows it too; None when there is no such config or it does not load (the
    command itself reports that, in the locale's language)."""
    path = None
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            path = args[i + 1]
            break
        if arg.startswith("--config="):
            path = arg.removeprefix("--config=")
            break
    try:
        return load_config(resolve_config_path(path)).ui.language
    except (ConfigError, OSError, ValueError):
        return None


class _Run:
    """This run of the command line, for what prints outside a command's context (a refusal's `error:`)."""

    json = False


_run = _Run()


class _Commands(TyperGroup):
    """The root command group: every command runs inside its `invoke`, so a refusal is handled once here; its
    `main` puts the help texts in the custodian's language before anything is parsed."""

    def main(self, args: list[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        _run.json = False   # until the root callback has read --json
        i18n.use(i18n.choose(configured_language(sys.argv[1:] if args is None else list(args))))
        translate_help(self)
        return super().main(args, *rest, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ServiceError as exc:   # in the custodian's language; a --json run's in English, as its output
            fail(str(exc) if _run.json else exc.for_user(), code=exc.code)


app = typer.Typer(cls=_Commands, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="edge-agent: collect, seal and sync enforcement footage.")
console = Console()
err_console = Console(stderr=True)


@dataclass
class Options:
    config_path: Path
    json: bool


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines to whatever `sys.stderr` is when each is written, not to the stream it was at start: a command run
    in-process (a test's CliRunner, which swaps sys.stderr and closes its own after the command) must not leave the
    root logger writing to a closed stream for every later log line of the process."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


@app.callback()
def _global(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="agent.toml (default: $EDGE_AGENT_CONFIG "
                                                "or /etc/edge-agent/agent.toml)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log at debug level")] = False,
) -> None:
    # force: onvif-zeep-async calls basicConfig when imported, which would silently win over ours (and over --verbose).
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[StderrHandler()],
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True)
    ctx.obj = Options(config_path=resolve_config_path(config), json=as_json)
    _run.json = as_json
    i18n.use(i18n.language_from_env())   # human output in the custodian's language; --json and logs stay English


def options(ctx: typer.Context) -> Options:
    obj = ctx.find_root().obj
    assert isinstance(obj, Options)
    return obj


def load(ctx: typer.Context) -> AgentConfig:
    """The validated config, or exit 2 listing every problem."""
    try:
        config = load_config(options(ctx).config_path)
    except ConfigError as exc:
        fail(str(exc), code=2)
        raise AssertionError("unreachable") from exc
    if config.ui.language:
        i18n.use(config.ui.language)
    return config


def workspace(ctx: typer.Context) -> Workspace:
    """The validated config's workspace (catalog, layout, key opened on first use), closed when the command ends."""
    ws = Workspace(load(ctx), source=options(ctx).config_path)
    ctx.call_on_close(ws.close)
    return ws


def fail(message: str, code: int = 1) -> None:
    prefix = "error:" if _run.json else _("error:")   # --json runs stay English
    err_console.print(f"[red]{prefix}[/red] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def emit(ctx: typer.Context, data: Any, human: Any = None) -> None:
    """Print `data` as JSON with --json, else `human` (a rich renderable or text)."""
    if options(ctx).json:
        sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")
    else:
        console.print(human if human is not None else data)


# A file's state (catalog/states.py) and a dock slot's (sources/docks/slots.py) as a table shows them: in English the
# value itself (what --state takes), in Chinese what it means for the custodian. --json keeps the values.
STATE_WORDS = {
    "discovered": N_("discovered"), "staged": N_("staged"), "sealed": N_("sealed"), "sending": N_("sending"),
    "synced": N_("synced"), "source_cleared": N_("source_cleared"), "purged": N_("purged"),
    "rejected": N_("rejected"), "identifying": N_("identifying"), "ingesting": N_("ingesting"),
    "paused": N_("paused"), "done": N_("done"), "error": N_("error"), "undocked": N_("undocked"),
}


def state_word(state: str | None) -> str | None:
    """`state` in the reader's language (STATE_WORDS); a state this version does not know, as it is."""
    return _(STATE_WORDS[state]) if state in STATE_WORDS else state


def table(title: str | None, columns: list[str], rows: list[list[Any]], *, drop: list[str] | None = None,
          wrap: list[str] | None = None, width: int | None = None) -> Table:
    """A list view that fits the terminal: columns named in `drop` are left out, first ones first, until
    the table fits `width` (the console's). Cells never wrap but those of the prose columns named in `wrap` (a
    message, what to do), which wrap within the width the others leave them (at least WRAP_MIN cells). Columns
    not in `drop` are always shown (then a cell that cannot fit is folded rather than cut: an id or a state is
    never truncated)."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    shown = list(range(len(columns)))
    limit = width or console.width
    prose = {columns.index(name) for name in wrap or []}

    def needed(indexes: list[int]) -> int:   # rich's default box: a border and one space each side per column
        natural = {i: max([cell_len(columns[i]), *(cell_len(row[i]) for row in cells)]) for i in indexes}
        return sum((min(natural[i], WRAP_MIN) if i in prose else natural[i]) + 3 for i in indexes) + 1

    for name in drop or []:
        if needed(shown) <= limit:
            break
        shown.remove(columns.index(name))
    fits = needed(shown) <= limit
    out = Table(title=title, title_justify="left", header_style="bold")
    for i in shown:
        out.add_column(columns[i], no_wrap=fits and i not in prose, overflow="fold")
    for row in cells:
        out.add_row(*[row[i] for i in shown])
    return out


WRAP_MIN = 24   # cells a wrapping prose column keeps at least


def fmt_ms(ms: int | None) -> str:
    if ms is None:
        return ""
    return datetime.fromtimestamp(ms / 1000).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def main() -> None:
    # `--json` is global, but custodians write it after the command (`keys show --json`): accept both.
    args = sys.argv[1:]
    if "--json" in args[1:]:
        args.remove("--json")
        args.insert(0, "--json")
    app(args=args, prog_name="edge-agent")
