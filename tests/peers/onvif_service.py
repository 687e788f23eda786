"""A small ONVIF camera for tests: a SOAP responder (http.server) that checks WS-Security digests.

It answers what the agent's real ONVIF client asks: GetSystemDateAndTime (no login, per the ONVIF core
spec), GetDeviceInformation, GetCapabilities, GetProfiles and GetStreamUri (digest login required:
Base64(SHA-1(nonce + created + password)) with a fresh Created). A wrong password gets the ONVIF
NotAuthorized fault. It also answers a WS-Discovery Probe sent to its UDP port (unicast, loopback).
`clock_offset_s` makes its clock run ahead or behind (and can be changed while it runs: a clock that steps);
with `digest_window_s` it refuses, as many cameras do, a digest whose Created is further off its own clock.

With `events` (the default) it has an event service with a PullPoint: GetEventProperties (the tamper topics it
offers), CreatePullPointSubscription (each new subscription first gets the current state of every topic
pushed so far, as `Initialized`), PullMessages (a long poll: it answers as soon as an event is pushed),
Renew and Unsubscribe on the subscription's own address. `push_event(topic, state)` is the camera seeing
something; `drop_subscriptions()` is the camera rebooting (pulls on an old subscription get a fault).

Run in-process: `OnvifCamera(...).start()`; `.stop()`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.etree import ElementTree

NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "wsse": "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd",
    "wsu": "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd",
}
ENVELOPE = ('<?xml version="1.0" encoding="UTF-8"?><s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" '
            'xmlns:tds="http://www.onvif.org/ver10/device/wsdl" xmlns:trt="http://www.onvif.org/ver10/media/wsdl" '
            'xmlns:tt="http://www.onvif.org/ver10/schema" xmlns:ter="http://www.onvif.org/ver10/error" '
            'xmlns:tev="http://www.onvif.org/ver10/events/wsdl" xmlns:wsnt="http://docs.oasis-open.org/wsn/b-2" '
            'xmlns:wsa="http://www.w3.org/2005/08/addressing" xmlns:wstop="http://docs.oasis-open.org/wsn/t-1" '
            'xmlns:tns1="http://www.onvif.org/ver10/topics" xmlns:wsrf-rw="http://docs.oasis-open.org/wsrf/rw-2">'
            "<s:Body>{body}</s:Body></s:Envelope>")
NOT_AUTHORIZED = ("<s:Fault><s:Code><s:Value>s:Sender</s:Value><s:Subcode><s:Value>ter:NotAuthorized</s:Value>"
                  "</s:Subcode></s:Code><s:Reason><s:Text xml:lang=\"en\">Sender not Authorized</s:Text></s:Reason>"
                  "</s:Fault>")
OPEN_OPERATIONS = {"GetSystemDateAndTime"}
EVENT_OPERATIONS = {"GetEventProperties", "CreatePullPointSubscription", "PullMessages", "Renew", "Unsubscribe"}
SUBSCRIPTION_OPERATIONS = {"CreatePullPointSubscription", "PullMessages", "Renew", "Unsubscribe"}
TAMPER_TOPICS = ("tns1:VideoSource/GlobalSceneChange/ImagingService", "tns1:VideoSource/ImageTooBlurry/ImagingService",
                 "tns1:VideoSource/ImageTooDark/ImagingService", "tns1:VideoSource/ImageTooBright/ImagingService",
                 "tns1:RuleEngine/TamperDetector/Tamper")
NO_SUBSCRIPTION = ("<s:Fault><s:Code><s:Value>s:Receiver</s:Value><s:Subcode><s:Value>wsrf-rw:ResourceUnknownFault"
                   "</s:Value></s:Subcode></s:Code><s:Reason><s:Text>no such subscription</s:Text></s:Reason>"
                   "</s:Fault>")


def _seconds(duration: str) -> float:
    """xs:duration (PT20S, PT1M) in seconds; anything else (an absolute time) counts as 60 s."""
    match = re.fullmatch(r"PT(?:(\d+)H)?(?:(\d+)M)?(?:([\d.]+)S)?", duration.strip())
    if not match:
        return 60.0
    hours, minutes, seconds = match.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)


class OnvifCamera:
    def __init__(self, port: int, stream_uri: str, *, username: str = "admin", password: str = "secret-1",
                 serial: str = "DS-2CD2T47G2-L20231105AACH123456789", model: str = "DS-2CD2T47G2-L",
                 clock_offset_s: int = 0, discovery_port: int | None = None, events: bool = True,
                 digest_window_s: float | None = None):
        self.port = port
        self.stream_uri = stream_uri
        self.username = username
        self.password = password
        self.serial = serial
        self.model = model
        self.clock_offset_s = clock_offset_s
        self.discovery_port = discovery_port
        self.events = events
        self.digest_window_s = digest_window_s   # refuse a digest whose Created is further off our clock
        self.calls: list[str] = []
        self.subscriptions_created = 0
        self._subscriptions: dict[int, list[str]] = {}     # id -> notification messages not pulled yet
        self._states: dict[tuple[str, str], tuple[str, bool]] = {}   # (topic, source) -> (data item, state)
        self._events_changed = threading.Condition()
        self._stopping = False
        self._http: ThreadingHTTPServer | None = None
        self._udp: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/onvif/device_service"

    def start(self) -> OnvifCamera:
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", "0"))
                status, body = camera.answer(self.rfile.read(length), self.path)
                data = ENVELOPE.format(body=body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/soap+xml; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass   # the client gave up on a long poll (the agent stopping): nothing to answer

            def log_message(self, *args: object) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._threads.append(threading.Thread(target=self._http.serve_forever, daemon=True))
        if self.discovery_port is not None:
            self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._udp.bind(("127.0.0.1", self.discovery_port))
            self._threads.append(threading.Thread(target=self._discovery, daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        with self._events_changed:
            self._stopping = True
            self._events_changed.notify_all()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._udp is not None:
            self._udp.close()

    # -- SOAP ----------------------------------------------------------------------------------

    def answer(self, request: bytes, path: str = "") -> tuple[int, str]:
        envelope = ElementTree.fromstring(request)
        body = envelope.find("s:Body", NS)
        operation = body[0].tag.rsplit("}", 1)[1] if body is not None and len(body) else ""
        self.calls.append(operation)
        if operation not in OPEN_OPERATIONS and not self._authorized(envelope):
            return 400, NOT_AUTHORIZED
        handler = getattr(self, f"_{operation}", None)
        if operation in EVENT_OPERATIONS and not self.events:
            handler = None
        if operation in SUBSCRIPTION_OPERATIONS and handler is not None:
            return handler(envelope, path)
        if handler is None:
            return 400, ("<s:Fault><s:Code><s:Value>s:Receiver</s:Value><s:Subcode><s:Value>ter:ActionNotSupported"
                         "</s:Value></s:Subcode></s:Code><s:Reason><s:Text>not supported</s:Text></s:Reason></s:Fault>")
        return 200, handler()

    def _authorized(self, envelope: ElementTree.Element) -> bool:
        token = envelope.find("s:Header/wsse:Security/wsse:UsernameToken", NS)
        if token is None:
            return False
        username = token.findtext("wsse:Username", default="", namespaces=NS)
        digest = token.findtext("wsse:Password", default="", namespaces=NS)
        nonce = token.findtext("wsse:Nonce", default="", namespaces=NS)
        created = token.findtext("wsu:Created", default="", namespaces=NS)
        expected = base64.b64encode(
            hashlib.sha1(base64.b64decode(nonce) + created.encode() + self.password.encode()).digest()).decode()
        if self.digest_window_s is not None:
            try:
                sent = dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
            except ValueError:
                return False
            if abs((sent - self._now()).total_seconds()) > self.digest_window_s:
                return False
        return username == self.username and digest == expected

    def _now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.clock_offset_s)

    def _GetSystemDateAndTime(self) -> str:  # noqa: N802 - ONVIF operation names
        now = self._now()
        return ("<tds:GetSystemDateAndTimeResponse><tds:SystemDateAndTime><tt:DateTimeType>Manual</tt:DateTimeType>"
                "<tt:DaylightSavings>false</tt:DaylightSavings><tt:TimeZone><tt:TZ>CST-8</tt:TZ></tt:TimeZone>"
                f"<tt:UTCDateTime><tt:Time><tt:Hour>{now.hour}</tt:Hour><tt:Minute>{now.minute}</tt:Minute>"
                f"<tt:Second>{now.second}</tt:Second></tt:Time><tt:Date><tt:Year>{now.year}</tt:Year>"
                f"<tt:Month>{now.month}</tt:Month><tt:Day>{now.day}</tt:Day></tt:Date></tt:UTCDateTime>"
                "</tds:SystemDateAndTime></tds:GetSystemDateAndTimeResponse>")

    def _GetDeviceInformation(self) -> str:  # noqa: N802
        return ("<tds:GetDeviceInformationResponse><tds:Manufacturer>HIKVISION</tds:Manufacturer>"
                f"<tds:Model>{self.model}</tds:Model><tds:FirmwareVersion>V5.7.3</tds:FirmwareVersion>"
                f"<tds:SerialNumber>{self.serial}</tds:SerialNumber><tds:HardwareId>88</tds:HardwareId>"
                "</tds:GetDeviceInformationResponse>")

    def _GetCapabilities(self) -> str:  # noqa: N802
        media = f"http://127.0.0.1:{self.port}/onvif/media_service"
        return ("<tds:GetCapabilitiesResponse><tds:Capabilities><tt:Media>"
                f"<tt:XAddr>{media}</tt:XAddr><tt:StreamingCapabilities><tt:RTPMulticast>false</tt:RTPMulticast>"
                "<tt:RTP_TCP>true</tt:RTP_TCP><tt:RTP_RTSP_TCP>true</tt:RTP_RTSP_TCP></tt:StreamingCapabilities>"
                "</tt:Media></tds:Capabilities></tds:GetCapabilitiesResponse>")

    def _GetServices(self) -> str:  # noqa: N802
        services = [("http://www.onvif.org/ver10/device/wsdl", self.url),
                    ("http://www.onvif.org/ver10/media/wsdl", f"http://127.0.0.1:{self.port}/onvif/media_service")]
        if self.events:
            services.append(("http://www.onvif.org/ver10/events/wsdl",
                             f"http://127.0.0.1:{self.port}/onvif/event_service"))
        return "<tds:GetServicesResponse>" + "".join(
            f"<tds:Service><tds:Namespace>{ns}</tds:Namespace><tds:XAddr>{xaddr}</tds:XAddr><tds:Version>"
            "<tt:Major>2</tt:Major><tt:Minor>60</tt:Minor></tds:Version></tds:Service>"
            for ns, xaddr in services) + "</tds:GetServicesResponse>"

    def _GetProfiles(self) -> str:  # noqa: N802
        return ('<trt:GetProfilesResponse><trt:Profiles token="Profile_1" fixed="true"><tt:Name>mainStream</tt:Name>'
                '</trt:Profiles><trt:Profiles token="Profile_2" fixed="true"><tt:Name>subStream</tt:Name>'
                "</trt:Profiles></trt:GetProfilesResponse>")

    def _GetStreamUri(self) -> str:  # noqa: N802
        return (f"<trt:GetStreamUriResponse><trt:MediaUri><tt:Uri>{self.stream_uri}</tt:Uri>"
                "<tt:InvalidAfterConnect>false</tt:InvalidAfterConnect><tt:InvalidAfterReboot>false"
                "</tt:InvalidAfterReboot><tt:Timeout>PT0S</tt:Timeout></trt:MediaUri></trt:GetStreamUriResponse>")

    # -- events (PullPoint) ------------------------------------------------------------------------

    def push_event(self, topic: str, state: bool, source: str = "VideoSource_1", item: str = "State") -> None:
        """The camera sees something: a `Changed` notification to every live subscription."""
        with self._events_changed:
            self._states[(topic, source)] = (item, state)
            for queue in self._subscriptions.values():
                queue.append(self._notification(topic, source, item, state, "Changed"))
            self._events_changed.notify_all()

    def drop_subscriptions(self) -> None:
        """The camera reboots: every subscription is gone (a pull on one gets a fault)."""
        with self._events_changed:
            self._subscriptions.clear()
            self._events_changed.notify_all()

    def _notification(self, topic: str, source: str, item: str, state: bool, operation: str) -> str:
        utc = self._now().strftime("%Y-%m-%dT%H:%M:%SZ")
        return ('<wsnt:NotificationMessage><wsnt:Topic Dialect="http://www.onvif.org/ver10/tev/topicExpression/'
                f'ConcreteSet">{topic}</wsnt:Topic><wsnt:Message><tt:Message UtcTime="{utc}" '
                f'PropertyOperation="{operation}"><tt:Source><tt:SimpleItem Name="VideoSourceConfigurationToken" '
                f'Value="{source}"/></tt:Source><tt:Data><tt:SimpleItem Name="{item}" '
                f'Value="{str(state).lower()}"/></tt:Data></tt:Message></wsnt:Message></wsnt:NotificationMessage>')

    def _times(self, seconds: float = 120) -> str:
        now = self._now()
        end = now + dt.timedelta(seconds=seconds)
        return (f"<wsnt:CurrentTime>{now:%Y-%m-%dT%H:%M:%SZ}</wsnt:CurrentTime>"
                f"<wsnt:TerminationTime>{end:%Y-%m-%dT%H:%M:%SZ}</wsnt:TerminationTime>")

    def _GetEventProperties(self) -> str:  # noqa: N802
        topics = ""
        for topic in TAMPER_TOPICS:
            parts = topic.removeprefix("tns1:").split("/")
            inner = f'<{parts[-1]} wstop:topic="true"/>'
            for part in reversed(parts[1:-1]):
                inner = f"<{part}>{inner}</{part}>"
            topics += f"<tns1:{parts[0]}>{inner}</tns1:{parts[0]}>"
        return ("<tev:GetEventPropertiesResponse><tev:TopicNamespaceLocation>http://www.onvif.org/onvif/ver10/topics/"
                "topicns.xml</tev:TopicNamespaceLocation><wsnt:FixedTopicSet>true</wsnt:FixedTopicSet>"
                f"<wstop:TopicSet>{topics}</wstop:TopicSet><wsnt:TopicExpressionDialect>http://www.onvif.org/ver10/"
                "tev/topicExpression/ConcreteSet</wsnt:TopicExpressionDialect><tev:MessageContentFilterDialect>"
                "http://www.onvif.org/ver10/tev/messageContentFilter/ItemFilter</tev:MessageContentFilterDialect>"
                "<tev:MessageContentSchemaLocation>http://www.onvif.org/onvif/ver10/schema/onvif.xsd"
                "</tev:MessageContentSchemaLocation></tev:GetEventPropertiesResponse>")

    def _CreatePullPointSubscription(self, envelope: ElementTree.Element, path: str) -> tuple[int, str]:  # noqa: N802
        with self._events_changed:
            self.subscriptions_created += 1
            number = self.subscriptions_created
            self._subscriptions[number] = [self._notification(topic, source, item, state, "Initialized")
                                           for (topic, source), (item, state) in self._states.items()]
        address = f"http://127.0.0.1:{self.port}/onvif/subscription/{number}"
        return 200, ("<tev:CreatePullPointSubscriptionResponse><tev:SubscriptionReference>"
                     f"<wsa:Address>{address}</wsa:Address></tev:SubscriptionReference>{self._times()}"
                     "</tev:CreatePullPointSubscriptionResponse>")

    def _subscription(self, path: str) -> int | None:
        match = re.search(r"/subscription/(\d+)$", path)
        number = int(match.group(1)) if match else None
        return number if number in self._subscriptions else None

    def _PullMessages(self, envelope: ElementTree.Element, path: str) -> tuple[int, str]:  # noqa: N802
        timeout = _seconds(envelope.findtext(".//{http://www.onvif.org/ver10/events/wsdl}Timeout") or "PT10S")
        deadline = time.monotonic() + timeout
        with self._events_changed:
            while True:
                number = self._subscription(path)
                if number is None:
                    return 400, NO_SUBSCRIPTION
                queue = self._subscriptions[number]
                remaining = deadline - time.monotonic()
                if queue or remaining <= 0 or self._stopping:
                    messages, queue[:] = list(queue), []
                    break
                self._events_changed.wait(remaining)
        now = self._now()
        return 200, (f"<tev:PullMessagesResponse><tev:CurrentTime>{now:%Y-%m-%dT%H:%M:%SZ}</tev:CurrentTime>"
                     f"<tev:TerminationTime>{now + dt.timedelta(seconds=120):%Y-%m-%dT%H:%M:%SZ}"
                     f"</tev:TerminationTime>{''.join(messages)}</tev:PullMessagesResponse>")

    def _Renew(self, envelope: ElementTree.Element, path: str) -> tuple[int, str]:  # noqa: N802
        with self._events_changed:
            if self._subscription(path) is None:
                return 400, NO_SUBSCRIPTION
        now = self._now()
        return 200, (f"<wsnt:RenewResponse><wsnt:TerminationTime>{now + dt.timedelta(seconds=120):%Y-%m-%dT%H:%M:%SZ}"
                     f"</wsnt:TerminationTime><wsnt:CurrentTime>{now:%Y-%m-%dT%H:%M:%SZ}</wsnt:CurrentTime>"
                     "</wsnt:RenewResponse>")

    def _Unsubscribe(self, envelope: ElementTree.Element, path: str) -> tuple[int, str]:  # noqa: N802
        with self._events_changed:
            number = self._subscription(path)
            if number is None:
                return 400, NO_SUBSCRIPTION
            del self._subscriptions[number]
        return 200, "<wsnt:UnsubscribeResponse/>"

    # -- WS-Discovery ------------------------------------------------------------------------------

    def _discovery(self) -> None:
        assert self._udp is not None
        while True:
            try:
                data, sender = self._udp.recvfrom(65536)
            except OSError:
                return
            if b"Probe" not in data:
                continue
            reply = ('<?xml version="1.0" encoding="UTF-8"?><s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"'
                     ' xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing"'
                     ' xmlns:d="http://schemas.xmlsoap.org/ws/2005/04/discovery"><s:Body><d:ProbeMatches>'
                     f"<d:ProbeMatch><a:EndpointReference><a:Address>urn:uuid:{self.serial}</a:Address>"
                     "</a:EndpointReference><d:Types>dn:NetworkVideoTransmitter</d:Types>"
                     f"<d:Scopes>onvif://www.onvif.org/name/{self.model} onvif://www.onvif.org/type/video_encoder"
                     f"</d:Scopes><d:XAddrs>{self.url}</d:XAddrs></d:ProbeMatch></d:ProbeMatches></s:Body>"
                     "</s:Envelope>")
            self._udp.sendto(reply.encode(), sender)
