"""Where shard bytes come from and go to: one small transport class per URL scheme.

The loaders and ``rankshard-preprocess`` never branch on a URL's scheme; they ask ``transport_for(url)``:

=================  ==========================  ======================================================
scheme             class                       how bytes move
=================  ==========================  ======================================================
path, file://      ``LocalTransport``          seeks in the file (the tar reader never copies a shard)
http://, https://  ``HttpTransport``           GET; a dropped download resumes with ``Range: bytes=N-``
                                               (a server that ignores Range sends it again from 0)
pipe:CMD           ``PipeTransport``           CMD's stdout, sequential; a failure reruns CMD
s3:// and any      ``FsspecTransport``         fsspec (``pip install rankshard[remote]``): ranged reads,
fsspec protocol    (s3://: ``S3Transport``)    listing, atomic writes (temporary key, then rename)
=================  ==========================  ======================================================

A remote shard is fetched whole (one request, resumed where it broke), because the tar index scan reads a
512-byte header in front of every member: scanning over the network would cost one round trip per member.
Its bytes are checked against the manifest's size and sha256 *as they arrive* (``fetch``), so a shard that
changed on the server, or a download spliced from two versions, is never read as whole. ``ShardCache``
keeps verified shards on local disk (named by their sha256, least recently used evicted beyond a size
limit), so a second epoch reads local files.
"""
from __future__ import annotations

import abc
import contextlib
import fcntl
import hashlib
import os
import re
import select
import shlex
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from rankshard.preprocess.errors import RankshardError

CHUNK = 1 << 20  # bytes per read from a stream (and per hashing step)


class TransportError(RankshardError):
    """A URL could not be read or written after the retries; the message names the URL and the fix."""


class MissingError(TransportError):
    """The URL does not exist (HTTP 404/410, no such key or file): retrying would not help."""


class ForbiddenError(TransportError):
    """The server refused the URL (HTTP 401/403). Some answer so for a file that is not there too (a bucket
    without list permission, a server denying hidden files), so a probe treats it as absent."""


class IntegrityError(TransportError):
    """What arrived is not what the manifest recorded (size or sha256)."""


class _Transient(TransportError):
    """A failure worth retrying (dropped connection, timeout, 5xx, a command that failed); never leaves
    this module: after the retries it becomes a TransportError naming the URL."""


@dataclass(frozen=True)
class Retry:
    attempts: int = 4          # tries per URL, the first included
    backoff_s: float = 0.25    # wait after the first failure, doubled after each further one
    timeout_s: float = 30.0    # per request: a server silent this long counts as a failed attempt


RETRY = Retry()


def is_url(location) -> bool:
    """Whether ``location`` is read through a remote transport (anything but a local path or file://)."""
    text = str(location)
    return text.startswith("pipe:") or ("://" in text and not text.startswith("file://"))


def _split_query(url) -> tuple[str, str]:
    """``(url without its query, "?query" or "")``: an http(s) query (an access token) belongs after the path,
    and stays with every URL built from this one; other locations keep every character as path."""
    text = str(url)
    if scheme(text) in ("http", "https") and "?" in text:
        base, _, query = text.partition("?")
        return base, f"?{query}"
    return text, ""


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for local paths and URLs alike (a URL is never passed through ``Path``, which would
    fold ``s3://`` into ``s3:/``); an http(s) query stays at the end."""
    base, query = _split_query(base)
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts if p]]) + query


def parent(url: str) -> str:
    base, query = _split_query(url)
    return base.rstrip("/").rsplit("/", 1)[0] + query


def basename(url: str) -> str:
    """The last path segment of a path or URL (an http(s) query is not part of the name)."""
    return _split_query(url)[0].rstrip("/").rsplit("/", 1)[-1]


class Transport(abc.ABC):
    """Reading is ``stream`` (bytes from ``start`` on) and ``size``; where ``resumable`` a broken download
    continues where it stopped. Writing (materialization to object storage) is only for ``writable`` ones."""

    ranged = False
    writable = False
    can_list = False

    def resumable(self, url: str) -> bool:
        return self.ranged

    @abc.abstractmethod
    def stream(self, url: str, start: int, timeout: float) -> Iterator[bytes]:
        """The bytes at ``url`` from offset ``start`` on, in chunks."""

    def size(self, url: str, timeout: float) -> int | None:
        """Bytes at ``url``, None when the transport cannot tell without reading; MissingError if absent."""
        return None

    def names(self, folder: str) -> list[str]:
        """Names of the objects directly in ``folder`` (only where ``can_list``)."""
        raise self._cannot_list(folder)

    def find(self, folder: str, suffixes: tuple[str, ...]) -> dict[str, int]:
        """Every object below ``folder`` whose name ends with one of ``suffixes``, at any depth, as ``{path
        relative to folder: bytes}`` (only where ``can_list``); empty when nothing is there. ``format/tree.py``
        walks shard trees with it: the suffixes spare a stat of every raw image that shares the tree."""
        raise self._cannot_list(folder)

    @staticmethod
    def _cannot_list(folder: str) -> TransportError:
        return TransportError(f"{folder}: this transport cannot list a folder; name the shards explicitly "
                              "(a brace pattern such as train-{000000..000009}.tar)")

    def put_file(self, local: Path, url: str) -> None:
        raise TransportError(f"{url}: this transport is read-only; write to a local folder or to s3:// "
                             "(or another fsspec filesystem)")

    put_bytes = delete = put_file

    def sweep_uploads(self, folder: str, which: Callable[[str], bool]) -> None:
        """Abort the incomplete multipart uploads below ``folder`` whose key, relative to it, ``which`` picks: a
        process killed mid-upload leaves one, invisible in listings and billed until aborted. Nothing to do
        where the store has no such thing (every store but S3); TransportError where the store refuses."""


def _folder_id(folder: str) -> tuple[int, int] | None:
    """(device, inode) of a folder, None where it went away or is a broken link."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class LocalTransport(Transport):
    ranged = writable = can_list = True

    @staticmethod
    def _path(url: str) -> Path:
        return Path(url[len("file://"):] if str(url).startswith("file://") else url)

    def stream(self, url, start, timeout):
        try:
            with open(self._path(url), "rb") as f:
                f.seek(start)
                while data := f.read(CHUNK):
                    yield data
        except FileNotFoundError:
            raise MissingError(f"{url}: no such file") from None

    def size(self, url, timeout):
        try:
            return self._path(url).stat().st_size
        except FileNotFoundError:
            raise MissingError(f"{url}: no such file") from None

    def names(self, folder):
        path = self._path(folder)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    def find(self, folder, suffixes):
        path, out, seen = self._path(folder), {}, set()
        # symlinked folders are followed (a variant linked in from elsewhere is part of the split), each real
        # folder once: a link back up the tree would otherwise loop forever
        for top, dirs, names in os.walk(path, followlinks=True):
            key = _folder_id(top)
            if key is None or key in seen:
                dirs[:] = []
                continue
            seen.add(key)
            # real folders before links at each level: a link aliasing a folder must not be the name it is found by
            dirs.sort(key=lambda d: (os.path.islink(os.path.join(top, d)), d))
            rel = os.path.relpath(top, path)
            for name in (n for n in names if n.endswith(suffixes)):
                with contextlib.suppress(FileNotFoundError):  # gone while listing: a run renaming its temporary
                    out[name if rel == "." else f"{Path(rel).as_posix()}/{name}"] = os.stat(os.path.join(top, name)).st_size
        return out

    def put_file(self, local, url):
        self.put_bytes(Path(local).read_bytes(), url)

    def put_bytes(self, data: bytes, url: str) -> None:
        dest = self._path(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def delete(self, url):
        self._path(url).unlink(missing_ok=True)


class HttpTransport(Transport):
    """Standard library HTTP(S). Reads need no Range support; where the server advertises it
    (``Accept-Ranges: bytes``), a dropped download resumes, else it starts again from byte 0."""

    ranged = True

    def __init__(self):
        self._ranges: dict[str, bool] = {}  # url -> whether its server said it accepts byte ranges

    def resumable(self, url):
        return self._ranges.get(url, False)

    def _open(self, url: str, timeout: float, method: str = "GET", start: int = 0):
        headers = {"Range": f"bytes={start}-"} if start else {}
        quoted = _encoded(url)
        try:
            return urllib.request.urlopen(urllib.request.Request(quoted, headers=headers, method=method),
                                          timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise MissingError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            if exc.code in (401, 403):
                raise ForbiddenError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL and the server's "
                                     "access rules") from None
            if exc.code >= 500 or exc.code in (408, 429):
                raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
            raise TransportError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL and the server's "
                                 "access rules") from None
        except (urllib.error.URLError, OSError) as exc:
            raise _Transient(str(getattr(exc, "reason", exc))) from None

    def stream(self, url, start, timeout):
        resp = self._open(url, timeout, start=start)
        with resp:
            self._ranges[url] = resp.headers.get("Accept-Ranges", "").strip() == "bytes"
            skip = start if resp.status == 200 else 0  # Range ignored: the body starts at byte 0 again
            expected = resp.length
            got = 0
            try:
                while data := resp.read(CHUNK):
                    got += len(data)
                    if skip:
                        cut = min(skip, len(data))
                        data, skip = data[cut:], skip - cut
                    if data:
                        yield data
            except (OSError, ValueError) as exc:  # includes socket timeouts and http.client.IncompleteRead
                raise _Transient(f"connection broke after {start + got} bytes ({type(exc).__name__})") from None
            if expected is not None and got < expected:
                raise _Transient(f"connection closed after {got} of {expected} bytes")

    def size(self, url, timeout):
        for attempt in range(RETRY.attempts):
            try:
                with self._open(url, timeout, method="HEAD") as resp:
                    length = resp.headers.get("Content-Length")
                    return int(length) if length is not None else None
            except _Transient as exc:
                _pause(attempt, url, exc)


class PipeTransport(Transport):
    """``pipe:CMD``: the shard is CMD's standard output (webdataset's convention), read once, in full.

    ``timeout`` applies as to a server: a command silent that long (a stalled ``curl``) counts as a failed
    attempt and is killed with everything it started (its own process group). Its stderr goes to a temporary
    file, not a pipe: a command that writes more than a pipe holds there (a progress meter) would otherwise
    block forever while we wait for its stdout.
    """

    def stream(self, url, start, timeout):
        command = url[len("pipe:"):]
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=err,
                                    start_new_session=True)
            done = False
            try:
                while data := self._read(proc, command, timeout):
                    yield data
                done = True
            finally:
                proc.stdout.close()
                code = self._end(proc, command, timeout, kill=not done)
            err.seek(0)
            message = err.read().decode(errors="replace").strip()
        if code:
            raise _Transient(f"command {shlex.quote(command)} exited with {code}: {message[-300:] or 'no message'}")

    @staticmethod
    def _read(proc: subprocess.Popen, command: str, timeout: float) -> bytes:
        if not select.select([proc.stdout], [], [], timeout)[0]:
            raise _Transient(f"command {shlex.quote(command)} wrote nothing for {timeout:g} s")
        return os.read(proc.stdout.fileno(), CHUNK)

    @staticmethod
    def _end(proc: subprocess.Popen, command: str, timeout: float, kill: bool) -> int:
        """Its exit status, once it has ended: at once when ``kill`` (we stopped reading), else within
        ``timeout`` of closing its stdout."""
        if not kill:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
        if not kill:
            raise _Transient(f"command {shlex.quote(command)} did not exit {timeout:g} s after its output ended")
        return code


class FsspecTransport(Transport):
    """s3:// and every other protocol fsspec knows (with its optional package installed).

    Credentials and endpoints come from the usual places (AWS_* variables, ~/.aws); for an S3-compatible
    server set ``FSSPEC_S3_ENDPOINT_URL`` (fsspec reads ``FSSPEC_<PROTOCOL>_<OPTION>`` variables).
    """

    ranged = writable = can_list = True

    def __init__(self, protocol: str):
        self.protocol = protocol

    def _fs(self, url: str):
        try:
            import fsspec
            return fsspec.core.url_to_fs(url)
        except ImportError as exc:
            raise TransportError(f"{url}: reading {self.protocol}:// needs fsspec and its {self.protocol} package "
                                 f"({exc.name} is missing); pip install 'rankshard[remote]'") from None

    def stream(self, url, start, timeout):
        fs, path = self._fs(url)
        try:
            with fs.open(path, "rb", block_size=CHUNK) as f:
                f.seek(start)
                while data := f.read(CHUNK):
                    yield data
        except FileNotFoundError as exc:
            raise _store_error(url, exc, "reading") or MissingError(f"{url}: no such object") from None
        except Exception as exc:  # noqa: BLE001 - sorted into the user's to fix, or worth retrying
            raise _store_error(url, exc, "reading") or _transient(exc) from None

    def size(self, url, timeout):
        fs, path = self._fs(url)
        try:
            return int(self._retried(url, "reading", lambda: fs.size(path)))
        except FileNotFoundError:
            raise MissingError(f"{url}: no such object") from None

    def names(self, folder):
        fs, path = self._fs(folder)
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1]
                          for p in self._retried(folder, "listing", lambda: fs.ls(path, detail=False, refresh=True)))
        except FileNotFoundError:
            return []

    @staticmethod
    def _retried(url: str, doing: str, call):
        """``call()``, tried again after a failure worth retrying (on top of the client's own retries: a server
        that keeps failing gets ``RETRY``'s backoff too); one the user must fix (no such bucket, access denied,
        no credentials) becomes a TransportError at once; FileNotFoundError (no such key) and FileExistsError
        (a conditional write found the key) are the caller's."""
        for attempt in range(RETRY.attempts):
            try:
                return call()
            except FileNotFoundError as exc:
                if (error := _store_error(url, exc, doing)) is not None:
                    raise error from None
                raise
            except FileExistsError:  # a conditional write found the object there (put_new)
                raise
            except Exception as exc:  # noqa: BLE001 - sorted as in stream()
                if (error := _store_error(url, exc, doing)) is not None:
                    raise error from None
                _pause(attempt, url, _transient(exc), RETRY)
        raise AssertionError("unreachable")

    def find(self, folder, suffixes):
        # one recursive listing (S3: pages of 1,000 keys, no request per folder); never from fsspec's cache of
        # earlier listings, which would miss what a run wrote since
        fs, path = self._fs(folder)
        base = path.rstrip("/") + "/"
        fs.invalidate_cache(path)
        try:
            found = self._retried(folder, "listing", lambda: fs.find(path, detail=True))
        except FileNotFoundError:
            return {}
        return {name[len(base):]: int(info.get("size") or 0) for name, info in found.items()
                if name.startswith(base) and name.endswith(suffixes) and info.get("type") != "directory"}

    def put_file(self, local, url):
        # object stores have no rename: upload under a hidden temporary key, then copy. A reader listing the
        # prefix sees the shard only once it is whole (a failed upload leaves at most the temporary key).
        # The key is unique to this process: ranks that publish the same object (the split's config, equal
        # manifests) would otherwise copy or delete each other's upload mid-flight.
        # A resuming run sweeps temporary keys it finds, and their multipart uploads (``objectstore``): should it
        # take ours mid-upload (NoSuchUpload) or between the upload and the copy, both are tried again.
        fs, path = self._fs(url)
        tmp = join(parent(path), f".{path.rsplit('/', 1)[-1]}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")

        def upload_then_copy():
            try:
                fs.put_file(str(local), tmp)  # S3: a multipart upload above s3fs's chunk size
                fs.copy(tmp, path)
            except FileNotFoundError as exc:
                # the temporary key or its upload, swept: not the bucket (the store says), nor our staged file
                if _store_error(url, exc, "writing") is None and Path(local).exists():
                    raise OSError(f"temporary key {tmp} or its upload vanished before its copy") from None
                raise
        try:
            self._retried(url, "writing", upload_then_copy)
        finally:
            with contextlib.suppress(Exception):  # a key left behind is swept by the next run (objectstore)
                fs.rm(tmp)

    def put_bytes(self, data, url):
        fs, path = self._fs(url)
        self._retried(url, "writing", lambda: fs.pipe_file(path, data))  # one PUT: all of it or nothing

    def put_new(self, data: bytes, url: str) -> bool:
        """Write ``data`` at ``url`` only if nothing is there (one conditional PUT, ``If-None-Match: *``); False
        when something is. A store that ignores the condition overwrites (True): callers re-read."""
        fs, path = self._fs(url)

        def create():
            try:
                fs.pipe_file(path, data, mode="create")
            except OSError as exc:
                # s3fs says FileExistsError only for AWS's 412 body (its <Condition> element); other stores'
                # 412 (MinIO, Ceph) arrives as OSError(EINVAL): the same answer, not worth retrying
                if _client_code(exc) == "PreconditionFailed" and not isinstance(exc, FileExistsError):
                    raise FileExistsError(url) from exc
                raise
        try:
            self._retried(url, "writing", create)
        except FileExistsError:
            return False
        except TypeError:  # an fsspec filesystem without exclusive writes
            self.put_bytes(data, url)
        return True

    def delete(self, url):
        fs, path = self._fs(url)
        with contextlib.suppress(FileNotFoundError):
            self._retried(url, "deleting", lambda: fs.rm(path))


class S3Transport(FsspecTransport):
    """s3:// through s3fs, which uploads a file above its chunk size (about 100 MiB: an ImageNet shard) as a
    multipart upload: one a killed process leaves incomplete is swept here (``sweep_uploads``)."""

    def sweep_uploads(self, folder, which):
        fs, path = self._fs(folder)
        bucket, key, _ = fs.split_path(path)
        prefix = f"{key.rstrip('/')}/" if key else ""
        try:
            for upload in self._uploads(fs, bucket, prefix):
                if which(upload["Key"][len(prefix):]):
                    with contextlib.suppress(FileNotFoundError):  # NoSuchUpload: it ended meanwhile
                        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
                                   UploadId=upload["UploadId"])
        except Exception as exc:  # noqa: BLE001 - refused (permissions of their own, often not granted) or failing
            _transient(exc)  # anything but the client's or the store's failure is a bug: raised as it is
            raise TransportError(
                f"{folder}: incomplete multipart uploads left by killed runs could not be listed or aborted "
                f"({type(exc).__name__}: {exc}); they stay, invisible in listings and billed, until aborted. Grant "
                "s3:ListBucketMultipartUploads (on the bucket) and s3:AbortMultipartUpload, or give the bucket a "
                "lifecycle rule with AbortIncompleteMultipartUpload") from None

    @staticmethod
    def _uploads(fs, bucket: str, prefix: str) -> Iterator[dict]:
        """The bucket's incomplete multipart uploads whose key starts with ``prefix``, page by page (the
        client retries a failing request itself: a sweep is housekeeping, not worth ``_retried``'s backoff)."""
        page: dict = {}
        while True:
            out = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **page)
            yield from out.get("Uploads") or ()
            if not out.get("IsTruncated"):
                return
            page = {"KeyMarker": out["NextKeyMarker"], "UploadIdMarker": out["NextUploadIdMarker"]}


def _client_code(exc: BaseException) -> str | None:
    """The store's error code (botocore's ``ClientError.response["Error"]["Code"]``) behind an fsspec exception,
    which s3fs raises ``from`` it; None where there is none."""
    seen = 0
    while exc is not None and seen < 5:
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            return str(response["Error"].get("Code"))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


_CLIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "s3fs", "gcsfs", "adlfs", "fsspec")


def _transient(exc: Exception) -> _Transient:
    """A failure of the client or the server (5xx, a dropped connection, a timeout) as worth retrying; anything
    else is a bug and propagates as it is."""
    if isinstance(exc, (OSError, RuntimeError, ValueError, TimeoutError)) or \
            type(exc).__module__.split(".")[0] in _CLIENT_MODULES:
        return _Transient(f"{type(exc).__name__}: {exc}")
    raise exc


def _store_error(url: str, exc: BaseException, doing: str) -> TransportError | None:
    """The TransportError for an object-store failure that retrying cannot fix (no such bucket, access denied,
    no credentials), naming ``url`` and the fix; None for any other failure."""
    name, text, code = type(exc).__name__, str(exc), _client_code(exc)
    # by the store's error code, not the message: s3fs's FileNotFoundError for an absent key is the key's path,
    # which may well contain "bucket" (s3://my-bucket/...)
    if code == "NoSuchBucket" or text == "The specified bucket does not exist":
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return TransportError(f"{url}: the bucket {bucket!r} does not exist ({text}); create it (e.g. `aws s3 mb "
                              f"s3://{bucket}`) or correct --out")
    if name in ("ParamValidationError", "InvalidBucketName") or code == "InvalidBucketName":
        return TransportError(f"{url}: not a valid object-storage location ({text}); check the bucket name and "
                              "the path")
    if isinstance(exc, PermissionError) or code in ("AccessDenied", "Forbidden", "403"):
        verb = "read" if doing in ("reading", "listing") else "write"
        return TransportError(f"{url}: access denied while {doing} ({text}); the credentials in use may not "
                              f"{verb} there: check the bucket's policy and your permissions, or choose another "
                              "location")
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return TransportError(f"{url}: no credentials for object storage ({text}); set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (see ~/.aws/credentials)")
    if name in ("InvalidAccessKeyId", "SignatureDoesNotMatch") or "InvalidAccessKeyId" in text or \
            "SignatureDoesNotMatch" in text:
        return TransportError(f"{url}: the object store refused the credentials ({text}); check "
                              "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
    return None


TRANSPORTS: dict[str, Transport] = {"file": LocalTransport(), "http": HttpTransport(),
                                    "https": HttpTransport(), "pipe": PipeTransport()}


def scheme(url) -> str:
    text = str(url)
    if text.startswith("pipe:"):
        return "pipe"
    return text.split("://", 1)[0].lower() if "://" in text else "file"


def transport_for(url) -> Transport:
    """The transport of ``url``'s scheme; fsspec for any other protocol it knows."""
    name = scheme(url)
    if name not in TRANSPORTS:
        try:
            from fsspec.registry import known_implementations
        except ImportError:
            known_implementations = {}
        if name not in known_implementations and name not in ("s3", "gs", "gcs", "az", "abfs"):
            raise TransportError(f"{url}: unknown scheme {name}://; use a local path, http(s)://, pipe:CMD, "
                                 "or a protocol of fsspec (pip install 'rankshard[remote]')")
        TRANSPORTS[name] = (S3Transport if name in ("s3", "s3a") else FsspecTransport)(name)
    return TRANSPORTS[name]


def _encoded(url: str) -> str:
    """``url`` as http.client accepts it: spaces and non-ASCII characters percent-encoded, and a ``%`` that
    starts no ``%XX`` escape too (``100%.tar``); an escape and every character a URL may hold stay as they
    are, so an encoded URL is sent unchanged."""
    parts = re.split(r"(%[0-9A-Fa-f]{2})", url)  # the escapes land at the odd indices
    return "".join(p if i % 2 else urllib.parse.quote(p, safe=":/?#[]@!$&'()*+,;=~") for i, p in enumerate(parts))


def _pause(attempt: int, url: str, exc: Exception, retry: Retry = RETRY) -> None:
    """Back off after a failed attempt, or give up with an error naming the URL."""
    if attempt + 1 >= retry.attempts:
        raise TransportError(f"{url}: failed {retry.attempts} times, last: {exc}; check the server and the "
                             "network (rankshard retries with backoff; see transport.RETRY)") from None
    time.sleep(retry.backoff_s * 2 ** attempt)


def _download(url: str, retry: Retry, limit: int | None = None) -> tuple[bytes, str]:
    """All bytes at ``url`` and their sha256, resuming where a ranged transport broke off; past ``limit``
    bytes it stops reading (a server that never stops sending must not fill this process's memory)."""
    transport = transport_for(url)
    buf, digest = bytearray(), hashlib.sha256()
    for attempt in range(retry.attempts):
        if buf and not transport.resumable(url):  # a sequential source starts again from its first byte
            buf, digest = bytearray(), hashlib.sha256()
        try:
            for data in transport.stream(url, len(buf), retry.timeout_s):
                buf += data
                digest.update(data)
                if limit is not None and len(buf) > limit:
                    break  # the caller names the overflow
            return bytes(buf), digest.hexdigest()
        except _Transient as exc:
            _pause(attempt, url, exc, retry)
    raise AssertionError("unreachable")


def fetch(url: str, sha256: str | None = None, nbytes: int | None = None, retry: Retry | None = None,
          limit: int | None = None) -> bytes:
    """Every byte at ``url``, checked against the manifest's ``nbytes`` and ``sha256`` where given; reading
    stops past ``nbytes`` (or ``limit``) bytes.

    A mismatch is downloaded once more (a resumed download may have spliced two versions of a changed
    object); a second mismatch raises IntegrityError naming the URL: nothing unverified is returned.
    """
    retry = retry or RETRY
    limit = nbytes if limit is None else limit  # one byte past the manifest's size is already a mismatch
    for attempt in range(2):
        data, digest = _download(url, retry, limit)
        if nbytes is None and limit is not None and len(data) > limit:
            raise TransportError(f"{url}: more than {limit:,} bytes, far more than a file of this kind holds; "
                                 "check that the URL names what it should")
        problem = _mismatch(data, digest, sha256, nbytes)
        if problem is None:
            return data
    raise IntegrityError(f"{url}: {problem} (the object changed after materialization, or the manifest did); "
                         "rerun the preprocess command that wrote it, or open the variant with "
                         "verify_shards=False / on_error='skip'")


def _mismatch(data: bytes, digest: str, sha256: str | None, nbytes: int | None) -> str | None:
    if nbytes is not None and len(data) != nbytes:
        size = f"more than {nbytes}" if len(data) > nbytes else str(len(data))  # reading stops past nbytes
        return f"{size} bytes, the manifest says {nbytes}"
    if sha256 is not None and digest != sha256:
        return f"sha256 {digest[:16]}... differs from the manifest's {sha256[:16]}..."
    return None


# A manifest of ImageNet train (2,563 shards, errors listed) is about 1 MB; nothing we read as text comes close.
TEXT_LIMIT = 256 << 20


def read_text(url: str) -> str:
    """A small text object (manifest, config): UTF-8, at most ``TEXT_LIMIT`` bytes."""
    return fetch(url, limit=TEXT_LIMIT).decode("utf-8")


class ShardCache:
    """Verified remote shards on local disk, named by their sha256, least recently used evicted.

    Shared by all DataLoader workers and ranks of a machine: a per-shard ``flock`` lets one process download
    while the others wait for the file, and files appear by rename, so a reader never sees half of one.
    ``max_bytes`` bounds the folder (a single shard larger than the limit is still kept while in use).
    """

    def __init__(self, folder: str | os.PathLike, max_bytes: int = 50 << 30):
        self.folder, self.max_bytes = Path(folder), int(max_bytes)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _name(self, url: str, sha256: str | None) -> str:
        # content-addressed when the manifest gives a hash: a changed object can never hit a stale entry
        return f"{sha256}.tar" if sha256 else f"url-{hashlib.sha256(url.encode()).hexdigest()[:32]}.tar"

    def open(self, url: str, sha256: str | None = None, nbytes: int | None = None) -> BinaryIO:
        """The local copy of ``url``, open for reading; downloaded (and verified) first if the cache does not
        hold it intact. Opened under the shard's lock: another process evicting it afterwards cannot take it
        away (an open file keeps its data), as it could between handing out a path and opening it."""
        path = self.folder / self._name(url, sha256)
        with _flocked(self.folder / f".{path.name}.lock"):
            f = _open_intact(path, sha256, nbytes)
            if f is None:
                f = self._store(path, fetch(url, sha256, nbytes))
        self._evict(keep=path)
        return f

    @staticmethod
    def _store(path: Path, data: bytes) -> BinaryIO:
        """Write a verified download into the cache (whole or not at all) and return it open for reading."""
        tmp = path.with_name(f".{path.name}.partial.{os.getpid()}")
        try:
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())  # on disk before the rename makes it look complete
            f = open(tmp, "rb")  # open before the rename: an eviction right after cannot take it away
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves nothing behind
            raise
        try:
            os.replace(tmp, path)
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        _INTACT.add(_stamp(path, f))
        return f

    def _evict(self, keep: Path) -> None:
        now = time.time()
        for tmp in self.folder.glob(".*.partial.*"):  # left by a process killed while writing its download
            with contextlib.suppress(FileNotFoundError):
                if now - tmp.stat().st_mtime > STALE_PARTIAL_S:
                    tmp.unlink()
        entries = []
        for p in self.folder.glob("*.tar"):
            with contextlib.suppress(FileNotFoundError):  # another process may evict at the same time
                st = p.stat()
                entries.append((st.st_atime, st.st_size, p))  # last use: see _open_intact
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if total <= self.max_bytes:
                break
            if p != keep:
                p.unlink(missing_ok=True)  # an open reader keeps its data (POSIX unlink semantics)
                total -= size


# A download is written from memory in seconds: a temporary file this old belongs to a process that died.
STALE_PARTIAL_S = 3600

_INTACT: set[tuple] = set()  # _stamp()s of cache files this process verified (or wrote) as they are now


def _stamp(path: Path, f: BinaryIO, st: os.stat_result | None = None) -> tuple:
    st = st or os.fstat(f.fileno())
    return str(path), st.st_ino, st.st_size, st.st_mtime_ns


def _open_intact(path: Path, sha256: str | None, nbytes: int | None) -> BinaryIO | None:
    """The cached file, open, if it still holds what the manifest says: its size checked on every use, its
    sha256 unless this process verified the file unchanged since (as ``open_variant`` hashes a local shard
    once per process). A file torn by a crash before it reached the disk, or damaged since, is removed."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    st = os.fstat(f.fileno())
    intact = nbytes is None or st.st_size == nbytes
    if intact and sha256 is not None and _stamp(path, f, st) not in _INTACT:
        digest = hashlib.sha256()
        while data := f.read(CHUNK):
            digest.update(data)
        intact = digest.hexdigest() == sha256
    if not intact:
        f.close()
        path.unlink(missing_ok=True)
        return None
    # mark as recently used in the access time alone: the modification time is part of the stamp that spares
    # other processes sharing the cache from hashing the file again, and a use must not look like a change
    with contextlib.suppress(PermissionError):  # explicit times need the owner: in a shared cache, best effort
        os.utime(f.fileno(), ns=(time.time_ns(), st.st_mtime_ns))
    _INTACT.add(_stamp(path, f, st))
    return f


@contextlib.contextmanager
def _flocked(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
