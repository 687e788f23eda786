"""A small, strict SIP message codec and digest authentication (RFC 3261 over UDP; RFC 2617 MD5 digest).

Only what a GB/T 28181 device needs: parse one datagram into a request or a response, render one, and
answer a `WWW-Authenticate: Digest` challenge. Both ends import it (the device in
`edge_agent.sources.gb28181`, the platform stub in the tests), like `protocol/wire.py`.

Limits, on purpose (a datagram outside them raises `SipError` and is dropped by the caller):
- at most `MAX_MESSAGE` bytes (platform queries are a few hundred bytes; anything larger is hostile);
- UTF-8 start line and headers, at most `MAX_HEADERS` header lines, no NUL or bare CR/LF inside a line,
  folded (continuation) lines rejected (obsolete since RFC 3261, used for smuggling);
- the mandatory headers Via, From, To, Call-ID and CSeq present, CSeq `<number> <method>`;
- Content-Length required when there is a body, and no larger than the bytes received (a shorter body
  is a truncated datagram); bytes beyond it are ignored (RFC 3261 §18.3);
- SIP/2.0 only; compact header names (v, f, t, i, l, c, m) expanded.
No TCP framing, no multipart bodies, no SIPS, no IPv6 literal parsing beyond what is passed through.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field

MAX_MESSAGE = 16 * 1024
MAX_HEADERS = 64
SIP_VERSION = "SIP/2.0"

_COMPACT = {"v": "Via", "f": "From", "t": "To", "i": "Call-ID", "l": "Content-Length", "c": "Content-Type",
            "m": "Contact", "k": "Supported", "s": "Subject", "e": "Content-Encoding"}
_TOKEN = re.compile(r"^[A-Za-z0-9.!%*_+`'~-]+$")
_REQUIRED = ("Via", "From", "To", "Call-ID", "CSeq")


class SipError(ValueError):
    """A datagram that is not a SIP message this codec accepts; the message says why."""


def _canonical_name(name: str) -> str:
    name = _COMPACT.get(name.lower(), name) if len(name) == 1 else name
    return "-".join(part.capitalize() for part in name.split("-")).replace("Call-Id", "Call-ID").replace(
        "Www-", "WWW-").replace("Cseq", "CSeq")


@dataclass
class SipMessage:
    """A request (`method`, `uri`) or a response (`status`, `reason`): headers in order, body as bytes."""

    method: str | None = None
    uri: str | None = None
    status: int | None = None
    reason: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def is_request(self) -> bool:
        return self.method is not None

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        wanted = _canonical_name(name)
        return next((v for n, v in self.headers if n == wanted), None)

    def header_all(self, name: str) -> list[str]:
        wanted = _canonical_name(name)
        return [v for n, v in self.headers if n == wanted]

    def add(self, name: str, value: str) -> SipMessage:
        if "\r" in value or "\n" in value:
            raise SipError(f"header {name} may not hold a line break")
        self.headers.append((_canonical_name(name), value))
        return self

    @property
    def call_id(self) -> str:
        return self.header("Call-ID") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        number, _, method = (self.header("CSeq") or "").partition(" ")
        return int(number), method.strip()

    def render(self) -> bytes:
        """The datagram: start line, headers (Content-Length set from the body), blank line, body."""
        start = (f"{self.method} {self.uri} {SIP_VERSION}" if self.is_request
                 else f"{SIP_VERSION} {self.status} {self.reason}")
        lines = [start] + [f"{n}: {v}" for n, v in self.headers if n != "Content-Length"]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + self.body


def parse(datagram: bytes) -> SipMessage:
    """One datagram as a SipMessage, or SipError naming the first rule it breaks (see the module's limits)."""
    if len(datagram) > MAX_MESSAGE:
        raise SipError(f"message of {len(datagram)} bytes is over the {MAX_MESSAGE}-byte limit")
    head, sep, rest = datagram.partition(b"\r\n\r\n")
    if not sep:
        raise SipError("no blank line ends the headers")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SipError(f"headers are not UTF-8 (byte {exc.start})") from None
    if "\x00" in text:
        raise SipError("NUL in the headers")
    lines = text.split("\r\n")
    if any("\r" in line or "\n" in line for line in lines):
        raise SipError("bare CR or LF in the headers")
    message = _start_line(lines[0])
    _headers(message, lines[1:])
    return _body(message, rest)


def _headers(message: SipMessage, lines: list[str]) -> None:
    if len(lines) > MAX_HEADERS:
        raise SipError(f"more than {MAX_HEADERS} header lines")
    for line in lines:
        if line[:1] in (" ", "\t"):
            raise SipError("folded header lines are not accepted")
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not _TOKEN.match(name):
            raise SipError(f"malformed header line {line[:40]!r}")
        message.headers.append((_canonical_name(name), value.strip()))
    for name in _REQUIRED:
        if message.header(name) is None:
            raise SipError(f"mandatory header {name} is missing")
    number, _, method = (message.header("CSeq") or "").partition(" ")
    if not number.isdigit() or len(number) > 10 or not _TOKEN.match(method.strip() or "?"):
        raise SipError(f"malformed CSeq {message.header('CSeq')!r}")


def _body(message: SipMessage, rest: bytes) -> SipMessage:
    length = message.header("Content-Length")
    if length is None:
        if rest:
            raise SipError("a body without Content-Length")
        return message
    if not length.isdigit() or len(length) > 6:
        raise SipError(f"malformed Content-Length {length!r}")
    if int(length) > len(rest):
        raise SipError(f"Content-Length {length} but {len(rest)} body bytes: truncated")
    message.body = rest[:int(length)]
    return message


def _start_line(line: str) -> SipMessage:
    parts = line.split(" ", 2)
    if len(parts) != 3:
        raise SipError(f"malformed start line {line[:60]!r}")
    if parts[0] == SIP_VERSION:
        if not (len(parts[1]) == 3 and parts[1].isdigit() and 100 <= int(parts[1]) <= 699):
            raise SipError(f"malformed status code {parts[1][:10]!r}")
        return SipMessage(status=int(parts[1]), reason=parts[2])
    method, uri, version = parts
    if version != SIP_VERSION:
        raise SipError(f"not {SIP_VERSION}: {version[:20]!r}")
    if not _TOKEN.match(method) or not uri.startswith(("sip:", "sips:")) or " " in uri:
        raise SipError(f"malformed request line {line[:60]!r}")
    return SipMessage(method=method, uri=uri)


def tag_of(address: str) -> str | None:
    """The `tag` parameter of a From/To header value."""
    found = re.search(r";\s*tag=([^;\s>]+)", address)
    return found.group(1) if found else None


def new_token(nbytes: int = 8) -> str:
    """A random branch / tag / Call-ID part (hex)."""
    return os.urandom(nbytes).hex()


# -- digest authentication (RFC 2617, as RFC 3261 §22 uses it) ---------------------------------------------

_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]+)\s*,?')


def parse_challenge(value: str) -> dict[str, str]:
    """The parameters of a `WWW-Authenticate: Digest ...` value (keys lower-case); SipError when it is not
    an MD5 digest challenge with a realm and a nonce."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        raise SipError(f"authentication scheme {scheme[:20]!r} is not Digest")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        found = _PARAM.match(rest, pos)
        if not found:
            raise SipError(f"malformed digest challenge at {rest[pos:pos + 30]!r}")
        raw = found.group(2)
        params[found.group(1).lower()] = raw[1:-1].replace('\\"', '"') if raw.startswith('"') else raw
        pos = found.end()
    if "realm" not in params or "nonce" not in params:
        raise SipError("digest challenge without realm or nonce")
    if params.get("algorithm", "MD5").upper() != "MD5":
        raise SipError(f"digest algorithm {params['algorithm']!r} is not supported (MD5 only, as GB/T 28181)")
    return params


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def digest_response(challenge: dict[str, str], *, username: str, password: str, method: str, uri: str,
                    cnonce: str | None = None, nc: int = 1) -> str:
    """The `Authorization` header value answering `challenge` (from `parse_challenge`)."""
    ha1 = _md5(f"{username}:{challenge['realm']}:{password}")
    ha2 = _md5(f"{method}:{uri}")
    qops = [q.strip() for q in challenge.get("qop", "").split(",") if q.strip()]
    fields = [f'username="{username}"', f'realm="{challenge["realm"]}"', f'nonce="{challenge["nonce"]}"',
              f'uri="{uri}"']
    if "auth" in qops:
        cnonce = cnonce or new_token()
        count = f"{nc:08x}"
        response = _md5(f"{ha1}:{challenge['nonce']}:{count}:{cnonce}:auth:{ha2}")
        fields += [f'response="{response}"', "qop=auth", f"nc={count}", f'cnonce="{cnonce}"']
    elif qops:
        raise SipError(f"digest qop {challenge['qop']!r} offers no 'auth'")
    else:
        nonce = challenge["nonce"]
        fields.append(f'response="{_md5(f"{ha1}:{nonce}:{ha2}")}"')
    fields.append("algorithm=MD5")
    if "opaque" in challenge:
        fields.append(f'opaque="{challenge["opaque"]}"')
    return "Digest " + ", ".join(fields)


def check_authorization(value: str, *, password: str, method: str) -> bool:
    """Whether an `Authorization: Digest ...` value is right for `password` (the platform stub's check)."""
    try:
        params = parse_challenge(value)
    except SipError:
        return False
    if not {"username", "uri", "response"} <= params.keys():
        return False
    ha1 = _md5(f"{params['username']}:{params['realm']}:{password}")
    ha2 = _md5(f"{method}:{params['uri']}")
    if params.get("qop") == "auth":
        expected = _md5(f"{ha1}:{params['nonce']}:{params.get('nc', '')}:{params.get('cnonce', '')}:auth:{ha2}")
    else:
        expected = _md5(f"{ha1}:{params['nonce']}:{ha2}")
    return expected == params["response"]
