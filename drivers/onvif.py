"""ONVIF: who a camera is, where its stream is, and how far its clock is off (onvif-zeep, WS-Security digest).

`probe(url, username, password, profile)` asks the device service at `url` for GetSystemDateAndTime
(unauthenticated by the ONVIF core spec; gives the clock offset, which then also corrects the
UsernameToken's Created time), GetDeviceInformation (the serial becomes the device id), GetCapabilities
(where the media service is), GetProfiles and GetStreamUri of the chosen profile (by token or name;
the first profile when none is configured). A refused login raises `OnvifAuthFailed`.

`discover()` sends one WS-Discovery Probe and lists who answered. It multicasts on the local network,
so it runs only when a custodian asks (`edge-agent devices discover`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import onvif
import requests
from onvif.client import ONVIFService
from onvif.definition import SERVICES
from onvif.exceptions import ONVIFError
from zeep.transports import Transport

log = logging.getLogger(__name__)

WSDL_DIR = Path(onvif.__file__).resolve().parent.parent / "wsdl"
DISCOVERY_ADDRESS = ("239.255.255.250", 3702)


class OnvifError(Exception):
    """The camera's ONVIF service could not be used; the message says what to check."""


class OnvifAuthFailed(OnvifError):
    """The camera refused the username or password (or the digest's time: its clock is far off)."""


@dataclass(frozen=True)
class CameraIdentity:
    manufacturer: str | None
    model: str | None
    firmware: str | None
    serial: str | None
    hardware_id: str | None
    profile_token: str
    profile_name: str | None
    stream_uri: str
    clock_offset_ms: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _service(name: str, xaddr: str, username: str | None, password: str | None, dt_diff: dt.timedelta | None,
             timeout: float) -> ONVIFService:
    definition = SERVICES[name]
    binding = f"{{{definition['ns']}}}{definition['binding']}"
    transport = Transport(timeout=timeout, operation_timeout=timeout)
    return ONVIFService(xaddr, username or "", password or "", str(WSDL_DIR / definition["wsdl"]),
                        encrypt=True, no_cache=True, dt_diff=dt_diff, binding_name=binding, transport=transport)


def _fail(exc: Exception, what: str, url: str) -> OnvifError:
    text = str(exc)
    if re.search(r"NotAuthorized|not authorized|Unauthorized|401|authentication|Sender not Authorized", text,
                 re.IGNORECASE):
        return OnvifAuthFailed(f"ONVIF {url}: {what} refused the credentials ({text}); check username and "
                               "password_file, and the camera's clock (digest logins expire)")
    return OnvifError(f"ONVIF {url}: {what} failed ({text}); check the address and that the camera is up")


def clock_offset(device: ONVIFService) -> int | None:
    """Camera clock minus ours, in ms (the camera reports whole seconds)."""
    before = time.time()
    answer = device.GetSystemDateAndTime()
    after = time.time()
    utc = getattr(answer, "UTCDateTime", None)
    if utc is None:
        return None
    camera = dt.datetime(utc.Date.Year, utc.Date.Month, utc.Date.Day, utc.Time.Hour, utc.Time.Minute,
                         utc.Time.Second, tzinfo=dt.UTC).timestamp()
    return int((camera - (before + after) / 2) * 1000)


def probe(url: str, username: str | None, password: str | None, profile: str | None = None,
          timeout: float = 10.0) -> CameraIdentity:
    """Identity, stream URI and clock offset of the camera whose device service is at `url`."""
    try:
        device = _service("devicemgmt", url, username, password, None, timeout)
        offset = clock_offset(device)
    except (ONVIFError, requests.RequestException, OSError) as exc:
        raise _fail(exc, "GetSystemDateAndTime", url) from exc
    dt_diff = dt.timedelta(milliseconds=offset) if offset is not None and abs(offset) > 5000 else None
    try:
        device = _service("devicemgmt", url, username, password, dt_diff, timeout)
        info = device.GetDeviceInformation()
        capabilities = device.GetCapabilities({"Category": "Media"})
    except (ONVIFError, requests.RequestException, OSError) as exc:
        raise _fail(exc, "GetDeviceInformation", url) from exc
    media_xaddr = getattr(getattr(capabilities, "Media", None), "XAddr", None) or url
    try:
        media = _service("media", media_xaddr, username, password, dt_diff, timeout)
        profiles = media.GetProfiles()
    except (ONVIFError, requests.RequestException, OSError) as exc:
        raise _fail(exc, "GetProfiles", url) from exc
    chosen = _choose(profiles, profile, url)
    try:
        answer = media.GetStreamUri({"StreamSetup": {"Stream": "RTP-Unicast", "Transport": {"Protocol": "RTSP"}},
                                     "ProfileToken": chosen.token})
    except (ONVIFError, requests.RequestException, OSError) as exc:
        raise _fail(exc, "GetStreamUri", url) from exc
    return CameraIdentity(
        manufacturer=info.Manufacturer, model=info.Model, firmware=info.FirmwareVersion,
        serial=info.SerialNumber, hardware_id=info.HardwareId, profile_token=chosen.token,
        profile_name=getattr(chosen, "Name", None), stream_uri=answer.Uri, clock_offset_ms=offset,
    )


def _choose(profiles: list[Any], wanted: str | None, url: str) -> Any:
    if not profiles:
        raise OnvifError(f"ONVIF {url}: the camera lists no media profile; configure one on the camera")
    if wanted is None:
        return profiles[0]
    for candidate in profiles:
        if wanted in (candidate.token, getattr(candidate, "Name", None)):
            return candidate
    names = ", ".join(f"{p.token} ({getattr(p, 'Name', '')})" for p in profiles)
    raise OnvifError(f"ONVIF {url}: no profile {wanted!r}; the camera has: {names}")


# -- WS-Discovery ---------------------------------------------------------------------------------

_PROBE = """<?xml version="1.0" encoding="UTF-8"?>
<e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope"
 xmlns:w="http://schemas.xmlsoap.org/ws/2004/08/addressing"
 xmlns:d="http://schemas.xmlsoap.org/ws/2005/04/discovery"
 xmlns:dn="http://www.onvif.org/ver10/network/wsdl">
<e:Header><w:MessageID>uuid:{id}</w:MessageID>
<w:To e:mustUnderstand="true">urn:schemas-xmlsoap-org:ws:2005:04:discovery</w:To>
<w:Action e:mustUnderstand="true">http://schemas.xmlsoap.org/ws/2005/04/discovery/Probe</w:Action></e:Header>
<e:Body><d:Probe><d:Types>dn:NetworkVideoTransmitter</d:Types></d:Probe></e:Body></e:Envelope>"""

_D = "{http://schemas.xmlsoap.org/ws/2005/04/discovery}"
_A = "{http://schemas.xmlsoap.org/ws/2004/08/addressing}"


def discover(timeout: float = 3.0, target: tuple[str, int] = DISCOVERY_ADDRESS) -> list[dict[str, Any]]:
    """Send one WS-Discovery Probe to `target` and collect ProbeMatches for `timeout` seconds."""
    found: dict[str, dict[str, Any]] = {}
    message = _PROBE.format(id=uuid.uuid4()).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)   # never beyond the local segment
        sock.settimeout(0.2)
        sock.sendto(message, target)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, sender = sock.recvfrom(65536)
            except TimeoutError:
                continue
            for match in _matches(data):
                match["from"] = sender[0]
                found.setdefault(match["endpoint"] or sender[0], match)
    return list(found.values())


def _matches(data: bytes) -> list[dict[str, Any]]:
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError:
        return []
    out = []
    for match in root.iter(f"{_D}ProbeMatch"):
        address = match.findtext(f"{_A}EndpointReference/{_A}Address")
        xaddrs = (match.findtext(f"{_D}XAddrs") or "").split()
        scopes = (match.findtext(f"{_D}Scopes") or "").split()
        out.append({"endpoint": address, "xaddrs": xaddrs, "scopes": scopes,
                    "name": next((s.rsplit("/", 1)[1] for s in scopes if "/name/" in s), None)})
    return out


def read_password(path: Path | None) -> str | None:
    """The camera password from its file (first line), refusing a file others can read."""
    if path is None:
        return None
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o004:
        raise PermissionError(f"{path} is readable by everyone (mode {mode:o}); run: chmod o-r {path}")
    return path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
