"""The one Engine behind the HTTP server: started in the app's lifespan, probed for /health and
/metrics, watched so that a dead engine stops the process (non-zero, for the supervisor), shut down last."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from engine.engine import Engine
from engine.server.errors import ApiError
from engine.server.metrics import Metrics
from engine.shared.errors import EngineError

logger = logging.getLogger("engine.server")

_WATCH_INTERVAL_S = 1.0
EXIT_ENGINE_FAILED = 1


@dataclass
class ServerSettings:
    """The HTTP server's own settings (the engine's are EngineArgs)."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 30000
    api_key: Optional[str] = None  # when set, every endpoint but /health needs "Authorization: Bearer <key>"
    graceful_timeout: float = 30.0  # seconds running requests get to finish after SIGTERM/SIGINT
    served_model_name: Optional[str] = None  # the model's id in the OpenAI API; default: the model folder's name
    access_log: bool = True  # one log line per HTTP request


class Service:
    """Owns the Engine for the server's lifetime. `request_exit` is set by whoever runs the server: the
    service calls it when the engine fails, after setting `exit_code`."""

    def __init__(self, settings: ServerSettings, engine_settings: dict[str, Any]) -> None:
        self.settings = settings
        self.engine_settings = engine_settings
        self.engine: Optional[Engine] = None
        self.metrics = Metrics()
        self.exit_code = 0
        self.request_exit: Callable[[], None] = lambda: None
        self.model_name = ""
        self.started_at = 0
        self._probe: Optional[asyncio.Future] = None
        self._watchdog: Optional[asyncio.Task] = None

    async def start(self) -> None:
        """Start the engine (loads the model; returns when it serves) and the watchdog."""
        logger.info("starting the engine: %s", self.engine_settings or "default settings")
        self.engine = await asyncio.to_thread(Engine, **self.engine_settings)
        model_path: str = self.engine.args.model_path
        self.model_name = self.settings.served_model_name or os.path.basename(model_path.rstrip("/"))
        self.started_at = int(time.time())
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        logger.info("engine ready: model %s (%s) on %s", self.model_name, model_path, self.engine.args.device)

    async def stop(self) -> None:
        """Stop watching and shut the engine down (its child processes with it)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.engine is not None:
            logger.info("shutting the engine down")
            await asyncio.to_thread(self.engine.shutdown)
            logger.info("engine stopped")

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise ApiError(503, "the engine is not running", type="service_unavailable")
        return self.engine

    async def server_info(self) -> dict[str, Any]:
        """The engine's settings and live state. Concurrent callers share one call, so a burst of
        health checks holds at most one thread while the engine is slow to answer."""
        engine = self.require_engine()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(asyncio.to_thread(engine.get_server_info))
            self._probe.add_done_callback(_retrieve)  # its error may outlive every (timed-out) waiter
        return await asyncio.shield(self._probe)

    def fail(self, error: BaseException) -> None:
        """The engine cannot serve any more: stop the server with a non-zero exit status."""
        if self.exit_code == 0:
            logger.critical("the engine failed; stopping the server: %s", error)
        self.exit_code = EXIT_ENGINE_FAILED
        self.request_exit()

    async def _watch(self) -> None:
        # A dead child surfaces as EngineError on the next call; poll cheaply so an idle server notices too.
        while True:
            await asyncio.sleep(_WATCH_INTERVAL_S)
            try:
                await self.server_info()
            except EngineError as error:
                self.fail(error)
                return
            except Exception:  # slow or odd answers are not fatal; a dead child is
                logger.warning("the engine did not answer the health probe", exc_info=True)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()
