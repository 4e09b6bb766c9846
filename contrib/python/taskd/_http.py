"""HTTP/1.1 to the taskd API over TCP or a Unix socket, with keep-alive connections.

One connection per thread (and per process: a forked web server's children each make
their own), kept open between requests and made anew when the daemon closed it.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.parse
from typing import Any, Dict, List, Optional, Tuple

from .errors import APIError, ConnectionFailed

# The daemon closes a connection that sends nothing for 5 s; one idle longer than this is
# not reused (a request written into a connection the daemon is closing would be lost).
_IDLE_REUSE = 4.0


class _HTTPConnection(http.client.HTTPConnection):
    """http.client, with a request's head and body sent in one write.

    http.client sends the head, then the body in a second write (in every Python this
    library supports, whatever `request()` or `endheaders(message_body=...)` is given). The
    daemon may answer before it reads the body (a refusal: a wrong token, an unknown queue,
    a draining daemon), and a body written after the answer into a connection being closed
    fails with a broken pipe instead of the answer. One write puts the whole request on its
    way before any answer (and takes one system call and, when small, one packet).
    """

    _held: Optional[List[bytes]] = None

    def send(self, data: Any) -> None:
        held = self._held
        if held is None:
            super().send(data)
        else:
            held.append(bytes(data))

    def request_at_once(
        self, method: str, url: str, body: Optional[bytes], headers: Dict[str, str]
    ) -> None:
        """`request()`, with everything it writes sent in one write."""
        self._held = []
        try:
            self.request(method, url, body=body, headers=headers)
            whole = b"".join(self._held)
        finally:
            self._held = None
        self.send(whole)


class _UnixHTTPConnection(_HTTPConnection):
    """http.client over AF_UNIX: the same requests and answers, another socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Transport:
    """Requests to one daemon's API: `server` is `http://host:port` or `unix:/path`."""

    def __init__(self, server: str, token: Optional[str], timeout: float) -> None:
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._local = threading.local()
        # Connections made so far (by every thread): keep-alive shows as few of them.
        self.connects = 0
        self._lock = threading.Lock()
        if self.server.startswith("unix:"):
            self._unix: Optional[str] = self.server[len("unix:") :]
            if not self._unix:
                raise ValueError("a unix: server needs a path, such as unix:/run/taskd/api.sock")
            self._host = ""
            self._port = 0
            self._prefix = ""
        else:
            parsed = urllib.parse.urlsplit(self.server)
            if parsed.scheme != "http" or not parsed.hostname:
                raise ValueError(
                    "server %r is neither http://host:port nor unix:/path/to/api.sock"
                    % server
                )
            self._unix = None
            self._host = parsed.hostname
            self._port = parsed.port or 80
            self._prefix = parsed.path.rstrip("/")

    def _new(self) -> _HTTPConnection:
        with self._lock:
            self.connects += 1
        if self._unix is not None:
            return _UnixHTTPConnection(self._unix, self.timeout)
        return _HTTPConnection(self._host, self._port, timeout=self.timeout)

    def _connection(self) -> Tuple[_HTTPConnection, bool]:
        """This thread's connection, and whether it served a request before."""
        local = self._local
        conn = getattr(local, "conn", None)
        fresh = (
            conn is None
            or getattr(local, "pid", None) != os.getpid()
            or time.monotonic() - getattr(local, "used", 0.0) > _IDLE_REUSE
        )
        if fresh:
            if conn is not None and getattr(local, "pid", None) == os.getpid():
                conn.close()
            conn = self._new()
            local.conn = conn
            local.pid = os.getpid()
            return conn, False
        return conn, True

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def close(self) -> None:
        """Closes this thread's connection (the next request opens a new one)."""
        self._drop()

    def request(self, method: str, path: str, body: Any = None, raw: Optional[bytes] = None) -> Any:
        """`method path` with a JSON body (or `raw` bytes, sent as application/octet-stream);
        the JSON answer, or APIError / ConnectionFailed."""
        headers: Dict[str, str] = {"Accept": "application/json"}
        if raw is not None:
            data: Optional[bytes] = bytes(raw)
            headers["Content-Type"] = "application/octet-stream"
        else:
            data = None if body is None else json.dumps(body).encode("utf-8")
            if data is not None:
                headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        for attempt in (1, 2):
            conn, reused = self._connection()
            try:
                resp, raw = _exchange(conn, method, self._prefix + path, data, headers)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self._drop()
                # A kept connection the daemon closed before reading the request: once more
                # on a new one. A new connection failing is an answer.
                if reused and attempt == 1:
                    continue
                raise ConnectionFailed(self.server, e) from None
            except (OSError, http.client.HTTPException) as e:
                self._drop()
                raise ConnectionFailed(self.server, e) from None
            self._local.used = time.monotonic()
            if resp.getheader("Connection", "").lower() == "close":
                self._drop()
            return _answer(method, path, resp.status, raw)
        raise AssertionError("unreachable")


def _exchange(
    conn: _HTTPConnection,
    method: str,
    url: str,
    data: Optional[bytes],
    headers: Dict[str, str],
) -> Tuple[http.client.HTTPResponse, bytes]:
    """Sends one request and reads its answer."""
    try:
        conn.request_at_once(method, url, data, headers)
    except (BrokenPipeError, ConnectionResetError) as broken:
        # The daemon answered and closed the connection before it took the whole request:
        # it reads at most 64 KiB of a body it refuses. Its answer is there to read and says
        # why (401, 413, ...); without one, the broken connection is the error.
        try:
            resp = conn.getresponse()
            return resp, resp.read()
        except (OSError, http.client.HTTPException):
            raise broken from None
    resp = conn.getresponse()
    return resp, resp.read()


def _answer(method: str, path: str, status: int, raw: bytes) -> Any:
    try:
        value = json.loads(raw.decode("utf-8")) if raw else None
    except ValueError:
        value = None
    if 200 <= status < 300:
        return value
    error = value.get("error") if isinstance(value, dict) else None
    if isinstance(error, dict):
        raise APIError(
            status,
            str(error.get("code", "error")),
            str(error.get("message", "HTTP %d" % status)),
            error,
        )
    text = raw.decode("utf-8", "replace").strip()[:200]
    raise APIError(status, "http_%d" % status, "%s %s: HTTP %d %s" % (method, path, status, text), {})
