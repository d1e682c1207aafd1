"""uvicorn with a graceful drain: the first SIGTERM (or SIGINT) turns away new requests with 503 while the accepted
ones finish (up to `drain_timeout` seconds), then uvicorn shuts down as usual (its lifespan shuts the engine down).
A second signal skips the wait; a third exits at once.

`serve_in_thread(app)` runs the same server in a background thread on a free port (tests, benchmarks).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import uvicorn

log = logging.getLogger("prefixtune.serve")


class PrefixServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_timeout: float = 30.0):
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig, frame) -> None:  # uvicorn's signal handler (the main thread)
        self._signals += 1
        if self._signals == 1:
            self.request_drain()
        elif self._signals == 2:
            log.warning("second signal: shutting down without waiting for requests in flight")
            self.should_exit = True
        else:
            self.should_exit = self.force_exit = True

    def request_drain(self) -> None:
        """Thread-safe: start draining; the server exits once no request is in flight (or drain_timeout passed)."""
        if self._loop is None or self._loop.is_closed():
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        state = getattr(getattr(self.config.app, "state", None), "serve", None)
        if state is not None:
            state.begin_drain()
            log.info("draining: new requests get 503; waiting up to %.0f s for %d in flight", self.drain_timeout,
                     state.inflight)
            if not await state.wait_idle(self.drain_timeout):
                log.warning("drain timeout: %d requests still in flight are cut off", state.inflight)
        self.should_exit = True


def free_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


class ThreadedServer:
    """A PrefixServer in a daemon thread: .url, .drain() (as SIGTERM does), .stop(), .join()."""

    def __init__(self, app, host: str = "127.0.0.1", drain_timeout: float = 30.0, log_level: str = "warning"):
        self.sock = free_socket(host)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, lifespan="on")
        self.server = PrefixServer(config, drain_timeout=drain_timeout)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name=f"prefixtune-serve-{self.port}")

    def start(self, timeout: float = 30.0) -> "ThreadedServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def drain(self) -> None:
        self.server.request_drain()

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.join(timeout)

    def join(self, timeout: float = 30.0) -> None:
        self.thread.join(timeout)
        self.sock.close()


def serve_in_thread(app, **kw) -> ThreadedServer:
    return ThreadedServer(app, **kw).start()
