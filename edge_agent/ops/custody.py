"""Custody (R5): who had which recorder when, and which case a file belongs to.

The checkout register (`assign` / `return`) gives the officer of a file
recorded in a checkout's time window (`catalog.checkouts.officer_at`, used when a dock
discovers files). `tag` links files to a case and party with a signed
annotation: a new document in the agent's chain that references the file's
hash and manifest, never a rewrite of the manifest. A tagged file joins the
evidence lane (sent first) and, by default, the `evidence` retention class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edge_agent.catalog import LANE_EVIDENCE, Catalog, FileRecord, audit, new_id
from edge_agent.clock import now_ms
from edge_agent.i18n import N_, Refusal
from edge_agent.ingest import Sealer
from edge_agent.layout import StoreLayout
from edge_agent.ops.alarms import clear_unidentified
from edge_agent.ops.retention import EVIDENCE, RETENTION_CLASSES


class CustodyError(Refusal, ValueError):
    """A custody action cannot be done as asked; the message says what to do instead."""


@dataclass(frozen=True)
class Checkout:
    id: int
    device_id: str
    officer_id: str
    from_ms: int
    to_ms: int | None
    actor: str


def assign(catalog: Catalog, device_id: str, officer_id: str, *, at_ms: int | None = None,
           reason: str | None = None, actor: str | None = None) -> Checkout:
    """Check `device_id` out to `officer_id` from `at_ms` (default now), ending any open checkout of it."""
    device_id, officer_id = device_id.strip(), officer_id.strip()
    if not device_id or not officer_id:
        raise CustodyError(N_("give a device id and --officer (the officer's police number)"))
    who = actor or audit.os_user()
    start = now_ms() if at_ms is None else at_ms
    with catalog.transaction() as conn:
        open_rows = catalog.checkouts.open_for(device_id)
        for row in open_rows:
            if row["from_ms"] > start:
                raise CustodyError(N_("{device_id} has a checkout to {officer_id} starting after the time given; "
                                      "return it first or give a later time"), device_id=device_id,
                                   officer_id=row["officer_id"])
            catalog.checkouts.end(row["id"], start)
        checkout_id = catalog.checkouts.add(device_id, officer_id, start, who)
        catalog.devices.touch(device_id, kind=catalog.devices.kind_of(device_id))
        audit.append(conn, "custody.assigned", subject=device_id, reason=reason, actor=who,
                     detail={"officer_id": officer_id, "from_ms": start,
                             "ended": [r["officer_id"] for r in open_rows]})
        checkout = Checkout(checkout_id, device_id, officer_id, start, None, who)
    clear_unidentified(catalog, device_id, f"assigned to officer {officer_id} by {who}", who)
    return checkout


def return_device(catalog: Catalog, device_id: str, *, at_ms: int | None = None, reason: str | None = None,
                  actor: str | None = None) -> Checkout:
    """End the open checkout of `device_id` (the recorder came back to the custodian)."""
    who = actor or audit.os_user()
    end = now_ms() if at_ms is None else at_ms
    with catalog.transaction() as conn:
        open_rows = catalog.checkouts.open_for(device_id)
        if not open_rows:
            raise CustodyError(N_("{device_id} is not checked out (see: edge-agent devices)"), device_id=device_id)
        row = open_rows[0]
        if end < row["from_ms"]:
            raise CustodyError(N_("{device_id} was checked out after the return time given"), device_id=device_id)
        catalog.checkouts.end(row["id"], end)
        audit.append(conn, "custody.returned", subject=device_id, reason=reason, actor=who,
                     detail={"officer_id": row["officer_id"], "from_ms": row["from_ms"], "to_ms": end})
    return Checkout(row["id"], device_id, row["officer_id"], row["from_ms"], end, row["actor"])


def tag(catalog: Catalog, sealer: Sealer, layout: StoreLayout, file_id: str, *, case_id: str | None,
        party: str | None = None, retention: str | None = None, reason: str | None = None,
        actor: str | None = None) -> dict[str, Any]:
    """Sign an annotation linking `file_id` to a case/party; update the catalog row. Returns the annotation."""
    if case_id is None and party is None and retention is None:
        raise CustodyError(N_("give --case, --party or --retention to tag a file with"))
    retention = retention or (EVIDENCE if case_id else None)
    if retention is not None and retention not in RETENTION_CLASSES:
        raise CustodyError(N_("--retention must be one of {classes}, got {retention!r}"),
                            classes=", ".join(RETENTION_CLASSES), retention=retention)
    record = catalog.get(file_id)
    fields = {"case_id": case_id or record.case_id, "party": party if party is not None else record.party,
              "retention": retention or record.retention}
    return _annotate(catalog, sealer, layout, record, fields, "file.tagged", reason, actor, lane=LANE_EVIDENCE)


def _annotate(catalog: Catalog, sealer: Sealer, layout: StoreLayout, record: FileRecord, fields: dict[str, Any],
              action: str, reason: str | None, actor: str | None, lane: int | None = None) -> dict[str, Any]:
    """One signed annotation setting `fields` on a file, and the same fields on its catalog row."""
    who = actor or audit.os_user()
    annotation_id = new_id()
    body = {"annotation_id": annotation_id, "file_id": record.file_id, "file_sha256": record.sha256,
            "manifest_sha256": record.manifest_sha256, **fields, "reason": reason, "by": who, "ts_ms": now_ms()}
    columns = {**fields, **({"lane": lane} if lane is not None else {})}

    def record_annotation(conn: Any, digest: str) -> None:
        catalog.update(record.file_id, **columns)  # joins the signing transaction
        audit.append(conn, action, subject=record.file_id, reason=reason, actor=who,
                     detail={"annotation_id": annotation_id, "annotation_sha256": digest, **fields})

    return sealer.sign_document("annotation", annotation_id, body, layout.annotation_path(annotation_id),
                                after=record_annotation)


def backfill_officer(catalog: Catalog, sealer: Sealer, layout: StoreLayout, checkout: Checkout,
                     actor: str | None = None) -> list[str]:
    """Files of the device recorded during `checkout` that reached the agent without an officer (the
    custodian assigned it late) get the officer by a signed annotation. Returns their ids."""
    done = []
    for record in catalog.files.without_officer(checkout.device_id, checkout.from_ms, checkout.to_ms):
        _annotate(catalog, sealer, layout, record, {"officer_id": checkout.officer_id},
                  "file.officer_assigned", f"checkout {checkout.id} of {checkout.device_id} covers its recording",
                  actor)
        done.append(record.file_id)
    return done
