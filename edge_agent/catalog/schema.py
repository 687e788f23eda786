"""The catalog's schema: every table and index, by name, and the migrations that bring an older catalog
forward.

`TABLES` and `INDEXES` are the base schema as released catalogs had it (made by sqlite-utils, whose automatic
index names `idx_<table>_<columns>` are kept here as explicit names, so an existing catalog gains no duplicate
index). `MIGRATIONS` are applied in order on top of it, each once; `PRAGMA user_version` records how many
were applied. A new catalog is made the same way (base, then every migration), so there is one path to
the current schema.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from edge_agent.catalog.states import STORED_FILES, SYNC_QUEUE, state_in

# Sync lanes, lowest first: evidence and held files, recorder files, camera segments.
LANE_EVIDENCE, LANE_RECORDER, LANE_CAMERA = 0, 1, 2

# Index names the repositories name in `INDEXED BY` (the planner must not pick another on big catalogs).
FILES_SEND_ORDER = "files_send_order"
FILES_STORED_SIZE = "files_stored_size"
FILES_SYNCED_MS = "idx_files_synced_ms"
FILES_SOURCE_IDENTITY = "files_source_identity"
FILES_FINGERPRINT = "files_source_fingerprint"
# The fingerprint as the unique source identity holds it (queries must say it the same way to use the index).
SOURCE_FINGERPRINT_KEY = "COALESCE(source_fingerprint, '')"

TABLES: dict[str, str] = {
    "meta": "[key] TEXT PRIMARY KEY, [value] TEXT",
    "files": (
        "[file_id] TEXT PRIMARY KEY, [state] TEXT NOT NULL, [kind] TEXT NOT NULL, [device_id] TEXT NOT NULL,"
        " [dock] TEXT, [slot] INTEGER, [session_id] TEXT, [volume_label] TEXT, [original_path] TEXT NOT NULL,"
        " [source_path] TEXT, [source_size] INTEGER, [source_mtime_ns] INTEGER, [officer_id] TEXT,"
        " [case_id] TEXT, [party] TEXT, [recorded_start_ms] INTEGER, [recorded_end_ms] INTEGER,"
        " [ingested_at_ms] INTEGER, [size] INTEGER, [sha256] TEXT, [store_path] TEXT, [manifest_sha256] TEXT,"
        " [media] TEXT, [retention] TEXT NOT NULL DEFAULT 'routine',"
        f" [lane] INTEGER NOT NULL DEFAULT {LANE_RECORDER}, [clock_offset_ms] INTEGER,"
        " [created_ms] INTEGER NOT NULL, [updated_ms] INTEGER NOT NULL, [synced_ms] INTEGER,"
        " [cleared_ms] INTEGER, [purged_ms] INTEGER, [attempts] INTEGER NOT NULL DEFAULT 0, [last_error] TEXT"
    ),
    "sessions": (
        "[session_id] TEXT PRIMARY KEY, [dock] TEXT, [slot] INTEGER, [device_id] TEXT, [serial] TEXT,"
        " [model] TEXT, [volume_label] TEXT, [volume_path] TEXT, [officer_id] TEXT, [docked_ms] INTEGER,"
        " [undocked_ms] INTEGER, [state] TEXT, [manifest_sha256] TEXT, [files_total] INTEGER, [last_error] TEXT"
    ),
    "devices": (
        "[device_id] TEXT PRIMARY KEY, [kind] TEXT, [model] TEXT, [serial] TEXT, [name] TEXT,"
        " [first_seen_ms] INTEGER, [last_seen_ms] INTEGER, [info] TEXT"
    ),
    "checkouts": ("[id] INTEGER PRIMARY KEY, [device_id] TEXT, [officer_id] TEXT, [from_ms] INTEGER,"
                  " [to_ms] INTEGER, [actor] TEXT"),
    "holds": ("[id] INTEGER PRIMARY KEY, [file_id] TEXT, [case_id] TEXT, [reason] TEXT, [actor] TEXT,"
              " [set_ms] INTEGER, [released_ms] INTEGER, [released_by] TEXT"),
    "gaps": ("[id] INTEGER PRIMARY KEY, [camera] TEXT, [start_ms] INTEGER, [end_ms] INTEGER, [cause] TEXT,"
             " [detail] TEXT"),
    "alarms": ("[id] INTEGER PRIMARY KEY, [key] TEXT, [kind] TEXT, [subject] TEXT, [message] TEXT,"
               " [raised_ms] INTEGER, [cleared_ms] INTEGER"),
    "documents": ("[seq] INTEGER PRIMARY KEY, [kind] TEXT, [doc_id] TEXT, [sha256] TEXT, [prev] TEXT, [path] TEXT,"
                  " [created_ms] INTEGER"),
    "outbox": "[id] INTEGER PRIMARY KEY, [topic] TEXT, [payload] TEXT, [created_ms] INTEGER, [sent_ms] INTEGER",
    "audit": ("[seq] INTEGER PRIMARY KEY, [ts_ms] INTEGER, [actor] TEXT, [action] TEXT, [subject] TEXT,"
              " [reason] TEXT, [detail] TEXT, [prev] TEXT, [hash] TEXT"),
}

# name -> "table (columns)[ WHERE ...]"
INDEXES: dict[str, str] = {
    "idx_files_state_lane_recorded_start_ms": "files (state, lane, recorded_start_ms)",
    # Replaced by `_add_source_fingerprint` with one that includes the content fingerprint.
    FILES_SOURCE_IDENTITY: "files (device_id, original_path, source_size, source_mtime_ns)",
    "idx_files_session_id": "files (session_id)",
    "idx_files_case_id": "files (case_id)",
    FILES_SYNCED_MS: "files (synced_ms)",  # retention's purge order
    "idx_files_kind_original_path": "files (kind, original_path)",  # a camera's segments: "<camera>/..."
    # Partial indexes for the two queries asked per file sent / per file copied, so that they stay flat on a
    # catalog of a million rows (scripts/bench_scale.py catalog): the send order, and the bytes held locally.
    FILES_SEND_ORDER: f"files (lane, COALESCE(recorded_start_ms, created_ms), file_id) WHERE {state_in(SYNC_QUEUE)}",
    FILES_STORED_SIZE: f"files (size) WHERE {STORED_FILES}",
    "idx_checkouts_device_id_from_ms": "checkouts (device_id, from_ms)",
    "idx_gaps_camera_start_ms": "gaps (camera, start_ms)",
    "idx_alarms_key_cleared_ms": "alarms (key, cleared_ms)",
    "idx_documents_doc_id": "documents (doc_id)",
    "idx_outbox_sent_ms_id": "outbox (sent_ms, id)",
}
UNIQUE_INDEXES = frozenset({FILES_SOURCE_IDENTITY})  # a source file is recorded once
# Indexes made by a migration only (on a column the base schema does not have).
MIGRATION_INDEXES = frozenset({FILES_FINGERPRINT})


def _add_extras(conn: sqlite3.Connection) -> None:
    """files.extras: a source's own manifest keys (canonical JSON object), stored at discovery (contract 3)."""
    if "extras" not in {row[1] for row in conn.execute("PRAGMA table_info(files)")}:
        conn.execute("ALTER TABLE files ADD COLUMN extras TEXT")


def _add_command_ids(conn: sqlite3.Connection) -> None:
    """command_ids: platform command ids obeyed within the replay window (sync/commands.py). Agents before
    this migration made the same table themselves, hence IF NOT EXISTS."""
    conn.execute("CREATE TABLE IF NOT EXISTS command_ids (id TEXT PRIMARY KEY, ts_ms INTEGER NOT NULL,"
                 " seen_ms INTEGER NOT NULL)")


def _add_source_fingerprint(conn: sqlite3.Connection) -> None:
    """files.source_fingerprint: `<size>:<SHA-256 of the first and last MiB>` of a recorder file, taken at
    discovery (`digest.fingerprint`); a recorder file is a new file unless its content is in the catalog.
    The unique source identity gains the fingerprint, so a twin (same device, path, size and mtime, other
    bytes: a recorder whose clock was reset) gets its own row; rows without one (camera segments, files
    found before this migration) stay unique on the four columns as before. It keeps its name, so the base
    schema's CREATE ... IF NOT EXISTS never brings the old four-column index back."""
    if "source_fingerprint" not in {row[1] for row in conn.execute("PRAGMA table_info(files)")}:
        conn.execute("ALTER TABLE files ADD COLUMN source_fingerprint TEXT")
    conn.execute(f"DROP INDEX IF EXISTS [{FILES_SOURCE_IDENTITY}]")
    conn.execute(f"CREATE UNIQUE INDEX [{FILES_SOURCE_IDENTITY}] ON files (device_id, original_path, source_size,"
                 f" source_mtime_ns, {SOURCE_FINGERPRINT_KEY})")
    conn.execute(f"CREATE INDEX IF NOT EXISTS [{FILES_FINGERPRINT}] ON files (device_id, source_fingerprint)"
                 " WHERE source_fingerprint IS NOT NULL")


def _add_receipts(conn: sqlite3.Connection) -> None:
    """receipts: the receiver's signed receipt of each synced file (catalog/receipts.py), one per file."""
    conn.execute("CREATE TABLE IF NOT EXISTS receipts (file_id TEXT PRIMARY KEY, receiver_key_id TEXT NOT NULL,"
                 " receipt TEXT NOT NULL, sha256 TEXT NOT NULL, received_ms INTEGER NOT NULL)")


def _add_command_seqs(conn: sqlite3.Connection) -> None:
    """command_seqs: the highest command `seq` obeyed per platform key (sync/commands.py): a command is obeyed
    only with a higher one, whatever the wall clock says, so a captured command stays refused after the
    agent's clock steps back."""
    conn.execute("CREATE TABLE IF NOT EXISTS command_seqs (key_id TEXT PRIMARY KEY, seq INTEGER NOT NULL,"
                 " command_id TEXT NOT NULL, updated_ms INTEGER NOT NULL)")


def _add_chain_receipt(conn: sqlite3.Connection) -> None:
    """chain_receipt: the highest verified chain receipt from the platform (catalog/chain_receipts.py), one row,
    with the newest checkpoint document it covers (its canonical text), so `verify` can name what the platform
    holds even after the local tail was removed."""
    conn.execute("CREATE TABLE IF NOT EXISTS chain_receipt (id INTEGER PRIMARY KEY CHECK (id = 1),"
                 " seq INTEGER NOT NULL, sha256 TEXT NOT NULL, receiver_key_id TEXT NOT NULL, receipt TEXT NOT NULL,"
                 " checkpoint_seq INTEGER, checkpoint TEXT, received_ms INTEGER NOT NULL)")


def _add_session_recorder(conn: sqlite3.Connection) -> None:
    """sessions.recorder: what the recorder said of itself through its vendor handshake (GA/T 947.4: identity,
    officer, unit, battery, clock offset before 校时), a JSON object signed into the session manifest."""
    if "recorder" not in {row[1] for row in conn.execute("PRAGMA table_info(sessions)")}:
        conn.execute("ALTER TABLE sessions ADD COLUMN recorder TEXT")


# Applied in order, each once; never edit or reorder a released one, append a new one.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_add_extras, _add_command_ids, _add_source_fingerprint,
                                                         _add_receipts, _add_command_seqs, _add_chain_receipt,
                                                         _add_session_recorder]


def create(conn: sqlite3.Connection) -> None:
    """Bring the catalog on `conn` to the current schema, in one transaction (idempotent)."""
    if conn.execute("PRAGMA user_version").fetchone()[0] >= len(MIGRATIONS):
        return  # current: no write lock taken, so a CLI opening the catalog does not wait for the daemon
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, columns in TABLES.items():
            conn.execute(f"CREATE TABLE IF NOT EXISTS [{table}] ({columns})")
        for name, spec in INDEXES.items():
            unique = "UNIQUE " if name in UNIQUE_INDEXES else ""
            conn.execute(f"CREATE {unique}INDEX IF NOT EXISTS [{name}] ON {spec}")
        applied = conn.execute("PRAGMA user_version").fetchone()[0]
        for migration in MIGRATIONS[applied:]:
            migration(conn)
        if applied < len(MIGRATIONS):
            conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise

