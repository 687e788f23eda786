"""The one canonical JSON encoder: keys sorted, no spaces, UTF-8 as is (not \\u-escaped).

For documents without floats this is RFC 8785 (JCS), the form every signature, document hash, audit entry
hash and wire message of edge-agent is computed over (DESIGN.md section 4). Signed documents refuse floats
before they get here (`evidence.manifest`), so both ends produce the same bytes whatever their language.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
