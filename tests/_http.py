"""A tiny HTTP file server on 127.0.0.1 for download tests (no network).

Serves ``files`` (url path -> bytes) with Range support. Per-path behaviour:
``drop`` (send the full Content-Length, then close the connection halfway through the body,
the first ``n`` times), ``stall`` (sleep before answering the first ``n`` times), ``no_range``
(ignore Range headers). Every request's path and Range header is logged in ``requests``.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:  # a client that hung up is expected here
        pass


class FileServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, tuple[str, int]] = {}  # path -> (mode, times left)
        self.requests: list[tuple[str, str | None]] = []
        self.stall_seconds = 2.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                mode, left = server.modes.get(self.path, ("", 0))
                if left:
                    server.modes[self.path] = (mode, left - 1)
                else:
                    mode = ""
                if mode == "stall":
                    time.sleep(server.stall_seconds)
                start = 0
                if rng and mode != "no_range":
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                ctype = "text/html; charset=utf-8" if self.path.endswith("/view") else "application/octet-stream"
                self.send_header("Content-Type", ctype)
                self.end_headers()
                if mode == "drop":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, data: bytes, mode: str = "", times: int = 1) -> str:
        self.files[path] = data
        if mode:
            self.modes[path] = (mode, times)
        return self.url(path)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
