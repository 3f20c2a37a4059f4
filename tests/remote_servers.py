"""Real servers for the remote-transport tests, bound to 127.0.0.1 only and stopped by their fixtures.

``http_server(root, ranged)``: the standard library's HTTP server over a folder, with or without
``Range`` support, plus fault injection per path (``faults``): ``"drop"`` (close the connection half-way
through the body, once), ``"slow"`` (send nothing for longer than the client's timeout), ``"404"``,
``"changed"`` (serve other bytes of the same length: an object replaced after materialization),
``"endless"`` (a body that keeps coming, no length given: up to ``ENDLESS_BYTES``, or until the client hangs
up); with
``token``, every request must end in ``?token=<token>`` (403 otherwise).
``s3_server()``: moto's S3-compatible server (PyPI ``moto[server]``), with fsspec pointed at it.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import os
import threading
import time
import urllib.request
from pathlib import Path

LOCALHOST = "127.0.0.1"
ENDLESS_BYTES = 512 << 20  # what an "endless" body sends at most: the test ends by itself whatever the client does


class _Handler(http.server.SimpleHTTPRequestHandler):
    ranged = True
    token: str | None = None
    forbid: str | None = None  # "hidden": 403 for dotfiles (nginx's usual rule); "missing": 403 for what is absent
    faults: dict = {}
    log: list = []

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _fault(self) -> str | None:
        name = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
        return self.faults.get(name)

    def _refused(self) -> bool:
        """With a ``token``, a request without ``?token=<it>`` is refused (403), like a signed-URL store; with
        ``forbid``, hidden files or absent ones are (a server denying dotfiles; a bucket without list rights)."""
        path = self.path.split("?", 1)[0]
        hidden = any(part.startswith(".") for part in path.split("/"))
        absent = not Path(self.translate_path(self.path)).exists()
        if ((self.token and not self.path.endswith(f"?token={self.token}"))
                or (self.forbid == "hidden" and hidden) or (self.forbid == "missing" and absent)):
            self.send_error(403)
            return True
        return False

    def do_HEAD(self):
        if self._refused():
            return None
        if self._fault() == "404":
            return self.send_error(404)
        return super().do_HEAD()

    def do_GET(self):
        self.log.append((self.command, self.path, self.headers.get("Range")))
        if self._refused():
            return None
        fault = self._fault()
        if fault == "404":
            return self.send_error(404)
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return super().do_GET()
        if fault == "endless":
            return self._endless()
        data = path.read_bytes()
        if fault == "changed":
            data = bytes(b ^ 0xFF for b in data[:1024]) + data[1024:]
        start = self._range_start()
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if self.ranged:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._send(data[start:], fault)

    def _endless(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.close_connection = True
        chunk = b"\0" * (1 << 20)
        with contextlib.suppress(OSError):  # the client hanging up is the expected end
            for _ in range(ENDLESS_BYTES // len(chunk)):
                self.wfile.write(chunk)

    def _range_start(self) -> int:
        text = self.headers.get("Range") if self.ranged else None
        if not text or not text.startswith("bytes="):
            return 0
        return int(text[len("bytes="):].split("-", 1)[0])

    def _send(self, body: bytes, fault: str | None) -> None:
        name = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
        if fault == "drop":
            self.faults.pop(name, None)  # only once: the retry succeeds
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if fault == "slow":
            time.sleep(1.5)
        self.wfile.write(body)


@contextlib.contextmanager
def http_server(root: Path, ranged: bool = True, token: str | None = None, forbid: str | None = None):
    """Serve ``root`` on 127.0.0.1 (a free port); yields ``(base_url, handler_class)``."""
    handler = type("Handler", (_Handler,), {"ranged": ranged, "token": token, "forbid": forbid, "faults": {},
                                            "log": []})
    server = http.server.ThreadingHTTPServer((LOCALHOST, 0), functools.partial(handler, directory=str(root)))
    with _serving(server) as url:
        yield url, handler


@contextlib.contextmanager
def _serving(server: http.server.ThreadingHTTPServer):
    """Run ``server`` in a thread; yields its base URL, and stops it (and the thread) on the way out."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOCALHOST}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}  # never ask an instance-metadata address for credentials


@contextlib.contextmanager
def s3_server():
    """moto's S3 server on 127.0.0.1; fsspec (this process, and subprocesses via the environment) talks to it.
    Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer
    import fsspec.config

    server = ThreadedMotoServer(ip_address=LOCALHOST, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{LOCALHOST}:{port}"
    env = {**S3_ENV, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_conf = fsspec.config.conf.get("s3")
    os.environ.update(env)
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    try:
        yield endpoint
    finally:
        try:
            _reset_and_stop(server, endpoint)
        finally:
            _restore_client_config(saved_env, saved_conf)


def _reset_and_stop(server, endpoint: str) -> None:
    # moto keeps its buckets in process-wide state that outlives the server: without a reset, the next server in
    # this process (another module's fixture) would find this one's buckets and objects
    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30).close()
    finally:
        server.stop()


def _restore_client_config(saved_env: dict, saved_conf) -> None:
    import fsspec.config
    import s3fs

    for k, v in saved_env.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    fsspec.config.conf.pop("s3", None)
    if saved_conf is not None:
        fsspec.config.conf["s3"] = saved_conf
    s3fs.S3FileSystem.clear_instance_cache()  # the next server has another port


@contextlib.contextmanager
def s3_bucket(name: str):
    """``s3_server()`` with an empty bucket ``name`` made in it; yields ``(fsspec s3 filesystem, endpoint URL)``."""
    with s3_server() as endpoint:
        import fsspec
        fs = fsspec.filesystem("s3")
        fs.mkdir(name)
        yield fs, endpoint


def upload_folder(local: Path, url: str) -> None:
    """Copy a local folder tree to ``url`` (an s3:// prefix) with fsspec."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{path}/{f.relative_to(local).as_posix()}")


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """Forwards every request to ``upstream`` unless ``rule(method, path)`` names a fault for it."""

    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int] = ("", 0)
    rule = staticmethod(lambda method, path: None)
    log: list = []

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                chunk = self.rfile.read(size + 2)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += chunk[:-2]
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self):
        import http.client

        body = self._body()
        fault = self.rule(self.command, self.path)
        self.log.append((self.command, self.path, fault))
        if fault == "drop":  # the connection closes with no answer: what a dying server or a reset looks like
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)
            return
        if fault in ("403", "412", "500", "503"):  # 412: a failed If-None-Match without AWS's <Condition> (MinIO)
            code = int(fault)
            text = {403: "AccessDenied", 412: "PreconditionFailed", 500: "InternalError", 503: "SlowDown"}[code]
            payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{text}</Code><Message>{text} "
                       f"(injected)</Message></Error>").encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None  # HEAD: the object's size
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


@contextlib.contextmanager
def fault_proxy(endpoint: str, rule):
    """An HTTP proxy on 127.0.0.1 in front of ``endpoint`` (``s3_server()``'s): ``rule(method, path)`` returns
    None (forward), ``"500"``/``"503"``/``"403"``/``"412"`` (answer that, S3-style), or ``"drop"`` (close the connection
    unanswered) per request. Yields ``(proxy_url, handler_class)``; ``handler_class.log`` holds
    ``(method, path, fault)`` per request."""
    host, port = endpoint.rsplit("//", 1)[1].split(":")
    handler = type("Proxy", (_ProxyHandler,), {"upstream": (host, int(port)), "rule": staticmethod(rule), "log": []})
    server = http.server.ThreadingHTTPServer((LOCALHOST, 0), handler)
    server.daemon_threads = True
    with _serving(server) as url:
        yield url, handler
