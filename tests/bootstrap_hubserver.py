"""A loopback stand-in for the Hugging Face hub and its CDN, for the bootstrap's download tests.

The hub answers /<repo>/resolve/<revision>/<path> like huggingface.co: a large (LFS) file is a 302 to the CDN
(another host:port) carrying X-Linked-Etag, X-Linked-Size and X-Repo-Commit; a small git file is served
directly with its git blob SHA-1 as ETag; a gated repo answers 401/403 with X-Error-Code GatedRepo. Faults are
set per file: 5xx answers that recover, a connection dropped mid-body, a stall (to kill the client), or bytes
that do not match the advertised hash.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubFile:
    repo: str
    path: str
    data: bytes
    revision: str = "main"
    lfs: bool = True
    gated: bool = False
    serve: bytes | None = None  # bytes the CDN sends instead of `data` (the advertised hash stays data's)
    fail_5xx: int = 0  # the hub answers 503 this many times first
    drop_after: int | None = None  # the CDN closes the connection after this offset ...
    drops: int = 0  # ... this many times
    stall_after: int | None = None  # the CDN sends up to this offset, then waits for `release`
    release: threading.Event = field(default_factory=threading.Event)
    refuse_ranges: bool = False  # the CDN answers every Range request with 416
    location: str | None = None  # the hub's 302 points here instead of at the CDN
    # served by the hub itself with no ETag and no Content-Length: only the closing connection ends it
    bare: bool = False
    trickle_s: float = 0.0  # the CDN sends 100 bytes, then waits this long, and so on

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def body(self) -> bytes:
        return self.data if self.serve is None else self.serve


@dataclass
class Seen:
    server: str  # "hub" or "cdn"
    path: str
    headers: dict[str, str]
    status: int = 0


class FakeHub:
    def __init__(self, token: str = "hf_good_token", error_message: str | None = None) -> None:
        self.token = token
        self.error_message = error_message  # X-Error-Message of 4xx answers (default: one naming the path)
        self.files: list[HubFile] = []
        self.log: list[Seen] = []
        self.lock = threading.Lock()
        self.hub = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("hub"))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("cdn"))
        self.hub.daemon_threads = self.cdn.daemon_threads = True
        # the CDN is named "localhost" and listens on another port: another host as far as the client can tell
        self.endpoint = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_base = f"http://localhost:{self.cdn.server_address[1]}"
        self._threads = [
            threading.Thread(target=s.serve_forever, args=(0.02,), daemon=True) for s in (self.hub, self.cdn)
        ]

    def __enter__(self) -> FakeHub:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files:
            f.release.set()
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def add(self, hub_file: HubFile) -> HubFile:
        self.files.append(hub_file)
        return hub_file

    def requests(self, server: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.log if s.server == server]

    def _find(self, repo: str, revision: str, path: str) -> HubFile | None | bool:
        repo_known = False
        for f in self.files:
            if f.repo == repo:
                repo_known = True
                if f.revision == revision and f.path == path:
                    return f
        return repo_known

    def _handler(self, server_name: str):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _record(self, status: int) -> None:
                with hub.lock:
                    hub.log.append(Seen(server_name, self.path, dict(self.headers.items()), status))

            def _answer(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
                self._record(status)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if server_name == "hub":
                    self._hub()
                else:
                    self._cdn()

            def _hub(self) -> None:
                path = unquote(urlsplit(self.path).path).lstrip("/")
                repo, sep, rest = path.partition("/resolve/")
                revision, _, file_path = rest.partition("/")
                found = hub._find(repo, revision, file_path) if sep else False
                if not isinstance(found, HubFile):
                    code = ("EntryNotFound", 404) if found else ("RepoNotFound", 401)
                    message = hub.error_message or f"{code[0]} for {path}"
                    return self._answer(code[1], {"X-Error-Code": code[0], "X-Error-Message": message})
                if found.fail_5xx > 0:
                    found.fail_5xx -= 1
                    return self._answer(503, {}, b"<html>busy</html>")
                if found.gated:
                    auth = self.headers.get("Authorization")
                    if not auth:
                        return self._answer(
                            401,
                            {
                                "X-Error-Code": "GatedRepo",
                                "X-Error-Message": "Access to this repo is restricted.",
                            },
                            b"<html>Access restricted</html>",
                        )
                    if auth != f"Bearer {hub.token}":
                        return self._answer(
                            403,
                            {
                                "X-Error-Code": "GatedRepo",
                                "X-Error-Message": f"Access to model {found.repo} is restricted and you are not in the authorized list.",
                            },
                        )
                if found.bare:
                    return self._send_bare(found)
                if found.lfs:
                    return self._answer(
                        302,
                        {
                            "Location": found.location
                            or f"{hub.cdn_base}/blobs/{found.sha256}?name={found.path}",
                            "X-Linked-Etag": f'"{found.sha256}"',
                            "X-Linked-Size": str(len(found.data)),
                            "X-Repo-Commit": COMMIT,
                            "ETag": f'"{found.sha256}"',
                        },
                    )
                self._send_body(found, {"ETag": f'"{git_blob_sha1(found.data)}"', "X-Repo-Commit": COMMIT})

            def _cdn(self) -> None:
                blob = urlsplit(self.path).path.rpartition("/")[2]
                found = next((f for f in hub.files if f.sha256 == blob), None)
                if found is None:
                    return self._answer(404, {}, b"no such blob")
                self._send_body(found, {"ETag": f'"{found.sha256}"'})

            def _send_body(self, found: HubFile, headers: dict[str, str]) -> None:
                body = found.body
                start = 0
                range_header = self.headers.get("Range")
                if range_header and range_header.startswith("bytes="):
                    start = int(range_header[6:].partition("-")[0])
                    if start >= len(body) or found.refuse_ranges:
                        return self._answer(416, {"Content-Range": f"bytes */{len(body)}"})
                status = 206 if start else 200
                self._record(status)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                end = len(body)
                if found.stall_after is not None and start < found.stall_after:
                    self.wfile.write(body[start : found.stall_after])
                    self.wfile.flush()
                    found.release.wait(30)
                    return self._cut()
                if found.trickle_s:
                    for offset in range(start, end, 100):
                        self.wfile.write(body[offset : offset + 100])
                        self.wfile.flush()
                        if found.release.wait(found.trickle_s):
                            return self._cut()
                    return None
                if found.drops > 0 and found.drop_after is not None and start < found.drop_after:
                    found.drops -= 1
                    self.wfile.write(body[start : found.drop_after])
                    return self._cut()
                self.wfile.write(body[start:end])

            def _send_bare(self, found: HubFile) -> None:
                """No size and no hash in the answer; the body ends where the connection closes."""
                self._record(200)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(found.body[: found.drop_after])
                self._cut()

            def _cut(self) -> None:
                self.wfile.flush()
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        return Handler
