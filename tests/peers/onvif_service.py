"""A small ONVIF camera for tests: a SOAP responder (http.server) that checks WS-Security digests.

It answers what the agent's real ONVIF client asks: GetSystemDateAndTime (no login, per the ONVIF core
spec), GetDeviceInformation, GetCapabilities, GetProfiles and GetStreamUri (digest login required:
Base64(SHA-1(nonce + created + password)) with a fresh Created). A wrong password gets the ONVIF
NotAuthorized fault. It also answers a WS-Discovery Probe sent to its UDP port (unicast, loopback).
`clock_offset_s` makes its clock run ahead or behind.

Run in-process: `OnvifCamera(...).start()`; `.stop()`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.etree import ElementTree

NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "wsse": "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd",
    "wsu": "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd",
}
ENVELOPE = ('<?xml version="1.0" encoding="UTF-8"?><s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" '
            'xmlns:tds="http://www.onvif.org/ver10/device/wsdl" xmlns:trt="http://www.onvif.org/ver10/media/wsdl" '
            'xmlns:tt="http://www.onvif.org/ver10/schema" xmlns:ter="http://www.onvif.org/ver10/error">'
            "<s:Body>{body}</s:Body></s:Envelope>")
NOT_AUTHORIZED = ("<s:Fault><s:Code><s:Value>s:Sender</s:Value><s:Subcode><s:Value>ter:NotAuthorized</s:Value>"
                  "</s:Subcode></s:Code><s:Reason><s:Text xml:lang=\"en\">Sender not Authorized</s:Text></s:Reason>"
                  "</s:Fault>")
OPEN_OPERATIONS = {"GetSystemDateAndTime"}


class OnvifCamera:
    def __init__(self, port: int, stream_uri: str, *, username: str = "admin", password: str = "secret-1",
                 serial: str = "DS-2CD2T47G2-L20231105AACH123456789", model: str = "DS-2CD2T47G2-L",
                 clock_offset_s: int = 0, discovery_port: int | None = None, events: bool = True):
        self.port = port
        self.stream_uri = stream_uri
        self.username = username
        self.password = password
        self.serial = serial
        self.model = model
        self.clock_offset_s = clock_offset_s
        self.discovery_port = discovery_port
        self.events = events
        self.calls: list[str] = []
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
                status, body = camera.answer(self.rfile.read(length))
                data = ENVELOPE.format(body=body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/soap+xml; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

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
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._udp is not None:
            self._udp.close()

    # -- SOAP ----------------------------------------------------------------------------------

    def answer(self, request: bytes) -> tuple[int, str]:
        envelope = ElementTree.fromstring(request)
        body = envelope.find("s:Body", NS)
        operation = body[0].tag.rsplit("}", 1)[1] if body is not None and len(body) else ""
        self.calls.append(operation)
        if operation not in OPEN_OPERATIONS and not self._authorized(envelope):
            return 400, NOT_AUTHORIZED
        handler = getattr(self, f"_{operation}", None)
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
