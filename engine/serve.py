"""ferry's HTTP server: `python -m engine.serve --model-path ... [--host 127.0.0.1] [--port 30000] [engine flags]`
(also installed as `ferry-serve`). One Engine behind FastAPI on uvicorn (uvloop).

Every field of `engine.shared.args.EngineArgs` is a flag (`--context-length 4096`, `--disable-cuda-graph`), so new
settings appear here by themselves. SIGTERM/SIGINT stop accepting connections, let running requests finish
for up to --graceful-timeout seconds, shut the engine down and exit 0; an engine failure exits 1 so that
a supervisor restarts the service. See docs/deploy.md for systemd and supervisord.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import re
import signal
import socket
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import uvicorn

from engine.server.app import build_app
from engine.server.middleware import RequestIdFilter
from engine.server.service import ServerSettings, Service
from engine.shared.args import EngineArgs, field_names

logger = logging.getLogger("engine.server")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_API_KEY_ENV = "FERRY_API_KEY"  # keeps the key out of `ps` output; --api-key wins over it


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[ServerSettings, dict[str, Any]]:
    """The server's settings and the engine settings given on the command line (the rest keep their defaults)."""
    parser = argparse.ArgumentParser(
        prog="ferry-serve",
        description="ferry's OpenAI-compatible HTTP server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    server = parser.add_argument_group("server")
    defaults = ServerSettings()
    server.add_argument("--host", default=defaults.host, help="address to bind (loopback unless told otherwise)")
    server.add_argument("--port", type=int, default=defaults.port, help="TCP port to listen on (0: any free one)")
    server.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer <key>' on every endpoint but /health; or set ${_API_KEY_ENV}",
    )
    server.add_argument(
        "--graceful-timeout",
        type=float,
        default=defaults.graceful_timeout,
        help="seconds running requests get to finish after SIGTERM/SIGINT",
    )
    server.add_argument("--served-model-name", help="the model's id in the OpenAI API; None: its folder's name")
    server.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=defaults.access_log,
        help="one log line per HTTP request",
    )
    _add_engine_flags(parser.add_argument_group("engine (engine.shared.args.EngineArgs)"))
    ns = vars(parser.parse_args(argv))
    settings = ServerSettings(**{f.name: ns.pop(f.name) for f in dataclasses.fields(ServerSettings)})
    settings.api_key = settings.api_key or os.environ.get(_API_KEY_ENV) or None
    if settings.graceful_timeout < 0:
        parser.error(f"--graceful-timeout must be >= 0, got {settings.graceful_timeout}")
    try:
        EngineArgs(**ns).validate()
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    return settings, ns


def _add_engine_flags(group: argparse._ArgumentGroup) -> None:
    hints = typing.get_type_hints(EngineArgs)
    helps = _field_comments()
    for field in dataclasses.fields(EngineArgs):
        if field.name not in field_names():
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = _scalar_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else None
        help_text = f"{helps.get(field.name, '')} (default: {default})"
        # SUPPRESS: a flag not given leaves the setting out, so EngineArgs' own default applies.
        if kind is bool:
            action = argparse.BooleanOptionalAction if default is True else "store_true"
            group.add_argument(flag, action=action, default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(
                flag,
                type=kind or json.loads,
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=(kind or dict).__name__.upper(),
            )


def _scalar_type(annotation: Any) -> Optional[Callable[[str], Any]]:
    """int, float, str or bool for a field typed so (or Optional of it); None for anything else (read as JSON)."""
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if len(options) == 1 and options[0] in (int, float, str, bool):
        return options[0]
    return None


def _field_comments() -> dict[str, str]:
    """EngineArgs documents each field in a comment on its line; those are the flags' help."""
    try:
        source = inspect.getsource(EngineArgs)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#(.*)$", source, re.MULTILINE)}


def configure_logging(log_level: str, access_log: bool) -> None:
    """One stderr handler; every line carries the HTTP request id (or "-"), and uvicorn's own lines the
    server's logger name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(_UvicornAsServer())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = getattr(logging, log_level.upper())
    root.setLevel(level)
    # The server's own events (start, stop, requests) are worth a line even at the engine's default "warning".
    server_level = min(level, logging.INFO)
    for name in ("engine.server", "uvicorn.error"):
        logging.getLogger(name).setLevel(server_level)
    logging.getLogger("engine.server.access").setLevel(server_level if access_log else logging.WARNING)


class _UvicornAsServer(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.error":  # uvicorn's start/stop lines, not errors
            record.name = "engine.server"
        return True


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use is an error at once, not after."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old connections sit in TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}") from None
    return sock


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the server until SIGTERM/SIGINT (exit 0) or an engine failure (exit 1)."""
    settings, engine_settings = parse_args(argv)
    configure_logging(engine_settings.get("log_level", EngineArgs.log_level), settings.access_log)
    try:
        sock = listen_socket(settings.host, settings.port)
    except OSError as error:
        logger.critical("%s; the model was not loaded", error.strerror)
        sys.exit(1)
    service = Service(settings, engine_settings)
    config = uvicorn.Config(
        build_app(service),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.graceful_timeout,
    )
    server = _Server(config)
    service.request_exit = server.request_exit
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(1)
    logger.info("server stopped (exit %d)", service.exit_code)
    sys.exit(service.exit_code)


class _Server(uvicorn.Server):
    def request_exit(self) -> None:
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises a caught SIGTERM after its graceful stop, which would kill the process by the
        # signal; a service that stopped cleanly on request exits 0, so only catch and restore.
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            logger.info(
                "%s: no new connections; running requests get up to %.0fs",
                signal.Signals(sig).name,
                self.config.timeout_graceful_shutdown,
            )
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    main()
