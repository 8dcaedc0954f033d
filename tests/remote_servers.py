"""Real servers on 127.0.0.1 for the URL-source tests, started and stopped by the test that uses them.

* :func:`serve_folder`: Python's ``http.server`` over a folder. The same files are also served
  under ``/flaky/`` (each path answers 503 to its first ``fail_first`` GETs) and ``/broken/``
  (always 503), and the paths in :attr:`Served.failing` fail while they are there; every request
  is counted by path, so a test can see the retries.
* :func:`moto_s3`: moto's S3-compatible server, with dummy credentials and the endpoint in the
  standard AWS variables (``AWS_ENDPOINT_URL``), which s3fs, boto3 and a ``batchcap`` subprocess read.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Served:
    """A running folder server: its base URL (ending in ``/``) and the GETs it answered, by path."""

    url: str
    requests: Counter[str] = field(default_factory=Counter)
    #: Paths (no trailing ``/``) that answer 503 while listed here; a test adds and removes them.
    failing: set[str] = field(default_factory=set)
    #: Seconds each picture's answer waits (a distant store), and the most GETs answered at once.
    delay_s: float = 0.0
    most_at_once: int = 0
    _at_once: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(SimpleHTTPRequestHandler):
    served: Served
    fail_first: int

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        self.served.requests[path] += 1
        if path.rstrip("/") in self.served.failing:
            self.send_error(503, "Service Unavailable")
            return
        for prefix in ("/flaky/", "/broken/"):
            if path.startswith(prefix):
                if prefix == "/broken/" or self.served.requests[path] <= self.fail_first:
                    self.send_error(503, "Service Unavailable")
                    return
                self.path = "/" + self.path[len(prefix) :]
        if not self.served.delay_s or path.endswith("/"):
            super().do_GET()
            return
        with self.served._lock:
            self.served._at_once += 1
            self.served.most_at_once = max(self.served.most_at_once, self.served._at_once)
        try:
            time.sleep(self.served.delay_s)
            super().do_GET()
        finally:
            with self.served._lock:
                self.served._at_once -= 1

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: pytest shows what failed


@contextlib.contextmanager
def serve_folder(folder: Path, fail_first: int = 0) -> Iterator[Served]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (a free port) until the block ends."""
    served = Served("")
    handler = type("Handler", (_Handler,), {"served": served, "fail_first": fail_first})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    served.url = f"http://127.0.0.1:{server.server_address[1]}/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


#: The variables that point s3fs (and boto3, and a ``batchcap`` subprocess) at the local server.
def s3_environment(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port); yields its endpoint URL and sets the AWS variables.

    The variables are restored afterwards; fsspec's cached filesystems, which hold the endpoint,
    are dropped on both sides so no other test meets a stale one.
    """
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log would fill the test output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # moto keeps its buckets in this process's memory, across servers: start from none
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).close()
    saved = {k: os.environ.get(k) for k in s3_environment(endpoint)}
    os.environ.update(s3_environment(endpoint))
    S3FileSystem.clear_instance_cache()
    try:
        yield endpoint
    finally:
        S3FileSystem.clear_instance_cache()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
