"""The `Workspace`: one agent's config with its catalog, store layout and signing key; `ServiceError`, the
one exception a service raises for a request it refuses (its message says what to do instead); and
`Result`, what a service's dataclasses share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, fields, is_dataclass
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any

from edge_agent.atrest import AtRest
from edge_agent.catalog import Catalog, UnknownFile
from edge_agent.catalog.reports import CatalogReports
from edge_agent.config import AgentConfig
from edge_agent.evidence.manifest import AgentKey
from edge_agent.i18n import N_, Refusal
from edge_agent.ingest import Sealer
from edge_agent.layout import StoreLayout

FILE_ID_LENGTH = 26    # a ULID
SHORT_ID_LENGTH = 10   # what list views show of it (a unique prefix is accepted wherever an id is taken)


class Result:
    """Base of a service's frozen dataclasses: `as_dict()` is the fields in order as JSON-ready values (nested
    results by their `as_dict()`, tuples as lists, paths as strings), the `--json` form of the result."""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}


def plain(value: Any) -> Any:
    """`value` as JSON-ready data (see `Result`)."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class ServiceError(Refusal):
    """A request the service refuses or cannot do, `code` the exit status to use. `message` is English: a
    template marked with `N_` whose `{fields}` are filled from the keywords (edge_agent.i18n.Refusal: `str()`
    in English, `for_user()` in the custodian's language). A lower layer's `Refusal` becomes one with its own
    template and fields (`refusals`, `ServiceError.of`), so it is translated too."""

    def __init__(self, message: str, *, code: int = 1, **values: object):
        super().__init__(message, **values)
        self.code = code

    @classmethod
    def of(cls, exc: Exception, *, code: int = 1) -> ServiceError:
        """A lower layer's refusal as a ServiceError: its template and fields when it is a `Refusal`, else its
        English sentence as it is."""
        if isinstance(exc, Refusal):
            return cls(exc.template, code=code, **exc.values)
        return cls(str(exc), code=code)


# The refusal of a command the daemon owning the data dir should have carried out but cannot take now.
TAKES_NO_REQUESTS = N_("{owner}. It takes no requests ({error}): if it is an `edge-agent run` starting up, try "
                       "again in a moment; else wait for it to end")


class NoCatalog(ServiceError):
    """The config's data dir has no catalog: the agent never ran with it."""


@contextmanager
def refusals(*kinds: type[Exception]) -> Iterator[None]:
    """Turn the domain's refusals (`UnknownFile`, `HoldError`, ...) into `ServiceError`, same message."""
    try:
        yield
    except UnknownFile as exc:
        if UnknownFile not in kinds:
            raise
        raise ServiceError(N_("no file with id {file_id!r} in the catalog (see: edge-agent files list)"),
                           file_id=exc.args[0]) from exc
    except kinds as exc:
        raise ServiceError.of(exc) from exc


def store_layout(config: AgentConfig) -> StoreLayout:
    """The data dir's layout with the store's encryption setting and key (`[store]`, edge_agent/atrest.py)."""
    store = config.store
    return StoreLayout(config.agent.data_dir, AtRest(store.encrypt, store.key_file, config.agent.data_dir))


class Workspace:
    """What a service works on. Each part is opened on first use and then kept, so a caller that only
    shows the key never opens the catalog, and one that never touched the catalog never fails for its
    absence. `close()` (or `with`) closes the catalog if it was opened. One per command or request: the
    lazy opening is not locked, so threads do not share a workspace.

    `source` names where the config came from, for messages (e.g. the config file's path)."""

    def __init__(self, config: AgentConfig, *, source: str | Path = "the config"):
        self.config = config
        self.source = source

    @cached_property
    def catalog(self) -> Catalog:
        path = self.config.catalog_path
        if not path.exists():
            raise NoCatalog(N_("no catalog at {path}: the agent has not run with this config yet (edge-agent run)"),
                            path=path)
        return Catalog(path)

    @cached_property
    def layout(self) -> StoreLayout:
        return store_layout(self.config)

    @cached_property
    def key(self) -> AgentKey:
        """The agent's signing key (created on first use, as the daemon would)."""
        return AgentKey.load_or_create(self.layout.keys, self.config.crypto.suite)

    @cached_property
    def sealer(self) -> Sealer:
        """Signs documents into the agent's chain with the current key."""
        return Sealer(self.catalog, self.key, self.layout, self.config)

    @cached_property
    def reports(self) -> CatalogReports:
        return CatalogReports(self.catalog)

    def file_id(self, text: str) -> str:
        """The file a custodian means by `text`: an id, or a unique prefix of one (list views show 10
        characters); a prefix of several is refused naming them. Unknown text is returned as given, for the
        caller's own "no such file"."""
        text = text.strip().upper()   # ULIDs are upper case; a custodian may type them in lower case
        if len(text) == FILE_ID_LENGTH:
            return text
        matches = self.reports.file_ids_with_prefix(text, limit=3)
        if len(matches) > 1:
            raise ServiceError(N_("{prefix!r} is the start of several file ids ({ids}): give more of the id"),
                               prefix=text, ids=", ".join(matches[:2]) + (", ..." if len(matches) > 2 else ""))
        return matches[0] if matches else text

    def short_ids(self, file_ids: list[str]) -> dict[str, str]:
        """Each id's shortest prefix of at least `SHORT_ID_LENGTH` characters that no other file shares, as
        list views show it. ULIDs made in the same millisecond share their first 10 characters and, being
        monotonic, nearly all the rest: files of one batch show most of their id."""
        shortest = {}
        for file_id in file_ids:
            n = SHORT_ID_LENGTH
            while n < len(file_id) and len(self.reports.file_ids_with_prefix(file_id[:n], limit=2)) > 1:
                n += 1
            shortest[file_id] = file_id[:n]
        return shortest

    def close(self) -> None:
        if "catalog" in self.__dict__:
            self.catalog.close()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
