"""Every request to the DICOMweb server (the PACS) bounded in time and bytes, and its answers checked.

requests' timeout is per socket read: a server that trickles a byte every few seconds, or never
stops sending, holds a request (and grows its memory) for as long as it likes, and
dicomweb-client reads whole answers into memory before looking at them. `BoundedSession`, the
session of every DICOMweb client and of the ``/proxy/dicom`` route here, reads each answer
itself as it streams in, against a total deadline (`DICOMWEB_TIMEOUT` seconds, ``medadapt label
--dicomweb-timeout``) and a byte budget (`MAX_ANSWER_BYTES`, or a tighter one a caller sets with
`request_bounds`, e.g. what a series' instance listing announces), and raises `PACSError` the moment
either is broken. `dicom_datasets` checks that a QIDO or metadata answer is the list of DICOM
JSON objects it must be. The datastore turns `PACSError` into 504 (too slow) or 502 (anything
else) naming the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import requests
import urllib3
from fastapi import Request
from fastapi.responses import Response

from medadapt.monailabel.limits import MAX_VOLUME_VOXELS

CONNECT_TIMEOUT = 10.0  # s to open a connection
READ_TIMEOUT = 120.0  # s without a byte, at most (the deadline is usually shorter)
CHUNK = 1 << 16
MAX_ANSWER_BYTES = 64 * 2 ** 20  # QIDO listings and metadata: 10,000 series of DICOM JSON are ~10 MB
# Pixel data without an announced size (a SEG, the proxy's answers): a volume at the voxel limit,
# 32 bits a voxel, plus headers.
MAX_PIXEL_ANSWER_BYTES = MAX_VOLUME_VOXELS * 4 + 64 * 2 ** 20
# Proxied answer headers worth passing on; length and encodings describe the bytes as received,
# which are decoded here.
PROXIED_HEADERS = ("content-type", "cache-control", "etag", "last-modified")


class PACSError(requests.RequestException):
    """The DICOMweb server broke a bound or answered what cannot be used.

    Arguments:
      message: what happened, naming the request.
      status: the HTTP status for the client: 504 too slow, 502 too large or malformed.
    """

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


_scope = threading.local()


@contextlib.contextmanager
def request_bounds(deadline: float | None = None, max_bytes: int | None = None) -> Iterator[None]:
    """Within the block, this thread's requests to the DICOMweb server end by ``deadline``
    (a `time.monotonic` time; one for several requests, e.g. a listing read page by page) and
    each answer holds at most ``max_bytes``. Nested blocks can only tighten the bounds."""
    saved = (getattr(_scope, "deadline", None), getattr(_scope, "max_bytes", None))
    _scope.deadline, _scope.max_bytes = _tighter(deadline, saved[0]), _tighter(max_bytes, saved[1])
    try:
        yield
    finally:
        _scope.deadline, _scope.max_bytes = saved


def _tighter(bound: float | None, outer: float | None) -> float | None:
    return outer if bound is None else bound if outer is None else min(bound, outer)


class BoundedSession(requests.Session):
    """A requests session whose every answer is read here, within a deadline and a byte budget.

    Arguments:
      timeout: seconds one request may take in all (connecting, waiting and reading).
      max_bytes: the byte budget of an answer when no `request_bounds` block sets one.
    """

    def __init__(self, timeout: float, max_bytes: int = MAX_ANSWER_BYTES):
        super().__init__()
        self.timeout, self.max_bytes = float(timeout), int(max_bytes)
        self.trust_env = False  # the PACS is named by the operator; no proxy from the environment

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        deadline = min(time.monotonic() + self.timeout, getattr(_scope, "deadline", None) or float("inf"))
        budget = getattr(_scope, "max_bytes", None) or self.max_bytes
        what = f"{method} {_short(url)}"  # the URL names the server
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PACSError(f"{what}: no time left of the {self.timeout:g} s a request may take", 504)
        # No redirects: requests would read a redirect's body whole, outside these bounds.
        kwargs.update(stream=True, allow_redirects=False,
                      timeout=(min(CONNECT_TIMEOUT, remaining), min(READ_TIMEOUT, remaining)))
        try:
            response = super().request(method, url, **kwargs)
        except requests.Timeout:
            raise PACSError(f"{what}: no answer within {self.timeout:g} s", 504) from None
        try:
            response._content = _read(response, deadline, budget, what, self.timeout)
        except BaseException:
            response.close()  # the connection is in an unknown state: not back into the pool
            raise
        response._content_consumed = True  # requests' content and iter_content then serve _content
        return response


def _read(response: requests.Response, deadline: float, budget: int, what: str, timeout: float) -> bytes:
    """The (decoded) body of a streamed answer, or PACSError once past ``deadline`` or ``budget``."""
    announced = response.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > budget:
        raise PACSError(f"{what}: the answer announces {int(announced):,} bytes, more than the "
                        f"{budget:,} this request may receive", 502)
    chunks, size = [], 0
    try:
        while True:
            if time.monotonic() > deadline:
                raise PACSError(f"{what}: the answer did not arrive within {timeout:g} s "
                                f"({size:,} bytes by then)", 504)
            data = response.raw.read1(CHUNK, decode_content=True)
            if not data:
                return b"".join(chunks)
            size += len(data)
            if size > budget:
                raise PACSError(f"{what}: the answer holds more than the {budget:,} bytes this request may "
                                "receive", 502)
            chunks.append(data)
    except PACSError:  # an OSError too (as every requests error): not a cut connection
        raise
    except urllib3.exceptions.ReadTimeoutError:
        raise PACSError(f"{what}: the answer stopped arriving ({size:,} bytes by then)", 504) from None
    except (urllib3.exceptions.HTTPError, OSError) as error:  # a cut connection, a length that lied
        raise PACSError(f"{what}: the answer broke off after {size:,} bytes ({type(error).__name__})", 502) from None


def dicom_datasets(answer: Any, what: str) -> list[dict]:
    """``answer`` (a decoded QIDO or metadata answer) if it is a list of DICOM JSON objects,
    else PACSError (502): anything else would fail wherever it is read."""
    if not isinstance(answer, list) or not all(isinstance(item, dict) for item in answer):
        shown = repr(answer)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise PACSError(f"{what}: the answer is not a list of DICOM JSON objects: {shown}", 502)
    return answer


def _short(url: str, limit: int = 160) -> str:
    return url if len(url) <= limit else url[:limit - 3] + "..."


# ---------------------------------------------------------------------------- the proxy route
def bounded_proxy(session_for: Any):
    """A stand-in for MONAI Label's ``proxy_dicom`` (its ``/proxy/dicom`` routes, which viewers
    read studies through): the same paths, each request through ``session_for()`` (a
    `BoundedSession` with the server's credentials) in a worker thread, so a slow PACS holds
    neither the event loop nor memory without bound. POST is refused before (server.py)."""
    from monailabel.config import settings

    def prefix(op: str, path: str) -> str:
        if op == "qido" and path.endswith("metadata"):  # some OHIF versions ask QIDO for metadata
            op = "wado"
        return {"wado": settings.MONAI_LABEL_WADO_PREFIX, "qido": settings.MONAI_LABEL_QIDO_PREFIX,
                "stow": settings.MONAI_LABEL_STOW_PREFIX}.get(op) or ""

    def fetch(url: str) -> Response:
        session = session_for()
        try:
            with request_bounds(max_bytes=MAX_PIXEL_ANSWER_BYTES):
                answer = session.get(url)
        except PACSError as error:
            return Response(content=str(error), status_code=error.status, media_type="text/plain")
        except requests.RequestException as error:
            return Response(content=f"GET {url}: {type(error).__name__}", status_code=502, media_type="text/plain")
        headers = {k: v for k, v in answer.headers.items() if k.lower() in PROXIED_HEADERS}
        return Response(content=answer.content, status_code=answer.status_code, headers=headers)

    async def proxy_dicom(request: Request, op: str, path: str) -> Response:
        server = settings.MONAI_LABEL_STUDIES.rstrip("/")
        proxied = f"{prefix(op, path)}/{path}" if prefix(op, path) else path
        query = f"?{request.url.query}" if request.url.query else ""
        return await asyncio.to_thread(fetch, f"{server}/{proxied}{query}")

    return proxy_dicom
