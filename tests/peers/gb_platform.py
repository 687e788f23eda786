"""A small GB/T 28181 platform (SIP server side) on 127.0.0.1, asyncio in its own thread, for the query flows
SIPp scenarios make awkward: it challenges and accepts REGISTER, answers keepalives, sends Catalog /
DeviceInfo / RecordInfo queries and collects the device's Response MESSAGEs until their SumNum is reached.
The REGISTER flow with an independent digest check is SIPp's (tests/peers/sipp/platform_register.xml)."""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from edge_agent.protocol import manscdp, sip

SERVER_ID = "34020000002000000001"
DOMAIN = "3402000000"


@dataclass
class QueryResult:
    status: int                         # the device's answer to the query MESSAGE itself
    responses: list[manscdp.Manscdp] = field(default_factory=list)

    def items(self, list_name: str) -> list[dict[str, str]]:
        return [item for doc in self.responses for item in doc.lists.get(list_name, [])]


class GbPlatform:
    def __init__(self, password: str, grant_expires: int | None = None, answer_keepalives: bool = True):
        self.password = password
        self.answer_keepalives = answer_keepalives   # False: a platform that lost the device's keepalives
        self.grant_expires = grant_expires   # None: grant what the device asks for
        self.loop = asyncio.new_event_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0
        self.device: tuple[str, int] | None = None
        self.registered = threading.Event()
        self.unregistered = threading.Event()   # an authenticated REGISTER with Expires: 0
        self.registrations = 0                  # REGISTERs accepted (200), under _counted
        self._counted = threading.Condition()
        self.keepalives: queue.Queue[manscdp.Manscdp] = queue.Queue()
        self.messages: queue.Queue[manscdp.Manscdp] = queue.Queue()   # Response MESSAGEs from the device
        self.replies: queue.Queue[sip.SipMessage] = queue.Queue()     # the device's answers to our requests
        self._sn = 100
        self._thread = threading.Thread(target=self.loop.run_forever, name="gb-platform", daemon=True)

    def __enter__(self) -> GbPlatform:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self._close)
        self._thread.join(5)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.loop.stop()

    async def _open(self) -> None:
        platform = self

        class Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                platform._received(data, addr)

        transport, _ = await self.loop.create_datagram_endpoint(Protocol, local_addr=("127.0.0.1", 0))
        self.transport = transport   # type: ignore[assignment]
        self.port = transport.get_extra_info("sockname")[1]

    # -- what the device sends -----------------------------------------------------------------------

    def _received(self, data: bytes, addr: tuple[str, int]) -> None:
        message = sip.parse(data)
        if not message.is_request:
            self.replies.put(message)
            return
        if message.method == "REGISTER":
            self._register(message, addr)
        elif message.method == "MESSAGE":
            doc = manscdp.parse_body(message.body)
            if doc.cmd_type == "Keepalive":
                if self.answer_keepalives:
                    self._reply(message, 200, "OK", addr)
                    self.keepalives.put(doc)
                return
            self._reply(message, 200, "OK", addr)
            self.messages.put(doc)

    def _register(self, request: sip.SipMessage, addr: tuple[str, int]) -> None:
        auth = request.header("Authorization")
        if auth is None or not sip.check_authorization(auth, password=self.password, method="REGISTER"):
            self._reply(request, 401, "Unauthorized", addr,
                        ("WWW-Authenticate", f'Digest realm="{DOMAIN}", nonce="{sip.new_token()}", algorithm=MD5'))
            return
        asked = request.header("Expires") or "3600"
        granted = asked if asked == "0" or self.grant_expires is None else str(self.grant_expires)
        self._reply(request, 200, "OK", addr, ("Expires", granted))
        self.device = addr
        (self.unregistered if asked == "0" else self.registered).set()
        with self._counted:
            self.registrations += asked != "0"
            self._counted.notify_all()

    def wait_registrations(self, count: int, timeout: float) -> bool:
        with self._counted:
            return self._counted.wait_for(lambda: self.registrations >= count, timeout)

    def _reply(self, request: sip.SipMessage, status: int, reason: str, addr: tuple[str, int],
               *extra: tuple[str, str]) -> None:
        reply = sip.SipMessage(status=status, reason=reason)
        for name in ("Via", "From", "To", "Call-ID", "CSeq"):
            reply.add(name, request.header(name) or "")
        for name, value in extra:
            reply.add(name, value)
        assert self.transport is not None
        self.transport.sendto(reply.render(), addr)

    # -- what the platform asks ----------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        assert self.transport is not None and self.device is not None
        self.loop.call_soon_threadsafe(self.transport.sendto, data, self.device)

    def query_message(self, device_id: str, cmd: str, sn: int, fields: dict[str, str],
                      charset: str = "GB2312") -> sip.SipMessage:
        message = sip.SipMessage(method="MESSAGE", uri=f"sip:{device_id}@{DOMAIN}")
        message.add("Via", f"SIP/2.0/UDP 127.0.0.1:{self.port};rport;branch=z9hG4bK{sip.new_token()}")
        message.add("From", f"<sip:{SERVER_ID}@{DOMAIN}>;tag={sip.new_token()}")
        message.add("To", f"<sip:{device_id}@{DOMAIN}>")
        message.add("Call-ID", sip.new_token(12))
        message.add("CSeq", "1 MESSAGE")
        message.add("Max-Forwards", "70")
        message.add("Content-Type", manscdp.CONTENT_TYPE)
        message.body = manscdp.render_body(manscdp.Manscdp("Query", cmd, sn, device_id, fields), charset)
        return message

    def query(self, device_id: str, cmd: str, timeout: float = 10, **fields: str) -> QueryResult:
        """Send one Query; wait for the device's answer to it and, when 200, its Responses up to SumNum."""
        self._sn += 1
        sn = self._sn
        message = self.query_message(device_id, cmd, sn, fields)
        self.send_raw(message.render())
        reply = self.replies.get(timeout=timeout)
        while reply.call_id != message.call_id:
            reply = self.replies.get(timeout=timeout)
        result = QueryResult(reply.status or 0)
        if result.status != 200:
            return result
        while True:
            doc = self.messages.get(timeout=timeout)
            if doc.sn != sn:
                continue
            result.responses.append(doc)
            total = int(doc.get("SumNum") or 0)
            list_name = "DeviceList" if cmd == "Catalog" else "RecordList"
            if cmd == "DeviceInfo" or len(result.items(list_name)) >= total:
                return result

    def status(self) -> dict[str, Any]:
        return {"port": self.port, "device": self.device, "registered": self.registered.is_set()}
