"""The operators' HTTP endpoints (``GET /health``, ``GET /metrics``): one path each, read-only.

A stdlib threading HTTP server in the main process, on a daemon thread. A client that
stops talking is dropped after REQUEST_TIMEOUT_SECONDS; any other path is 404; an
exception while answering is a 503 naming its type, never a dropped connection or a
traceback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dicom_node.errors import ConfigError
from dicom_node.log import get_logger

log = get_logger("dicom_node.ops.http")

REQUEST_TIMEOUT_SECONDS = 10  # a client that stops talking cannot hold a thread for long

# (HTTP status, Content-Type, body) for the request's headers.
Answer = tuple[int, str, bytes]


class _Handler(BaseHTTPRequestHandler):
    server_version = "dicom-node"
    timeout = REQUEST_TIMEOUT_SECONDS

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server: EndpointServer = self.server
        if self.path.split("?", 1)[0].rstrip("/") != server.path:
            self._send(server.failure(HTTPStatus.NOT_FOUND, f"not found; try GET {server.path}"))
            return
        try:
            answer = server.answer(self.headers)
        except Exception as error:  # answer, never drop the connection
            answer = server.failure(HTTPStatus.SERVICE_UNAVAILABLE, f"{server.name} check failed ({type(error).__name__})")
        self._send(answer)

    def _send(self, answer: Answer) -> None:
        status, content_type, payload = answer
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        log.debug(f"{self.server.name}_request", client=self.client_address[0], request=format % args)


class EndpointServer(ThreadingHTTPServer):
    """``GET path`` answered by ``answer(request_headers)``; `failure(status, message)` makes
    the 404 and 503 answers in the endpoint's own format. ``stop()`` ends it."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        name: str,
        path: str,
        answer: Callable[[object], Answer],
        failure: Callable[[int, str], Answer],
    ):
        super().__init__(address, _Handler)
        self.name, self.path, self.answer, self.failure = name, path, answer, failure
        self._thread = threading.Thread(target=self.serve_forever, name=name, daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> EndpointServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def listen(server_class: type[EndpointServer], section: str, host: str, port: int, *args) -> EndpointServer:
    """``server_class((host, port), *args)`` started; a ConfigError naming `section` if it cannot listen."""
    try:
        server = server_class((host, port), *args)
    except OSError as error:
        raise ConfigError(f"{section}: cannot listen on {host}:{port} ({error.strerror or error})") from None
    log.info(f"{server.name}_listening", host=server.server_address[0], port=server.port, path=server.path)
    return server.start()
