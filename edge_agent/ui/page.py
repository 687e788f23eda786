"""The status page as an ASGI app (Starlette): the page, its vendored script and style, the board as JSON and
as a stream of server-sent events. Read-only: every route is a GET.

The board is read in the event loop's thread only (one `Workspace` for the app, see `BoardSource`), so the
catalog connection is never shared between threads. An events client gets the board at once and then
whenever it changes (looked at every `interval_s`).
"""

from __future__ import annotations

import asyncio
import html
import json
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
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


def create_app(read_board: BoardRead, language: str, *, interval_s: float = 0.5,
               stopping: threading.Event | None = None,
               read_thumbnail: Callable[[str], bytes | None] | None = None) -> Starlette:
    """The page's app over `read_board` (called in the event loop's thread)."""

    async def index(_request: Request) -> Response:
        return HTMLResponse(index_html(language, read_board()), headers={"Cache-Control": "no-store"})

    async def board_json(_request: Request) -> Response:
        return JSONResponse(read_board(), headers={"Cache-Control": "no-store"})

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
                data = json.dumps(read_board(), ensure_ascii=False, default=str, sort_keys=True)
                if data != last:
                    last = data
                    yield {"event": "board", "data": data}
                await asyncio.sleep(interval_s)

        return EventSourceResponse(stream(), ping=15, headers={"Cache-Control": "no-store"})

    return Starlette(routes=[
        Route("/", index, methods=["GET"]),
        Route("/api/board", board_json, methods=["GET"]),
        Route("/events", events, methods=["GET"]),
        Route("/cameras/{name}/thumbnail.jpg", thumbnail, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])
