"""MANSCDP bodies (GB/T 28181-2016 Appendix A): the XML a device and a platform exchange in SIP MESSAGEs.

`parse_body` reads a Query / Response / Notify (UTF-8 or GB2312/GBK/GB18030 as its XML declaration says)
into a `Manscdp` (root, CmdType, SN, DeviceID, the other top-level fields, and the Items of its list);
`render_body` writes one. Documents with a DTD or entity declarations are refused before parsing (no entity
expansion, no external fetches), and so is a body over `MAX_BODY` bytes. Both ends import this module.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

MAX_BODY = 16 * 1024
CONTENT_TYPE = "Application/MANSCDP+xml"
_DECLARATION = re.compile(rb'^\s*<\?xml[^>]*?encoding\s*=\s*["\']([A-Za-z0-9_-]+)["\'][^>]*\?>')
# GB2312 text is read as GB18030 (its superset: a platform's "GB2312" body often holds GBK characters).
_DECODE_AS = {"gb2312": "gb18030", "gbk": "gb18030", "gb18030": "gb18030", "utf-8": "utf-8", "utf8": "utf-8"}
_LISTS = ("DeviceList", "RecordList", "GapList")


class ManscdpError(ValueError):
    """A body that is not a MANSCDP document this module reads; the message says why."""


@dataclass
class Manscdp:
    """One MANSCDP document: `root` is Query, Response, Notify or Control; `fields` its top-level leaves in
    order; `lists` its DeviceList / RecordList / GapList Items (each a dict of leaves) with their Num."""

    root: str
    cmd_type: str
    sn: int
    device_id: str
    fields: dict[str, str] = field(default_factory=dict)
    lists: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def get(self, name: str) -> str | None:
        return self.fields.get(name)


def parse_body(body: bytes) -> Manscdp:
    if len(body) > MAX_BODY:
        raise ManscdpError(f"body of {len(body)} bytes is over the {MAX_BODY}-byte limit")
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise ManscdpError("a DTD or entity declaration is not accepted")
    declared = _DECLARATION.match(body)
    encoding = declared.group(1).decode("ascii").lower() if declared else "utf-8"
    codec = _DECODE_AS.get(encoding)
    if codec is None:
        raise ManscdpError(f"encoding {encoding!r} is not accepted (UTF-8 or GB2312/GBK/GB18030)")
    try:
        text = body[declared.end() if declared else 0:].decode(codec)
        root = ET.fromstring(text)
    except (UnicodeDecodeError, ET.ParseError) as exc:
        raise ManscdpError(f"not well-formed XML in {encoding}: {exc}") from None
    fields: dict[str, str] = {}
    lists: dict[str, list[dict[str, str]]] = {}
    for child in root:
        if child.tag in _LISTS:
            lists[child.tag] = [{leaf.tag: (leaf.text or "").strip() for leaf in item}
                                for item in child if item.tag == "Item"]
        elif len(child) == 0:
            fields[child.tag] = (child.text or "").strip()
    sn = fields.pop("SN", "")
    cmd_type = fields.pop("CmdType", "")
    device_id = fields.pop("DeviceID", "")
    if not cmd_type or not sn.isdigit() or len(sn) > 18:
        raise ManscdpError(f"{root.tag} without a CmdType or a numeric SN")
    return Manscdp(root.tag, cmd_type, int(sn), device_id, fields, lists)


def render_body(doc: Manscdp, charset: str = "GB2312") -> bytes:
    """The document as `<?xml version="1.0" encoding="{charset}"?>` + XML, encoded in that charset."""
    root = ET.Element(doc.root)
    for name, value in (("CmdType", doc.cmd_type), ("SN", str(doc.sn)), ("DeviceID", doc.device_id),
                        *doc.fields.items()):
        ET.SubElement(root, name).text = value
    for name, items in doc.lists.items():
        listed = ET.SubElement(root, name, Num=str(len(items)))
        for item in items:
            element = ET.SubElement(listed, "Item")
            for key, value in item.items():
                ET.SubElement(element, key).text = value
    codec = _DECODE_AS.get(charset.lower(), charset)
    text = ET.tostring(root, encoding="unicode")
    return f'<?xml version="1.0" encoding="{charset}"?>\r\n{text}\r\n'.encode(codec)
