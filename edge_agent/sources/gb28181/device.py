"""The gateway as a GB/T 28181 device: registers with the platform's SIP server, keeps alive, answers queries.

One thread, one UDP socket (`select` on it and a wake pipe, timers as deadlines). Registration: REGISTER
without credentials, the server's 401 challenge answered with an MD5 digest (`protocol/sip.py`), the
binding refreshed at three quarters of the granted Expires, a failure (403, no answer within 32 s, a second
401) retried every `RETRY_S`. While registered, a Keepalive Notify MESSAGE every `keepalive_s`; after
`keepalive_misses` unanswered, the device counts itself unregistered and registers again. Unregistered
longer than `unregistered_alarm_s`: alarm `gb28181_unregistered` (cleared once registered).

Queries (MESSAGE with a MANSCDP Query body) are taken only from the configured server's address: answered
200 at once, then with Response MESSAGEs (`answers.py`); a long DeviceList or RecordList is split into
several MESSAGEs of at most `ITEMS_PER_MESSAGE` Items, each carrying the full SumNum (§A.2.6 allows this).
A query for a channel the gateway does not have is answered 404, an unsupported CmdType 501, a body that
does not parse 400. Datagrams that are not SIP, too large, or from another address are dropped and counted
in health (`dropped`), never answered. Every request the device sends is retransmitted on the RFC 3261
schedule (T1 = 0.5 s doubling to T2 = 4 s) until a final response or 32 s.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_agent.catalog import Catalog
from edge_agent.clock import now_ms
from edge_agent.config import AgentConfig, ConfigError, Problem
from edge_agent.protocol import manscdp, sip
from edge_agent.protocol.heartbeat import Heartbeat, Vital
from edge_agent.sources.gb28181.answers import Answers, parse_gb_time

log = logging.getLogger(__name__)

ALARM_KIND = "gb28181_unregistered"
ITEMS_PER_MESSAGE = 4
RETRY_S = 30.0
T1_S, T2_S, TIMER_F_S = 0.5, 4.0, 32.0
RECV_BYTES = 65536
RECENT_REQUESTS = 64   # the platform's requests whose answer is kept, to answer its retransmissions alike


@dataclass
class _Pending:
    """A request sent and not yet answered finally: retransmitted until `deadline`."""

    datagram: bytes
    purpose: str          # register | keepalive | response
    next_send: float
    interval: float
    deadline: float


class GbDevice:
    """The `[gb28181]` component: `start()`, `stop()`, `health()` (the `gb28181` fragment)."""

    def __init__(self, config: AgentConfig, catalog: Catalog,
                 cameras_online: Callable[[], dict[str, bool]] | None = None):
        self.config = config
        self.section = config.gb28181
        self.catalog = catalog
        self.password = self.section.read_password()
        self.answers = Answers(config, catalog, cameras_online)
        self.device_id = self.section.device_id or ""
        self.server_uri = f"sip:{self.section.server_id}@{self.section.domain}"
        self.local_port = 0
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.heartbeat = Heartbeat("gb28181")
        self._changed = threading.Condition()
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._recent: OrderedDict[tuple[str, str], bytes] = OrderedDict()   # (Call-ID, CSeq) -> our answer
        self._server: tuple[str, int] = ("", 0)
        self._local_ip = ""
        self._tag = sip.new_token()
        self._reg_call_id = ""
        self._cseq = 0
        self._challenged_with: str | None = None
        self._challenge: dict[str, str] | None = None   # the last accepted one: a clean stop's unregister reuses it
        self._next_register = 0.0
        self._refresh_at: float | None = None
        self._next_keepalive: float | None = None
        self._keepalive_out: tuple[str, int] | None = None
        self._sn = 0
        # health, guarded by _changed
        self.registered = False
        self.registered_ms: int | None = None
        self.last_keepalive_ok_ms: int | None = None
        self.keepalives_unanswered = 0
        self.last_error: str | None = None
        self.unregistered_since = time.monotonic()
        self.failures = 0
        self._alarmed = False
        self.answered: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self._open()

    # -- life --------------------------------------------------------------------------------------

    def _open(self) -> None:
        """Resolve the server (IPv4, once) and bind the socket, at build: a wrong host or a port in use stops
        the daemon at start with the key to fix (ConfigError)."""
        section = self.section
        try:
            info = socket.getaddrinfo(section.server_host, section.server_port, socket.AF_INET, socket.SOCK_DGRAM)
        except OSError as exc:
            problem = Problem("gb28181.server_host", section.server_host,
                              f"cannot be resolved ({exc}); give the SIP server's address")
            raise ConfigError("[gb28181]", [problem]) from None
        self._server = info[0][4][0], section.server_port
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._sock.bind((section.local_host, section.local_port))
        except OSError as exc:
            self._sock.close()
            raise ConfigError("[gb28181]", [Problem(
                "gb28181.local_port", section.local_port,
                f"cannot listen on UDP {section.local_host}:{section.local_port} ({exc.strerror}); choose a free "
                "port, or check gb28181.local_host is an address of this machine")]) from None
        self.local_port = self._sock.getsockname()[1]
        self._local_ip = self._route_ip() if section.local_host == "0.0.0.0" else section.local_host

    def start(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        self._stop.clear()
        self._start_thread()
        log.info("gb28181_started device_id=%s server=%s:%d local_port=%d", self.device_id, *self._server,
                 self.local_port)

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gb28181", daemon=True)
        self._thread.start()

    def vitals(self) -> list[Vital]:
        """The device's thread for ops/liveness.py: beats each time round, idle while it waits for a datagram
        or its next timer; restarted with a new thread (same socket and state) if an error ended it."""
        def alive() -> bool:
            return self._thread is None or self._stop.is_set() or self._thread.is_alive()

        def restart() -> None:
            if self._thread is not None and not self._stop.is_set() and not self._thread.is_alive():
                log.error("gb28181 thread had died; starting it again")
                self._start_thread()
        return [Vital(self.heartbeat.name, self.heartbeat, alive, restart)]

    def _route_ip(self) -> str:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.connect(self._server)
            return str(probe.getsockname()[0])
        finally:
            probe.close()

    def stop(self) -> None:
        if self._thread is None:   # built, never started
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            return
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join(10)
        if self.registered and self._sock is not None:   # say goodbye: a REGISTER with Expires 0, once
            authorization = None if self._challenge is None else sip.digest_response(
                self._challenge, username=self.device_id, password=self.password, method="REGISTER",
                uri=self.server_uri, nc=2)
            try:
                self._sock.sendto(self._register_request(0, authorization).render(), self._server)
            except OSError as exc:
                log.warning("gb28181_unregister_failed error=%s", exc)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._thread = None

    # -- health ------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        with self._changed:
            return {"gb28181": self._health()}

    def _health(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "server": f"{self._server[0]}:{self._server[1]}",
                "registered": self.registered, "registered_ms": self.registered_ms,
                "last_keepalive_ok_ms": self.last_keepalive_ok_ms,
                "keepalives_unanswered": self.keepalives_unanswered, "last_error": self.last_error,
                "failures": self.failures, "answered": dict(self.answered), "dropped": dict(self.dropped)}

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
        """Block until `predicate(health fragment)` holds (each change is notified), or `timeout` s."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._health()), timeout)

    def _note(self, **changes: Any) -> None:
        with self._changed:
            for key, value in changes.items():
                setattr(self, key, value)
            self._changed.notify_all()

    def _count(self, counter: Counter[str], key: str) -> bool:
        """Count one; True when this count should be logged (the 1st, 10th, 100th…: a flood of hostile
        datagrams must not become a flood of log lines)."""
        with self._changed:
            counter[key] += 1
            self._changed.notify_all()
            count = counter[key]
        return count == 10 ** (len(str(count)) - 1)

    # -- the loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            now = time.monotonic()
            deadlines = [self._next_register, *(p.next_send for p in self._pending.values())]
            deadlines += [t for t in (self._refresh_at, self._next_keepalive) if t is not None]
            wait = max(0.0, min(deadlines) - now)
            self.heartbeat.idle()   # waiting for the platform or the next timer is not being stuck
            readable, _, _ = select.select([self._sock, self._wake_r], [], [], wait)
            self.heartbeat.beat()
            if self._sock in readable:
                try:
                    data, addr = self._sock.recvfrom(RECV_BYTES)
                except OSError as exc:   # an ICMP port unreachable from the last send, say
                    log.debug("gb28181_recv error=%s", exc)
                else:
                    self._datagram(data, addr)
            self._timers(time.monotonic())

    def _timers(self, now: float) -> None:
        if not self.registered and now >= self._next_register and not self._register_pending():
            self._begin_register()
        if self._refresh_at is not None and now >= self._refresh_at:
            self._refresh_at = None
            self._begin_register()
        if self._next_keepalive is not None and now >= self._next_keepalive:
            self._keepalive(now)
        for key, pending in list(self._pending.items()):
            if now >= pending.deadline:
                del self._pending[key]
                self._timed_out(pending)
            elif now >= pending.next_send:
                self._send(pending.datagram)
                pending.interval = min(pending.interval * 2, T2_S)
                pending.next_send = now + pending.interval
        self._judge_alarm(now)

    def _register_pending(self) -> bool:
        return any(p.purpose == "register" for p in self._pending.values())

    def _timed_out(self, pending: _Pending) -> None:
        if pending.purpose == "register":
            self._failed("no answer from the SIP server within 32 s")

    def _send(self, datagram: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendto(datagram, self._server)
        except OSError as exc:
            log.warning("gb28181_send_failed server=%s:%d error=%s", *self._server, exc)

    def _request(self, message: sip.SipMessage, purpose: str) -> None:
        datagram = message.render()
        now = time.monotonic()
        self._pending[(message.call_id, message.cseq[0])] = _Pending(datagram, purpose, now + T1_S, T1_S,
                                                                      now + TIMER_F_S)
        self._send(datagram)

    def _base(self, method: str, call_id: str, cseq: int) -> sip.SipMessage:
        message = sip.SipMessage(method=method, uri=self.server_uri)
        message.add("Via", f"SIP/2.0/UDP {self._local_ip}:{self.local_port};rport;branch=z9hG4bK{sip.new_token()}")
        message.add("From", f"<sip:{self.device_id}@{self.section.domain}>;tag={self._tag}")
        message.add("To", f"<{self.server_uri}>" if method != "REGISTER"
                    else f"<sip:{self.device_id}@{self.section.domain}>")
        message.add("Call-ID", call_id)
        message.add("CSeq", f"{cseq} {method}")
        message.add("Max-Forwards", "70")
        message.add("User-Agent", "edge-agent")
        return message

    # -- registration ------------------------------------------------------------------------------

    def _register_request(self, expires: int | None = None, authorization: str | None = None) -> sip.SipMessage:
        self._cseq += 1
        message = self._base("REGISTER", self._reg_call_id, self._cseq)
        message.uri = self.server_uri
        message.add("Contact", f"<sip:{self.device_id}@{self._local_ip}:{self.local_port}>")
        message.add("Expires", str(self.section.expires_s if expires is None else expires))
        if authorization is not None:
            message.add("Authorization", authorization)
        return message

    def _begin_register(self) -> None:
        self._reg_call_id = self._reg_call_id or f"{sip.new_token(12)}@{self._local_ip}"
        self._challenged_with = None
        self._request(self._register_request(), "register")

    def _register_answered(self, response: sip.SipMessage) -> None:
        status = response.status or 0
        if status in (401, 407):
            header = response.header("WWW-Authenticate" if status == 401 else "Proxy-Authenticate") or ""
            try:
                challenge = sip.parse_challenge(header)
            except sip.SipError as exc:
                self._failed(f"the server's challenge is not usable: {exc}")
                return
            stale = challenge.get("stale", "").lower() == "true"
            if self._challenged_with is not None and not stale:
                self._failed("the server refused the password (401 after our digest): check "
                             "[gb28181] password and device_id against the platform's record of this device")
                return
            self._challenged_with = challenge["nonce"]
            self._challenge = challenge
            authorization = sip.digest_response(challenge, username=self.device_id, password=self.password,
                                                method="REGISTER", uri=self.server_uri)
            name = "Authorization" if status == 401 else "Proxy-Authorization"
            message = self._register_request(authorization=None)
            message.add(name, authorization)
            self._request(message, "register")
        elif 200 <= status < 300:
            expires = _granted_expires(response, self.section.expires_s)
            now = time.monotonic()
            self._refresh_at = now + expires * 0.75
            self._next_keepalive = now   # the first keepalive at once: the platform marks the device online
            self._keepalive_out = None
            self._clear_alarm()
            self._note(registered=True, registered_ms=now_ms(), last_error=None, keepalives_unanswered=0)
            log.info("gb28181_registered server=%s:%d expires_s=%d", *self._server, expires)
        elif status >= 300:
            self._failed(f"REGISTER answered {status} {response.reason}")

    def _failed(self, error: str) -> None:
        self._next_register = time.monotonic() + RETRY_S
        self._refresh_at = None
        self._next_keepalive = None
        with self._changed:
            if self.registered:
                self.unregistered_since = time.monotonic()
            self.registered = False
            self.last_error = error
            self.failures += 1
            log.warning("gb28181_register_failed server=%s:%d error=%s", *self._server, error)
            self._judge_alarm(time.monotonic())   # before the change is told: a waiter sees the alarm too
            self._changed.notify_all()

    def _judge_alarm(self, now: float) -> None:
        if self.registered or self.failures == 0 or self._alarmed:
            return
        if now - self.unregistered_since >= self.section.unregistered_alarm_s:
            self._alarmed = True   # raised once per outage: not one transaction per datagram while it lasts
            self.catalog.raise_alarm(
                f"{ALARM_KIND}:{self.device_id}", ALARM_KIND, self.device_id,
                f"not registered with the GB/T 28181 platform {self._server[0]}:{self._server[1]} "
                f"({self.last_error}); check [gb28181] server_host, server_port, device_id and password")

    def _clear_alarm(self) -> None:
        self._alarmed = False
        self.catalog.clear_alarm(f"{ALARM_KIND}:{self.device_id}")

    # -- keepalive ---------------------------------------------------------------------------------

    def _keepalive(self, now: float) -> None:
        if self._keepalive_out is not None:
            self._pending.pop(self._keepalive_out, None)
            unanswered = self.keepalives_unanswered + 1
            self._note(keepalives_unanswered=unanswered)
            if unanswered >= self.section.keepalive_misses:
                self._keepalive_out = None
                self._failed(f"{unanswered} keepalives unanswered")
                self._next_register = now
                return
        self._next_keepalive = now + self.section.keepalive_s
        body = manscdp.Manscdp("Notify", "Keepalive", self._next_sn(), self.device_id, {"Status": "OK"})
        message = self._message(body)
        self._keepalive_out = (message.call_id, message.cseq[0])
        self._request(message, "keepalive")

    def _keepalive_answered(self, response: sip.SipMessage) -> None:
        self._keepalive_out = None
        if response.status == 200:
            self._note(last_keepalive_ok_ms=now_ms(), keepalives_unanswered=0)
        elif (response.status or 0) >= 300:   # the platform no longer knows us: register again
            self._failed(f"keepalive answered {response.status} {response.reason}")
            self._next_register = time.monotonic()

    def _next_sn(self) -> int:
        self._sn += 1
        return self._sn

    def _message(self, doc: manscdp.Manscdp) -> sip.SipMessage:
        message = self._base("MESSAGE", f"{sip.new_token(12)}@{self._local_ip}", 1)
        message.add("Content-Type", manscdp.CONTENT_TYPE)
        message.body = manscdp.render_body(doc, self.section.charset)
        return message

    # -- what arrives ------------------------------------------------------------------------------

    def _datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if (addr[0], addr[1]) != self._server:
            if self._count(self.dropped, "unexpected_source"):
                log.warning("gb28181_dropped reason=unexpected_source from=%s:%d bytes=%d count=%d", addr[0], addr[1],
                            len(data), self.dropped["unexpected_source"])
            return
        if data.strip(b"\r\n") == b"":   # a CRLF keepalive ping (RFC 5626): nothing to answer
            return
        try:
            message = sip.parse(data)
        except sip.SipError as exc:
            reason = "oversized" if len(data) > sip.MAX_MESSAGE else "malformed"
            if self._count(self.dropped, reason):
                log.warning("gb28181_dropped reason=%s error=%s from=%s:%d bytes=%d count=%d", reason, exc, addr[0],
                            addr[1], len(data), self.dropped[reason])
            return
        if message.is_request:
            self._incoming(message)
        else:
            self._response(message)

    def _response(self, response: sip.SipMessage) -> None:
        try:
            key = (response.call_id, response.cseq[0])
        except ValueError:
            return
        pending = self._pending.get(key)
        if pending is None or (response.status or 0) < 200:
            return
        del self._pending[key]
        if pending.purpose == "register":
            self._register_answered(response)
        elif pending.purpose == "keepalive" and key == self._keepalive_out:
            self._keepalive_answered(response)

    def _reply(self, request: sip.SipMessage, status: int, reason: str) -> None:
        reply = sip.SipMessage(status=status, reason=reason)
        for via in request.header_all("Via"):
            reply.add("Via", via)
        reply.add("From", request.header("From") or "")
        to = request.header("To") or ""
        reply.add("To", to if sip.tag_of(to) else f"{to};tag={self._tag}")
        reply.add("Call-ID", request.call_id)
        reply.add("CSeq", request.header("CSeq") or "")
        reply.add("User-Agent", "edge-agent")
        datagram = reply.render()
        self._recent[(request.call_id, request.header("CSeq") or "")] = datagram
        while len(self._recent) > RECENT_REQUESTS:
            self._recent.popitem(last=False)
        self._send(datagram)

    def _incoming(self, request: sip.SipMessage) -> None:
        if request.method == "ACK":
            return
        answered = self._recent.get((request.call_id, request.header("CSeq") or ""))
        if answered is not None:   # a retransmission (our answer was lost): the same answer, nothing redone
            self._send(answered)
            return
        if request.method == "OPTIONS":
            self._reply(request, 200, "OK")
            return
        if request.method != "MESSAGE":
            self._reply(request, 405, "Method Not Allowed")
            return
        try:
            query = manscdp.parse_body(request.body)
        except manscdp.ManscdpError as exc:
            if self._count(self.dropped, "bad_body"):
                log.warning("gb28181_bad_query error=%s count=%d", exc, self.dropped["bad_body"])
            self._reply(request, 400, "Bad Request")
            return
        if query.root != "Query":
            self._reply(request, 200, "OK")   # a Notify or Response the platform sent us: taken, not acted on
            return
        answer = self._answer(query)
        if isinstance(answer, tuple):
            if self._count(self.dropped, f"refused_{answer[0]}"):
                log.warning("gb28181_query_refused cmd=%s device_id=%s status=%d", query.cmd_type,
                            query.device_id, answer[0])
            self._reply(request, *answer)
            return
        self._count(self.answered, query.cmd_type)
        self._reply(request, 200, "OK")
        for doc in answer:
            self._request(self._message(doc), "response")

    def _answer(self, query: manscdp.Manscdp) -> list[manscdp.Manscdp] | tuple[int, str]:
        cmd = query.cmd_type
        if cmd == "Catalog":
            if query.device_id != self.device_id:
                return 404, "Not Found"
            return _split(query, self.device_id, "DeviceList", self.answers.catalog_items(), {})
        if cmd == "DeviceInfo":
            if query.device_id != self.device_id:
                return 404, "Not Found"
            return [manscdp.Manscdp("Response", cmd, query.sn, self.device_id, self.answers.device_info())]
        if cmd == "RecordInfo":
            if query.device_id not in self.answers.channels:
                return 404, "Not Found"
            try:
                since = parse_gb_time(query.get("StartTime") or "", self.config)
                until = parse_gb_time(query.get("EndTime") or "", self.config)
            except ValueError:
                return 400, "Bad Request"
            if until < since:
                return 400, "Bad Request"
            camera = self.answers.channels[query.device_id]
            # All the gateway records is continuous ("time"); it holds no alarm- or manually-triggered ones.
            if (query.get("Type") or "all").lower() not in ("all", "time"):
                return _split(query, query.device_id, "RecordList", [], {"Name": camera.name}, [])
            items = self.answers.record_items(query.device_id, since, until)
            gaps = self.answers.gap_items(query.device_id, since, until)
            return _split(query, query.device_id, "RecordList", items, {"Name": camera.name}, gaps)
        return 501, "Not Implemented"


def _split(query: manscdp.Manscdp, device_id: str, list_name: str, items: list[dict[str, str]],
           fields: dict[str, str], gaps: list[dict[str, str]] | None = None) -> list[manscdp.Manscdp]:
    """The Response as MESSAGEs of at most ITEMS_PER_MESSAGE Items, each with the total SumNum; the gap
    list (RecordInfo's extension) goes with the first."""
    chunks = [items[i:i + ITEMS_PER_MESSAGE] for i in range(0, len(items), ITEMS_PER_MESSAGE)] or [[]]
    docs = []
    for index, chunk in enumerate(chunks):
        lists = {list_name: chunk}
        if gaps is not None and index == 0:
            lists["GapList"] = gaps
        docs.append(manscdp.Manscdp("Response", query.cmd_type, query.sn, device_id,
                                    {**fields, "SumNum": str(len(items))}, lists))
    return docs


def _granted_expires(response: sip.SipMessage, asked: int) -> int:
    for contact in response.header_all("Contact"):
        for param in contact.split(";")[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "expires" and value.strip().isdigit():
                return max(1, int(value.strip()))
    value = (response.header("Expires") or "").strip()
    return max(1, int(value)) if value.isdigit() else asked
