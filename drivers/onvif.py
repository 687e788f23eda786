"""ONVIF: who a camera is, where its stream is, how far its clock is off, and what it says about itself.

The client is onvif-zeep-async (asyncio, aiohttp; docs/DESIGN-CHANGES.md says why). All ONVIF traffic of the
process runs on one event loop on one daemon thread that this module owns (`_loop()`, started on first use);
camera workers are threads and submit coroutines to it (`asyncio.run_coroutine_threadsafe(...).result(t)`).
The library parses each WSDL file once per process and keeps the document (`onvif.client._cached_document`),
so a camera that reconnects every few seconds for months costs a few SOAP calls, not a WSDL parse each time.

`probe(url, username, password, profile)` asks the device service at `url` for GetSystemDateAndTime
(unauthenticated by the ONVIF core spec; gives the clock offset, which then also corrects the
UsernameToken's Created time), GetServices (else GetCapabilities: where the media and event services are),
GetDeviceInformation (the serial becomes the device id), GetProfiles and GetStreamUri of the chosen profile
(by token or name; the first profile when none is configured). A refused login raises `OnvifAuthFailed`.

`CameraWatch` keeps watching one camera for as long as its worker runs: it reads the camera's clock every
`clock_check_s`, and where the camera offers a PullPoint (an event service: GetEventProperties,
CreatePullPointSubscription, PullMessages, Renew, Unsubscribe) it stays subscribed and hands every
notification to its listener as a `CameraEvent`. A subscription that is lost (the camera rebooted, a pull or
renewal failed) is created again with backoff, on a fresh session that measures the clock again (the digest's
Created time follows the camera's clock).

`discover()` sends one WS-Discovery Probe and lists who answered. It multicasts on the local network,
so it runs only when a custodian asks (`edge-agent devices discover`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit
from xml.etree import ElementTree

import aiohttp
import onvif.client
import zeep.exceptions
from onvif.client import ONVIFCamera, ONVIFService
from onvif.exceptions import ONVIFError

log = logging.getLogger(__name__)

DISCOVERY_ADDRESS = ("239.255.255.250", 3702)
EVENTS_NS = "http://www.onvif.org/ver10/events/wsdl"
SUBSCRIPTION = dt.timedelta(seconds=120)   # asked of the camera; the library renews at 80 % of what it grants
PULL_TIMEOUT = dt.timedelta(seconds=20)    # one PullMessages long-poll
RESUBSCRIBE_MAX_S = 60.0                   # backoff ceiling between attempts to subscribe again

# What a failed ONVIF exchange can raise: the library's errors, SOAP faults, HTTP and XML trouble, timeouts.
FAILURES = (ONVIFError, zeep.exceptions.Error, aiohttp.ClientError, TimeoutError, OSError)

T = TypeVar("T")


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


# -- the process's ONVIF event loop -----------------------------------------------------------------

_loop_lock = threading.Lock()
_event_loop: asyncio.AbstractEventLoop | None = None


def _loop() -> asyncio.AbstractEventLoop:
    """The one ONVIF event loop of this process, on its daemon thread `onvif-loop` (started on first use)."""
    global _event_loop  # noqa: PLW0603 - one loop per process, by design
    with _loop_lock:
        if _event_loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="onvif-loop", daemon=True).start()
            _event_loop = loop
        return _event_loop


def _run(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """Run `coro` on the ONVIF loop from a worker thread; cancelled there if it takes longer than `timeout`."""
    future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), _loop())
    try:
        return future.result(timeout + 5)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise


_documents_lock: asyncio.Lock | None = None
WSDL_DIR = Path(onvif.client.__file__).parent / "wsdl"
WSDL_FILES = ("devicemgmt.wsdl", "media.wsdl", "events.wsdl")


async def _documents() -> None:
    """Parse the WSDL files we use, one at a time, before any service is set up. The library caches each
    parsed document per process but does not guard the first load: two cameras starting together would
    both parse it. Once parsed, this is a few dictionary look-ups."""
    global _documents_lock  # noqa: PLW0603 - created on the ONVIF loop, once
    if _documents_lock is None:
        _documents_lock = asyncio.Lock()
    async with _documents_lock:
        for name in WSDL_FILES:
            await onvif.client._cached_document(str(WSDL_DIR / name))   # noqa: SLF001 - its per-process cache


class _Device(ONVIFCamera):
    """onvif-zeep-async's camera at a configured device service URL (the library assumes the path
    /onvif/device_service on host:port; cameras that serve it elsewhere are configured with their own)."""

    def __init__(self, url: str, username: str | None, password: str | None):
        parts = urlsplit(url)
        super().__init__(f"{parts.scheme}://{parts.hostname}", parts.port or (443 if parts.scheme == "https" else 80),
                         username or "", password or "", adjust_time=True)
        self.device_url = url

    def get_definition(self, name: str, port_type: str | None = None) -> tuple[str, str, str]:
        xaddr, wsdl, binding = super().get_definition(name, port_type)
        return (self.device_url if name == "devicemgmt" else xaddr), wsdl, binding


def _fail(exc: BaseException, what: str, url: str) -> OnvifError:
    text = str(exc) or type(exc).__name__
    subcodes = " ".join(str(code) for code in (getattr(exc, "subcodes", None) or []))
    if re.search(r"NotAuthorized|not authorized|Unauthorized|401|authentication|Sender not Authorized",
                 f"{text} {subcodes}", re.IGNORECASE):
        return OnvifAuthFailed(f"ONVIF {url}: {what} refused the credentials ({text}); check username and "
                               "password_file, and the camera's clock (digest logins expire)")
    return OnvifError(f"ONVIF {url}: {what} failed ({text}); check the address and that the camera is up")


def _camera_time(answer: Any) -> float | None:
    utc = getattr(answer, "UTCDateTime", None)
    if utc is None:
        return None
    return dt.datetime(utc.Date.Year, utc.Date.Month, utc.Date.Day, utc.Time.Hour, utc.Time.Minute,
                       utc.Time.Second, tzinfo=dt.UTC).timestamp()


async def _clock_offset(device: ONVIFService) -> int | None:
    """Camera clock minus ours, in ms (the camera reports whole seconds), read without logging in."""
    before = time.time()
    answer = await device.authless_GetSystemDateAndTime()
    after = time.time()
    camera = _camera_time(answer)
    return None if camera is None else int((camera - (before + after) / 2) * 1000)


async def _identify(url: str, username: str | None, password: str | None, profile: str | None) -> CameraIdentity:
    await _documents()
    device = _Device(url, username, password)
    try:
        step = "GetSystemDateAndTime"
        offset = await _clock_offset(await device.create_devicemgmt_service())
        step = "GetServices"
        await device.update_xaddrs()
        step = "GetDeviceInformation"
        info = await (await device.create_devicemgmt_service()).GetDeviceInformation()
        step = "GetProfiles"
        media = await device.create_media_service()
        profiles = await media.GetProfiles()
        chosen = _choose(profiles, profile, url)
        step = "GetStreamUri"
        answer = await media.GetStreamUri({"StreamSetup": {"Stream": "RTP-Unicast",
                                                           "Transport": {"Protocol": "RTSP"}},
                                           "ProfileToken": chosen.token})
    except OnvifError:
        raise
    except FAILURES as exc:
        raise _fail(exc, step, url) from exc
    finally:
        await device.close()
    return CameraIdentity(
        manufacturer=info.Manufacturer, model=info.Model, firmware=info.FirmwareVersion,
        serial=info.SerialNumber, hardware_id=info.HardwareId, profile_token=chosen.token,
        profile_name=getattr(chosen, "Name", None), stream_uri=answer.Uri, clock_offset_ms=offset,
    )


def probe(url: str, username: str | None, password: str | None, profile: str | None = None,
          timeout: float = 10.0) -> CameraIdentity:
    """Identity, stream URI and clock offset of the camera whose device service is at `url`."""
    try:
        return _run(_identify(url, username, password, profile), timeout)
    except TimeoutError as exc:
        raise OnvifError(f"ONVIF {url}: no answer within {timeout:g} s; check the address and that the camera "
                         "is up") from exc


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


# -- watching a camera: its clock and its events ----------------------------------------------------

@dataclass(frozen=True)
class CameraEvent:
    """One ONVIF notification: its topic (`tns1:VideoSource/GlobalSceneChange/ImagingService`), the source it
    is about (a video source token, if given), its boolean state (`State`, `IsTamper`, ...: the first boolean
    data item; None if it has none), the camera's time of it and its property operation (Initialized, Changed,
    Deleted: `Initialized` tells the current state right after subscribing)."""
    topic: str
    source: str | None
    state: bool | None
    utc_ms: int | None
    operation: str | None


class WatchListener(Protocol):
    """What a `CameraWatch` reports. Called from a thread of the ONVIF loop's executor, one call at a time
    per watch and in order; a slow listener delays only its own camera's next pull."""

    def clock_read(self, offset_ms: int) -> None: ...

    def camera_event(self, event: CameraEvent) -> None: ...

    def events_state(self, state: str, detail: str) -> None:
        """`subscribed`, `unsupported` (no event service or PullPoint), `lost` (with what failed)."""


def _text(value: Any) -> str | None:
    if value is None:
        return None
    inner = getattr(value, "_value_1", value)
    return str(inner).strip() if inner is not None else None


def _items(group: Any) -> list[tuple[str, str]]:
    items = getattr(group, "SimpleItem", None) or []
    return [(str(i.Name), str(i.Value)) for i in items if getattr(i, "Name", None) is not None]


def parse_notification(message: Any) -> CameraEvent | None:
    """A `CameraEvent` from one wsnt:NotificationMessage as zeep gives it; None if it has no topic."""
    topic = _text(getattr(message, "Topic", None))
    if not topic:
        return None
    body = getattr(getattr(message, "Message", None), "_value_1", None)
    source_items = _items(getattr(body, "Source", None))
    state = None
    for _, value in _items(getattr(body, "Data", None)):
        if value.lower() in ("true", "false", "1", "0"):
            state = value.lower() in ("true", "1")
            break
    utc = getattr(body, "UtcTime", None)
    utc_ms = int(utc.timestamp() * 1000) if isinstance(utc, dt.datetime) and utc.tzinfo is not None else None
    operation = getattr(body, "PropertyOperation", None)
    return CameraEvent(topic=topic, source=source_items[0][1] if source_items else None, state=state,
                       utc_ms=utc_ms, operation=str(operation) if operation is not None else None)


WSTOP_TOPIC = "{http://docs.oasis-open.org/wsn/t-1}topic"


def offered_topics(topic_set: Any) -> list[str]:
    """The topics of a GetEventProperties TopicSet (`tns1:VideoSource/GlobalSceneChange/ImagingService`, ...):
    every element marked wstop:topic="true", named by its path from the root."""
    found: list[str] = []

    def walk(element: Any, path: list[str]) -> None:
        tag = getattr(element, "tag", None)
        if not isinstance(tag, str):
            return                                  # comments and processing instructions
        here = [*path, tag.rsplit("}", 1)[-1]]
        if str(element.get(WSTOP_TOPIC, "")).lower() == "true":
            found.append("tns1:" + "/".join(here))
        for child in element:
            walk(child, here)

    for root in getattr(topic_set, "_value_1", None) or []:
        walk(root, [])
    return found


class CameraWatch:
    """One camera's clock (read every `clock_check_s`) and events (PullPoint, when `events` and the camera
    offers one), on the ONVIF loop, reported to `listener`, from `start()` until `stop()`."""

    def __init__(self, url: str, username: str | None, password: str | None, listener: WatchListener, *,
                 clock_check_s: float, events: bool = True, timeout: float = 10.0):
        self.url = url
        self.username = username
        self.password = password
        self.listener = listener
        self.clock_check_s = clock_check_s
        self.events = events
        self.timeout = timeout
        self.subscriptions = 0        # PullPoint subscriptions created so far (a lost one is created again)
        self.topics: list[str] = []   # what the camera's GetEventProperties offers
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        async def spawn() -> asyncio.Task[None]:
            task = asyncio.create_task(self._watch(), name=f"onvif-watch {self.url}")
            task.add_done_callback(self._ended)
            return task
        self._task = _run(spawn(), 5.0)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("onvif_watch_ended url=%s: the camera's clock and events are no longer watched until the "
                      "agent restarts", self.url, exc_info=task.exception())

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching, after unsubscribing from the camera if it still answers within `timeout`."""
        task = self._task
        if task is None:
            return

        async def cancel() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        try:
            _run(cancel(), timeout)
        except TimeoutError:
            log.warning("onvif_watch_stop_slow url=%s: the camera did not answer the Unsubscribe in time", self.url)

    async def _report(self, method: str, *args: Any) -> None:
        """Hand a report to the listener off the loop. A listener that fails (its catalog write, say) loses
        that report, logged with its traceback; the watch goes on."""
        try:
            await asyncio.to_thread(getattr(self.listener, method), *args)
        except Exception:   # noqa: BLE001 - the listener's own fault must not end the camera's watch
            log.exception("onvif_listener_failed url=%s report=%s args=%r", self.url, method, args)

    async def _watch(self) -> None:
        await _documents()
        tasks = [asyncio.create_task(self._clock())]
        if self.events:
            tasks.append(asyncio.create_task(self._events()))
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            # gather has cancelled them; wait for their cleanup (Unsubscribe, closing sessions) to finish.
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _clock(self) -> None:
        device = _Device(self.url, self.username, self.password)
        try:
            service = await device.create_devicemgmt_service()
            while True:
                await asyncio.sleep(self.clock_check_s)
                try:
                    offset = await asyncio.wait_for(_clock_offset(service), self.timeout)
                except FAILURES as exc:
                    log.info("onvif_clock_unread url=%s error=%s", self.url, exc)
                    continue
                if offset is not None:
                    await self._report("clock_read", offset)
        finally:
            await device.close()

    async def _events(self) -> None:
        backoff = 1.0
        while True:
            device = _Device(self.url, self.username, self.password)
            manager = None
            try:
                await asyncio.wait_for(device.update_xaddrs(), self.timeout)   # measures the clock again
                if EVENTS_NS not in device.xaddrs:
                    await self._report("events_state", "unsupported", "the camera lists no event service")
                    return
                events = await device.create_events_service()
                properties = await asyncio.wait_for(events.GetEventProperties(), self.timeout)
                self.topics = offered_topics(getattr(properties, "TopicSet", None))
                lost = asyncio.Event()
                manager = await asyncio.wait_for(device.create_pullpoint_manager(SUBSCRIPTION, lost.set),
                                                 self.timeout)
                self.subscriptions += 1
                await self._report("events_state", "subscribed", f"subscription {self.subscriptions}")
                backoff = 1.0
                pullpoint = manager.get_service()
                while not lost.is_set():
                    answer = await asyncio.wait_for(
                        pullpoint.PullMessages({"Timeout": PULL_TIMEOUT, "MessageLimit": 100}),
                        PULL_TIMEOUT.total_seconds() + self.timeout)
                    for message in getattr(answer, "NotificationMessage", None) or []:
                        event = parse_notification(message)
                        if event is not None:
                            await self._report("camera_event", event)
                raise OnvifError("the camera did not renew the subscription")
            except FAILURES + (OnvifError,) as exc:
                log.warning("onvif_events_lost url=%s error=%s; subscribing again in %.0f s", self.url, exc,
                            backoff)
                await self._report("events_state", "lost", str(exc) or type(exc).__name__)
            finally:
                if manager is not None:
                    await _quietly(manager.shutdown(), self.timeout)
                await device.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESUBSCRIBE_MAX_S)


async def _quietly(coro: Coroutine[Any, Any, Any], timeout: float) -> None:
    """A courtesy call (Unsubscribe) to a camera that may be gone: its failure changes nothing."""
    try:
        await asyncio.wait_for(coro, timeout)
    except FAILURES as exc:
        log.debug("onvif courtesy call failed: %s", exc)


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
