"""Run the app on a free loopback port in a background thread (tests and the load benchmark)."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def background_server(app, startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1:<free port>; yields the base URL, stops the server on exit."""
    import uvicorn

    config = uvicorn.Config(app, host=LOOPBACK, port=free_port(), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {LOOPBACK}:{config.port}")
        time.sleep(0.02)
    try:
        yield f"http://{LOOPBACK}:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
