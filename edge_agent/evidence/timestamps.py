"""RFC 3161 time-stamps on checkpoints (docs/PROTOCOL.md section 10, "Time-stamps").

With `evidence.tsa_url` set, every checkpoint's canonical bytes are time-stamped by that authority right after
the checkpoint is signed: the token (the TSA's DER `TimeStampResp`) is kept beside the checkpoint as
`checkpoints/<aa>/<id>.tsr` and carried to the platform inside the next checkpoint (`previous_timestamp`), so
it travels in the chain like every document. `verify` checks each token: it must time-stamp exactly its
checkpoint's bytes, and with `evidence.tsa_ca` (the authority's root certificate, PEM) be signed under it.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import rfc3161_client
from cryptography import x509

CONTENT_TYPE_QUERY = "application/timestamp-query"
MAX_REPLY_BYTES = 64 * 1024


class TimestampError(Exception):
    """No usable time-stamp; the text says what to fix."""


def request_token(url: str, data: bytes, timeout_s: float) -> bytes:
    """The authority's DER time-stamp response over `data` (granted, and for this request's imprint)."""
    query = rfc3161_client.TimestampRequestBuilder(data=data).build()
    request = urllib.request.Request(url, data=query.as_bytes(), method="POST",
                                     headers={"Content-Type": CONTENT_TYPE_QUERY})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:   # noqa: S310 (configured URL)
            body = reply.read(MAX_REPLY_BYTES + 1)
    except (urllib.error.URLError, OSError) as exc:
        raise TimestampError(f"the time-stamping authority {url} did not answer ({exc}); check evidence.tsa_url "
                             "and the network") from None
    if len(body) > MAX_REPLY_BYTES:
        raise TimestampError(f"the time-stamping authority {url} answered more than {MAX_REPLY_BYTES} bytes")
    problem = token_problem(body, data, None)
    if problem is not None:
        raise TimestampError(f"the time-stamping authority {url} answered with an unusable token: {problem}")
    return body


def token_problem(token: bytes, data: bytes, ca: Path | None) -> str | None:
    """None if `token` time-stamps exactly `data` (and, with `ca`, is signed under that root); else why not."""
    try:
        reply = rfc3161_client.decode_timestamp_response(token)
    except ValueError as exc:
        return f"not a time-stamp response ({exc})"
    if reply.status != 0:
        return f"the authority refused (status {reply.status})"
    try:
        roots = [] if ca is None else x509.load_pem_x509_certificates(ca.read_bytes())
    except (OSError, ValueError) as exc:
        return f"the authority's root certificate {ca} cannot be read ({exc}); check evidence.tsa_ca"
    if not roots:   # without a root the imprint is compared, the signature is not
        digest = rfc3161_client.TimestampRequestBuilder(data=data).build().message_imprint.message
        return None if reply.tst_info.message_imprint.message == digest else "it time-stamps other bytes"
    try:
        rfc3161_client.VerifierBuilder(roots=roots).build().verify_message(reply, data)
    except rfc3161_client.VerificationError as exc:
        return f"it does not verify: {exc}"
    return None


def gen_time(token: bytes) -> str:
    """When the authority says it saw the bytes (ISO 8601)."""
    return rfc3161_client.decode_timestamp_response(token).tst_info.gen_time.isoformat()
