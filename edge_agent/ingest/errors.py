"""The ways an ingest can stop, each with what to do about it, and how a full disk is recognised."""

from __future__ import annotations

import errno
import sqlite3


class IngestError(Exception):
    """Base of the ways an ingest can stop; the message says what to do."""


class IntakePaused(IngestError):
    """No room to take more data: intake waits, nothing is deleted to make room for it."""


class SourceGone(IngestError):
    """The source vanished or changed mid-copy (recorder pulled, file rewritten); retry when it is back."""


class SourceUnreadable(IngestError):
    """The source file cannot be read (permissions, bad sectors); it is kept and retried on next dock."""


class CopyMismatch(IngestError):
    """The read-back of the staged copy did not match the bytes read from the source."""


def disk_full(exc: BaseException) -> bool:
    """True when `exc` is the disk (or quota) running out, from the OS or from SQLite."""
    if isinstance(exc, sqlite3.OperationalError):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
