"""Start the server: check the settings, then run the app on uvicorn until SIGTERM or Ctrl-C."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

from ..bundle import read_manifest
from ..errors import UserError
from ..packages import require
from ..photos import read_index
from .app import GRACEFUL_S, Settings, make_app  # noqa: F401 - Settings is the command line's

uvicorn = require("uvicorn", "`runner serve` runs on it (pip install -r runner/requirements-serve.txt)")
LOOPBACK = ("localhost",)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, but a stop asked for by SIGTERM or Ctrl-C ends with status 0 once
    what was in flight is done (uvicorn raises the signal again after its shutdown)."""

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


class ServeError(UserError):
    """A server that must not start as asked; the message says why."""


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_writable_dir(directory: str, option: str) -> None:
    """Make `directory` if need be; ServeError if it cannot be made or written."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ServeError(f"{option} {directory}: cannot make the directory ({e.strerror or e})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ServeError(f"{option} {directory}: the directory is not writable")


def serve(settings: Settings, host: str, port: int, graceful_s: float = GRACEFUL_S) -> int:
    """Serve until SIGTERM or Ctrl-C: uvicorn stops accepting, lets what is in flight finish
    (at most `graceful_s`), then the engines stop; exit status 0."""
    settings.api_key = settings.api_key or os.environ.get("RUNNER_API_KEY") or None
    if not is_loopback(host) and not settings.api_key:
        raise ServeError(f"--host {host} is reachable from other machines: give an API key (--api-key KEY or "
                         "RUNNER_API_KEY) to serve there")
    for bundle in settings.bundles:  # a bad bundle or index is one line and exit 2, before anything listens
        read_manifest(bundle)
    for directory in settings.indexes.values():
        read_index(directory)
    if settings.prefix_cache_dir:
        check_writable_dir(settings.prefix_cache_dir, "--prefix-cache")
    app = make_app(settings)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=graceful_s, lifespan="on")
    server = GracefulServer(config)
    app.state.server.on_failure = lambda: setattr(server, "should_exit", True)
    print(f"serving {', '.join(settings.bundles)} on http://{host}:{port}/v1", file=sys.stderr, flush=True)
    server.run()
    return 2 if app.state.server.failed else 0
