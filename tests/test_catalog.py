"""The catalog package: state sets, schema and migrations, repositories, and the rule that only
`transition` moves a file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edge_agent.catalog import Catalog, State, TransitionError, schema, states
from edge_agent.catalog.docking import DockingRecords
from edge_agent.catalog.files import Backlog


def _discover(catalog: Catalog, name: str = "a.mp4", **kwargs: object):
    return catalog.discover(kind="recorder", device_id="dev1", original_path=f"/DCIM/{name}", source_path=None,
                            source_size=10, source_mtime_ns=1, **kwargs)


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    c = Catalog(tmp_path / "catalog.sqlite")
    yield c
    c.close()


# -- states ---------------------------------------------------------------------------------------


def test_named_state_sets() -> None:
    assert states.UNSYNCED == {"discovered", "staged", "sealed", "sending", "rejected"}
    assert states.SYNC_QUEUE == {"sealed", "sending"} and states.SYNC_QUEUE <= states.UNSYNCED
    assert states.STORED == {"staged", "sealed", "sending", "synced", "source_cleared", "rejected"}
    assert states.PURGEABLE_STATES == {"synced", "source_cleared"}
    assert not (states.CONFIRMED & states.UNSYNCED) and states.CONFIRMED | states.UNSYNCED == set(State)
    assert states.SEALED_STATES == set(State) - {"discovered", "staged"}
    assert set(states.TRANSITIONS) == set(State)


def test_sql_fragments_keep_the_text_of_existing_partial_indexes() -> None:
    # Catalogs made before the renovation hold partial indexes with exactly this WHERE text; SQLite only
    # uses (and INDEXED BY only accepts) them when a query repeats it term for term.
    assert states.STORED_FILES == ("state IN ('staged', 'sealed', 'sending', 'synced', 'source_cleared', 'rejected')"
                            " AND store_path IS NOT NULL")
    assert states.state_in(states.SYNC_QUEUE) == "state IN ('sealed', 'sending')"


# -- files ----------------------------------------------------------------------------------------


def test_update_refuses_state(catalog: Catalog) -> None:
    record, _ = _discover(catalog)
    with pytest.raises(TransitionError, match="transition"):
        catalog.update(record.file_id, state="synced", last_error="x")
    with pytest.raises(TransitionError, match="transition"):
        catalog.files.update(record.file_id, state=State.SEALED)
    after = catalog.get(record.file_id)
    assert (after.state, after.last_error) == ("discovered", None)
    catalog.update(record.file_id, last_error="disk hiccup", attempts=2)
    assert (catalog.get(record.file_id).last_error, catalog.get(record.file_id).attempts) == ("disk hiccup", 2)


def test_backlog_and_unsynced(catalog: Catalog) -> None:
    a, _ = _discover(catalog)
    _discover(catalog, "b.mp4")
    catalog.transition(a.file_id, State.STAGED, size=7, ingested_at_ms=5)
    # The stored size where there is one (a), else the source's (b); the oldest is the first to reach the agent.
    assert catalog.files.backlog(states.UNSYNCED) == Backlog(files=2, bytes=7 + 10, oldest_ms=5)
    assert catalog.files.backlog(states.SYNC_QUEUE) == Backlog(files=0, bytes=0, oldest_ms=None)
    assert catalog.files.unsynced_since(5) == (1, 5)
    assert catalog.files.state_of(a.file_id) == State.STAGED and catalog.files.state_of("nope") is None


def test_update_refuses_unknown_columns(catalog: Catalog) -> None:
    record, _ = _discover(catalog)
    with pytest.raises(ValueError, match="no column"):
        catalog.update(record.file_id, **{"last_error = 'x', state": "synced"})


def test_discover_stores_extras_as_canonical_json(catalog: Catalog) -> None:
    record, created = _discover(catalog, extras={"location": "gate 3", "camera": {"b": 2, "a": 1}})
    assert created
    assert record.extras == '{"camera":{"a":1,"b":2},"location":"gate 3"}'
    assert record.source_extras == {"location": "gate 3", "camera": {"a": 1, "b": 2}}
    again, created = _discover(catalog, extras={"other": 1})
    assert not created and again.extras == record.extras
    plain, _ = _discover(catalog, "b.mp4")
    assert plain.extras is None and plain.source_extras == {}
    with pytest.raises(TypeError, match="dict"):
        _discover(catalog, "c.mp4", extras=["not", "an", "object"])


def test_repository_writes_join_the_callers_transaction(catalog: Catalog) -> None:
    record, _ = _discover(catalog)
    with pytest.raises(RuntimeError), catalog.transaction():
        catalog.holds.place(file_id=record.file_id, case_id=None, reason="r", actor="me", set_ms=1)
        catalog.meta.set("k", "v")
        raise RuntimeError("abort")
    assert catalog.holds.active() == [] and catalog.meta.get("k") is None
    assert not catalog.is_held(record.file_id)


# -- schema ---------------------------------------------------------------------------------------


def _indexes(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'"
                                       " AND name NOT LIKE 'sqlite_autoindex_%'")}


def test_every_index_is_named_in_the_schema(catalog: Catalog) -> None:
    assert _indexes(catalog.conn) == set(schema.INDEXES) | schema.MIGRATION_INDEXES
    assert catalog.query("PRAGMA user_version")[0][0] == len(schema.MIGRATIONS)


def test_an_old_catalog_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    for table, columns in schema.TABLES.items():  # the base schema, as the released agents made it
        conn.execute(f"CREATE TABLE [{table}] ({columns})")
    conn.execute("CREATE TABLE command_ids (id TEXT PRIMARY KEY, ts_ms INTEGER NOT NULL, seen_ms INTEGER NOT NULL)")
    conn.execute("INSERT INTO files (file_id, state, kind, device_id, original_path, created_ms, updated_ms)"
                 " VALUES ('f1', 'sealed', 'recorder', 'dev1', '/a', 1, 1)")
    conn.commit()
    conn.close()
    readonly = Catalog(path, readonly=True)  # the CLI reading before the daemon migrated it
    assert readonly.get("f1").extras is None
    readonly.close()
    catalog = Catalog(path)
    assert "extras" in {r[1] for r in catalog.query("PRAGMA table_info(files)")}
    assert catalog.get("f1").state == "sealed" and catalog.get("f1").extras is None
    assert _indexes(catalog.conn) == set(schema.INDEXES) | schema.MIGRATION_INDEXES
    assert catalog.query("PRAGMA user_version")[0][0] == len(schema.MIGRATIONS)
    catalog.close()
    Catalog(path).close()  # opening a current catalog again changes nothing


def test_clearing_a_file_that_retention_purged_meanwhile_is_still_recorded(catalog: Catalog) -> None:
    # The dock worker read the row as synced, re-hashed the original, deleted it; meanwhile retention purged
    # the local copy. The deletion must be recorded (cleared_ms, audit), not crash the worker.
    record, _ = _discover(catalog)
    catalog.transition(record.file_id, State.STAGED, size=10, sha256="a" * 64, store_path="store/x")
    catalog.transition(record.file_id, State.SEALED, manifest_sha256="b" * 64)
    catalog.transition(record.file_id, State.SENDING)
    catalog.transition(record.file_id, State.SYNCED, synced_ms=1)
    seen = catalog.get(record.file_id)
    catalog.transition(record.file_id, State.PURGED, purged_ms=2)
    DockingRecords(catalog).cleared(seen, reason="confirmed", actor="edge-agent")
    after = catalog.get(record.file_id)
    assert after.state == State.PURGED and after.cleared_ms is not None
    assert catalog.query("SELECT 1 FROM audit WHERE action = 'recorder.cleared' AND subject = ?", (record.file_id,))
