"""The daemon's control socket: how a CLI command asks the data dir's owner to do what only the owner may do.

A stream `AF_UNIX` socket at `data_dir/control.sock` (`StoreLayout.control_socket`), 0660 group `edge-agent`
when that group exists and the daemon may give the socket to it, else 0600; the data dir (0750) is the
first gate. The protocol is JSON lines:

- request, one line of at most `MAX_REQUEST` bytes: `{"op": "<name>", "args": {...}}`
- replies: any number of `{"progress": {...}}` lines, then one final line, `{"ok": true, "result": {...}}`
  or `{"ok": false, "error": "<what to do>"}`; then the daemon closes the connection.

The caller is who the kernel says it is (`SO_PEERCRED`), never what the request claims: its user name is the
`actor` of the audit entries the request writes (`Caller.actor`). Every request is answered on its own thread,
at most `MAX_CONNECTIONS` at a time (more are told `busy`); a malformed, oversized, slow or abandoned request
ends that connection with an error line and never the server. Operations: `import` (a folder as a docking
session) and `keys_rotate` (a new signing key, used by the daemon at once). The server knows one itself,
`hello` (its pid and ops: is the owner there and answering?); the daemon hands it the others by name
(edge_agent/daemon.py); `request` is the client (edge_agent/services).
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import pwd
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.base import DockedVolume

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
MAX_REPLY_LINE = 1 << 20
MAX_CONNECTIONS = 8
REQUEST_TIMEOUT_S = 10.0   # to send the request line, and for each reply line to be taken
SOCKET_GROUP = "edge-agent"
_PEERCRED = struct.Struct("3i")
# The dock name an imported folder's session and files carry (through the daemon or not).
IMPORT_DOCK = "import"


class ControlError(Exception):
    """A request refused: `str()` says what to do instead. Raised by handlers (sent to the caller) and by
    `request` (what the daemon answered)."""


class ControlUnavailable(ControlError):
    """No daemon answers on the socket (none runs, or it has not opened the socket yet)."""


@dataclass(frozen=True)
class Caller:
    """The process at the other end, from the kernel (`SO_PEERCRED`)."""

    pid: int
    uid: int
    gid: int

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid:{self.uid}"

    def actor(self, claimed: object = None) -> str:
        """The audit actor: the caller's account; root running for someone (`sudo`, the caller's claim)
        is recorded as both, since only root may claim."""
        if self.uid == 0 and isinstance(claimed, str) and claimed and claimed != "root":
            return f"{claimed[:64]} (as root)"
        return self.user


@dataclass(frozen=True)
class Request:
    op: str
    args: Mapping[str, Any]
    caller: Caller


Send = Callable[[dict[str, Any]], None]
Handler = Callable[[Request, Send], dict[str, Any]]


# -- the import operation's arguments: encoded by the client, checked by the daemon ------------------------

@dataclass(frozen=True)
class ImportArgs:
    """`import`: a folder on this machine brought in as one recorder's docking session."""

    path: Path
    device_id: str
    officer_id: str | None
    reason: str | None
    user: str | None = None   # who the client says it is (kept only from root, see `Caller.actor`)

    def as_wire(self) -> dict[str, Any]:
        return {"path": str(self.path), "device_id": self.device_id, "officer_id": self.officer_id,
                "reason": self.reason, "user": self.user}

    @classmethod
    def from_wire(cls, args: Mapping[str, Any]) -> ImportArgs:
        """Checked arguments, or ControlError naming the bad one."""
        path = _text(args, "path", required=True, limit=4096)
        assert path is not None
        if not os.path.isabs(path):
            raise ControlError(f"path {path!r} is not absolute")
        device_id = _text(args, "device_id", required=True, limit=128)
        assert device_id is not None
        return cls(Path(path), device_id, _text(args, "officer_id", limit=128), _text(args, "reason", limit=2000),
                   _text(args, "user", limit=64))

    def volume(self) -> DockedVolume:
        return DockedVolume(dock=IMPORT_DOCK, path=self.path, label=self.path.name)

    def audit_detail(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "officer_id": self.officer_id}


@dataclass(frozen=True)
class RotateArgs:
    """`keys_rotate`: replace the agent's signing key (services/keys.py)."""

    reason: str
    user: str | None = None   # who the client says it is (kept only from root, see `Caller.actor`)

    def as_wire(self) -> dict[str, Any]:
        return {"reason": self.reason, "user": self.user}

    @classmethod
    def from_wire(cls, args: Mapping[str, Any]) -> RotateArgs:
        reason = _text(args, "reason", required=True, limit=2000)
        assert reason is not None
        return cls(reason, _text(args, "user", limit=64))


def _text(args: Mapping[str, Any], name: str, *, required: bool = False, limit: int) -> str | None:
    value = args.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > limit or "\x00" in value:
        raise ControlError(f"argument {name!r} must be a non-empty string of at most {limit} characters")
    return value


def import_outcome(status: Any) -> dict[str, Any]:
    """The final status of an import's slot (`SlotStatus`) as the reply's result."""
    return {"session_id": status.session_id, "files_total": status.files_total, "files_done": status.files_done,
            "bytes_copied": status.bytes_copied, "error": status.last_error}


# -- addressing: a socket path is at most 107 bytes; a longer one is reached through its directory ---------

@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# -- the server ---------------------------------------------------------------------------------------------

class ControlServer:
    """Serves `handlers` on the socket at `path` from `start()` to `stop()`. Only the data dir's owner runs
    one: `start` replaces whatever socket file a killed owner left."""

    def __init__(self, path: Path, handlers: Mapping[str, Handler]):
        self.path = path
        self.handlers = {"hello": self._hello, **handlers}
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._requests: set[threading.Thread] = set()
        self._requests_lock = threading.Lock()
        self.refused = 0   # requests answered with an error before reaching a handler (malformed, busy)

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with _address(self.path) as address:
            sock.bind(address)
        self._restrict()
        sock.listen(64)   # queued until accepted; then beyond MAX_CONNECTIONS told busy
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self._thread.start()
        log.info("control socket=%s mode=%o", self.path, self.path.stat().st_mode & 0o777)

    def _hello(self, _request: Request, _send: Send) -> dict[str, Any]:
        return {"pid": os.getpid(), "ops": sorted(self.handlers)}

    def _restrict(self) -> None:
        mode = 0o600
        try:
            os.chown(self.path, -1, grp.getgrnam(SOCKET_GROUP).gr_gid)
            mode = 0o660
        except KeyError:
            pass   # no such group: the daemon's own user (and root) only
        except PermissionError:
            log.warning("control socket not given to group=%s (the daemon's user is not in it); mode 0600",
                        SOCKET_GROUP)
        os.chmod(self.path, mode)

    def stop(self) -> None:
        """Take no more requests and remove the socket; requests in progress go on (see `wait`)."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)   # wakes accept()
        sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the requests in progress to be answered; True if none is left."""
        with self._requests_lock:
            threads = list(self._requests)
        for thread in threads:
            thread.join(timeout)
        return not any(t.is_alive() for t in threads)

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return   # closed by stop()
            if not self._slots.acquire(blocking=False):
                self.refused += 1
                _answer_and_close(conn, {"ok": False, "error": f"busy: {MAX_CONNECTIONS} requests in progress; "
                                                             "try again when one ends"})
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), name="control-request", daemon=True)
            with self._requests_lock:
                self._requests.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(REQUEST_TIMEOUT_S)
                final = self._answer(conn)
                _send_line(conn, final)
        except OSError as exc:   # the caller went away or stopped reading: its loss, not the daemon's
            log.info("control request abandoned by the caller: %s", exc)
        except Exception:
            log.exception("control request failed")
        finally:
            with self._requests_lock:
                self._requests.discard(threading.current_thread())
            self._slots.release()

    def _answer(self, conn: socket.socket) -> dict[str, Any]:
        try:
            caller = _caller(conn)
            request = self._parse(_read_line(conn), caller)
        except ControlError as exc:
            self.refused += 1
            log.warning("control request refused: %s", exc)
            return {"ok": False, "error": str(exc)}
        log.info("control op=%s user=%s pid=%d", request.op, caller.user, caller.pid)
        gone: list[bool] = []

        def send(progress: dict[str, Any]) -> None:
            if not gone:
                try:
                    _send_line(conn, {"progress": progress})
                except OSError:
                    gone.append(True)   # the request goes on; the caller just stops hearing of it

        try:
            return {"ok": True, "result": self.handlers[request.op](request, send)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control op=%s failed", request.op)
            return {"ok": False, "error": f"the daemon failed: {type(exc).__name__}: {exc}; see its log"}

    def _parse(self, line: bytes, caller: Caller) -> Request:
        try:
            message = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ControlError(f"not a JSON request line: {type(exc).__name__}") from None
        if not isinstance(message, dict):
            raise ControlError('a request is a JSON object: {"op": ..., "args": {...}}')
        op, args = message.get("op"), message.get("args", {})
        if not isinstance(op, str) or op not in self.handlers:
            raise ControlError(f"unknown op {str(op)[:40]!r}; this daemon does: {', '.join(sorted(self.handlers))}")
        if not isinstance(args, dict):
            raise ControlError("args must be a JSON object")
        return Request(op, args, caller)


def _caller(conn: socket.socket) -> Caller:
    pid, uid, gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return Caller(pid, uid, gid)


def _read_line(conn: socket.socket, limit: int = MAX_REQUEST) -> bytes:
    """One line (without its newline) of at most `limit` bytes; ControlError otherwise."""
    buf = bytearray()
    while True:
        try:
            chunk = conn.recv(limit + 1 - len(buf))
        except TimeoutError:
            raise ControlError(f"no complete request line within {REQUEST_TIMEOUT_S:.0f} s") from None
        if not chunk:
            raise ControlError("the request ended before its newline")
        end = chunk.find(b"\n")
        if end >= 0:
            if len(buf) + end > limit:
                break
            return bytes(buf + chunk[:end])
        buf += chunk
        if len(buf) > limit:
            break
    raise ControlError(f"request larger than {limit} bytes")


def _send_line(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message, ensure_ascii=False, default=str).encode("utf-8") + b"\n")


def _answer_and_close(conn: socket.socket, message: dict[str, Any]) -> None:
    with conn, contextlib.suppress(OSError):
        conn.settimeout(1.0)
        _send_line(conn, message)


# -- the client ---------------------------------------------------------------------------------------------

def request(path: Path, op: str, args: Mapping[str, Any], *,
            on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Ask the daemon listening at `path` to do `op`; returns its result. Progress lines go to `on_progress`
    as they come (an import takes as long as its copy). Raises ControlUnavailable when nothing listens,
    ControlError with the daemon's message when it refuses or fails."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        try:
            with _address(path) as address:
                sock.connect(address)
        except OSError as exc:
            raise ControlUnavailable(f"no daemon answers on {path}: {exc.strerror or exc}") from None
        _send_line(sock, {"op": op, "args": dict(args)})
        lines = sock.makefile("rb")
        while True:
            line = lines.readline(MAX_REPLY_LINE)
            if not line.endswith(b"\n"):
                raise ControlError(f"the daemon closed {path} before answering (see its log)")
            reply = json.loads(line)
            if "progress" in reply:
                if on_progress is not None:
                    on_progress(reply["progress"])
                continue
            if reply.get("ok"):
                result = reply.get("result")
                return result if isinstance(result, dict) else {}
            raise ControlError(str(reply.get("error") or "the daemon refused the request"))
