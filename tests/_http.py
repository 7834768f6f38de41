"""A tiny HTTP(S) file server on 127.0.0.1 for download tests (no network).

Serves ``files`` (url path -> bytes) with Range support. Like a typical static server it sends a
strong ``ETag`` (from the content) and a ``Last-Modified`` (bumped whenever a path's content
changes) and honours ``If-Range`` (a Range request whose If-Range does not match gets the whole
file, 200). Per path, ``add(..., validators=...)`` chooses which of ``"etag"``,
``"last_modified"``, ``"weak_etag"`` are sent (``()`` for none).

Per-path behaviour: ``drop`` (send the full Content-Length, then close the connection halfway
through the body, the first ``n`` times), ``stall`` (sleep before answering the first ``n``
times), ``no_range`` (ignore Range headers). Server-wide: ``honour_if_range = False`` answers a
Range request with 206 whatever If-Range says (a server that ignores If-Range).
``redirect(path, target)`` answers ``path`` with a 302 to ``target``.

Every request's path and Range header is logged in ``requests``, its full headers in
``headers``, and the answer's status and validator headers in ``responses``.
``FileServer(tls=ssl_context)`` serves https (see :func:`tls_contexts`).
"""

from __future__ import annotations

import hashlib
import shutil
import ssl
import subprocess
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DEFAULT_VALIDATORS = ("etag", "last_modified")


class _QuietServer(ThreadingHTTPServer):
    tls: ssl.SSLContext | None = None

    def handle_error(self, request, client_address) -> None:  # a client that hung up is expected here
        pass

    def finish_request(self, request, client_address) -> None:
        """TLS handshake in the handler thread, so one slow client does not block the others."""
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        with self.tls.wrap_socket(request, server_side=True) as conn:
            super().finish_request(conn, client_address)


def tls_contexts(folder: Path) -> tuple[ssl.SSLContext, Path] | None:
    """(server context, CA file to trust) for a fresh self-signed 127.0.0.1 certificate.

    None when no ``openssl`` command is available. Clients trust it via ``SSL_CERT_FILE``, which
    Python's default https context reads, so the code under test needs no test-only option.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx, cert


class FileServer:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, tuple[str, int]] = {}  # path -> (mode, times left)
        self.validators: dict[str, tuple[str, ...]] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.headers: list[dict[str, str]] = []
        self.responses: list[tuple[int, dict[str, str]]] = []
        self.stall_seconds = 2.0
        self.honour_if_range = True
        self._versions: dict[str, tuple[str, int]] = {}  # path -> (content sha256, Last-Modified time)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server API
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                server.headers.append(dict(self.headers.items()))
                if self.path in server.redirects:
                    server.responses.append((302, {}))
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(self.path)
                if data is None:
                    server.responses.append((404, {}))
                    self.send_error(404, "Not Found")
                    return
                mode, left = server.modes.get(self.path, ("", 0))
                if left:
                    server.modes[self.path] = (mode, left - 1)
                else:
                    mode = ""
                if mode == "stall":
                    time.sleep(server.stall_seconds)
                validators = server.validator_headers(self.path, data)
                if_range = self.headers.get("If-Range")
                changed = if_range is not None and not _matches(if_range, validators)
                if rng and changed and server.honour_if_range:
                    rng = None  # the file changed: RFC 9110 13.1.5, send all of it
                start = 0
                if rng and mode != "no_range":
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        server.responses.append((416, validators))
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self._validators(validators)
                        self.end_headers()
                        return
                    server.responses.append((206, validators))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    server.responses.append((200, validators))
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                ctype = "text/html; charset=utf-8" if self.path.endswith("/view") else "application/octet-stream"
                self.send_header("Content-Type", ctype)
                self._validators(validators)
                self.end_headers()
                if mode == "drop":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

            def _validators(self, validators: dict[str, str]) -> None:
                for name, value in validators.items():
                    self.send_header(name, value)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.tls = tls
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def validator_headers(self, path: str, data: bytes) -> dict[str, str]:
        """ETag / Last-Modified for the current content of ``path``, as chosen by ``add``."""
        digest = hashlib.sha256(data).hexdigest()
        old = self._versions.get(path)
        if old is None or old[0] != digest:  # new content: a later modification time
            self._versions[path] = (digest, old[1] + 60 if old else 1_700_000_000)
        chosen = self.validators.get(path, DEFAULT_VALIDATORS)
        out = {}
        if "etag" in chosen:
            out["ETag"] = f'"{digest[:16]}"'
        elif "weak_etag" in chosen:
            out["ETag"] = f'W/"{digest[:16]}"'
        if "last_modified" in chosen:
            out["Last-Modified"] = formatdate(self._versions[path][1], usegmt=True)
        return out

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{'https' if self.httpd.tls else 'http'}://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, data: bytes, mode: str = "", times: int = 1,
            validators: tuple[str, ...] = DEFAULT_VALIDATORS) -> str:
        self.files[path] = data
        self.validators[path] = tuple(validators)
        if mode:
            self.modes[path] = (mode, times)
        return self.url(path)

    def redirect(self, path: str, target: str) -> str:
        self.redirects[path] = target
        return self.url(path)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _matches(if_range: str, validators: dict[str, str]) -> bool:
    """If-Range holds: a strong ETag equal to ours, or a date equal to our Last-Modified."""
    if if_range.startswith(('"', "W/")):
        etag = validators.get("ETag", "")
        return not if_range.startswith("W/") and if_range == etag and not etag.startswith("W/")
    return if_range == validators.get("Last-Modified")
