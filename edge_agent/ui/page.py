"""The status page as an ASGI app (Starlette): the page, its vendored script and style, the board as JSON and
as a stream of server-sent events. Read-only: every route is a GET.

The board is read on one thread of its own (`BoardFeed`), never in the event loop: a catalog read that is slow
while the agent ingests must not stall every other client, and the reader's `Workspace` (one catalog
connection) is only ever used from that thread. It is read at most once per `interval_s`, however many screens
watch: concurrent requests share the read in flight. An events client gets the board at once and then
whenever it changes.
"""

from __future__ import annotations

import asyncio
import html
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edge_agent.i18n import translations
from edge_agent.ui.strings import ADVICE, DEFAULT_ADVICE, STUCK, page_strings

STATIC = Path(__file__).parent / "static"

BoardRead = Callable[[], dict[str, Any]]


def index_html(language: str, board: dict[str, Any]) -> str:
    """The page with its words in `language` and the board as it is now (the script keeps it live)."""
    catalog = translations(language)
    setup = {
        "language": language,
        "strings": page_strings(language),
        "advice": {kind: catalog.gettext(text) for kind, text in ADVICE.items()},
        "default_advice": catalog.gettext(DEFAULT_ADVICE),
        "stuck": {code: catalog.gettext(text) for code, text in STUCK.items()},
        "board": board,
    }
    template = (STATIC / "index.html").read_text(encoding="utf-8")
    lang = "zh-CN" if language == "zh_CN" else "en"
    return (template.replace("{{lang}}", lang)
            .replace("{{title}}", html.escape(catalog.gettext("Evidence collection status")))
            .replace("{{setup}}", json.dumps(setup, ensure_ascii=False).replace("</", "<\\/")))


class BoardFeed:
    """The board, read on a thread of its own at most once per `interval_s`; every route and every screen
    shares it. `close(finish)` runs `finish` on that thread (the reader's own clean-up) and ends it."""

    def __init__(self, read_board: BoardRead, interval_s: float = 0.5):
        self._read = read_board
        self.interval_s = interval_s
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="status-board")
        self._lock: asyncio.Lock | None = None   # made in the loop that uses it
        self._at = float("-inf")
        self._board: dict[str, Any] = {}
        self._json = ""

    async def current(self) -> tuple[dict[str, Any], str]:
        """The board and its JSON, read again if the last read is older than `interval_s`."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if time.monotonic() - self._at >= self.interval_s:
                board = await asyncio.get_running_loop().run_in_executor(self._executor, self._read)
                self._board = board
                self._json = json.dumps(board, ensure_ascii=False, default=str, sort_keys=True)
                self._at = time.monotonic()
            return self._board, self._json

    def close(self, finish: Callable[[], None] | None = None) -> None:
        if finish is not None:
            self._executor.submit(finish).result()
        self._executor.shutdown(wait=True)


def create_app(feed: BoardFeed, language: str, *, stopping: threading.Event | None = None,
               read_thumbnail: Callable[[str], bytes | None] | None = None) -> Starlette:
    """The page's app over the board `feed` (its owner closes it)."""

    async def index(_request: Request) -> Response:
        board, _ = await feed.current()
        return HTMLResponse(index_html(language, board), headers={"Cache-Control": "no-store"})

    async def board_json(_request: Request) -> Response:
        _, data = await feed.current()
        return Response(data, media_type="application/json", headers={"Cache-Control": "no-store"})

    async def thumbnail(request: Request) -> Response:
        """The camera's last checked keyframe as a small JPEG (404 before the first, or for no such camera)."""
        jpeg = read_thumbnail(request.path_params["name"]) if read_thumbnail is not None else None
        if jpeg is None:
            return Response(status_code=404, headers={"Cache-Control": "no-store"})
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[dict[str, str]]:
            last = None
            while not await request.is_disconnected() and not (stopping and stopping.is_set()):
                _, data = await feed.current()
                if data != last:
                    last = data
                    yield {"event": "board", "data": data}
                await asyncio.sleep(feed.interval_s)

        return EventSourceResponse(stream(), ping=15, headers={"Cache-Control": "no-store"})

    return Starlette(routes=[
        Route("/", index, methods=["GET"]),
        Route("/api/board", board_json, methods=["GET"]),
        Route("/events", events, methods=["GET"]),
        Route("/cameras/{name}/thumbnail.jpg", thumbnail, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])
