"""`StatusPage`: the status page as one of the daemon's parts (`start`/`stop`), uvicorn on its own thread.

The board it shows is read through `services.board` (the catalog's reports and the live parts' health),
in the server's event loop thread, with a `Workspace` of its own.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import uvicorn

from edge_agent.config import AgentConfig
from edge_agent.services import Workspace
from edge_agent.services.board import DiskForecast, LiveParts, board, camera_thumbnail
from edge_agent.ui.page import BoardFeed, create_app

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15


class _Server(uvicorn.Server):
    """uvicorn's server, telling the daemon's thread when it listens (or that it gave up)."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event):
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: Any = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()

    def install_signal_handlers(self) -> None:  # the daemon's main thread owns SIGTERM/SIGINT
        return None


class StatusPage:
    """The read-only status page on `[ui] listen`, in `language` (en or zh_CN)."""

    def __init__(self, config: AgentConfig, live: LiveParts, language: str):
        self.config = config
        self.live = live
        self.language = language
        self._workspace: Workspace | None = None
        self._forecast = DiskForecast()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._feed = BoardFeed(self.read_board)
        app = create_app(self._feed, language, stopping=self._stopping,
                         read_thumbnail=lambda name: camera_thumbnail(self.live, name))
        self._server = _Server(uvicorn.Config(app, host=config.ui.host, port=config.ui.port, log_level="warning",
                                              lifespan="off", access_log=False, timeout_graceful_shutdown=3),
                               self._ready)
        self._thread: threading.Thread | None = None

    def read_board(self) -> dict[str, Any]:
        if self._workspace is None:
            self._workspace = Workspace(self.config)
        return board(self._workspace, self.live, self._forecast).as_dict()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="status-page", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S) or not self._server.started:
            raise RuntimeError(f"the status page could not listen on {self.config.ui.listen} (see the log); "
                               "set [ui] listen to a free host:port or [ui] enabled = false")
        log.info("status page url=%s language=%s", self.url, self.language)

    def _run(self) -> None:
        try:
            self._server.run()
        finally:
            self._feed.close(self._close_workspace)   # on the feed's thread, the one that opened it

    def _close_workspace(self) -> None:
        if self._workspace is not None:
            self._workspace.close()
            self._workspace = None

    def stop(self) -> None:
        self._stopping.set()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    @property
    def port(self) -> int:
        """The port it listens on (the one taken when `[ui] listen` says port 0)."""
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = self.config.ui.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}/"
