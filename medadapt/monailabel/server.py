"""The web app `medadapt label` serves: MONAI Label's own FastAPI app behind a request guard.

Started by MONAI Label as ``--uvicorn_app medadapt.monailabel.server:app`` (the app in
`medadapt.monailabel.main` refuses to start without it). What it adds, where MONAI Label 0.8.5
does the unsafe thing itself:

- `RequestGuard`: every request body is bounded in bytes (413, from the Content-Length header
  before anything is read, else as it arrives), in the time the client takes to send it and
  in how long it may stall (408), and at most `MAX_LARGE_BODIES` bodies over 256 KiB are
  received at once (503 with Retry-After); the body is received on the event loop, then the
  request runs in a worker thread, so MONAI Label's blocking endpoints never hold the loop
  (``/info/`` answers while a model runs). Paths with "." / ".." segments or NUL characters
  are refused (400); so are the upstream routes that act on client-chosen server paths or
  files this app does not have: model-file upload and deletion (405), WSI inference (404), the
  DICOMweb proxy without a DICOMweb datastore (404), and writes through that proxy (POST, 405:
  the proxy is for viewers reading studies; labels reach the PACS as SEGs this server writes).
- sessions (``/session/``, ``?session_id=`` on /infer) are this app's own
  (`medadapt.monailabel.sessions`): server-made ids, files in ``<app>/sessions``, bounded.
- `guard_endpoints`: MONAI Label's infer and datastore endpoints write uploads into the app's
  own ``<app>/uploads`` folder (`UploadFolder`), where the app recognises them, instead of
  ``tmpXXXX`` names in the system temp folder; their JSON form fields (``params``, ``info``) are
  checked (400 naming the field) instead of failing in ``json.loads`` with a 500.
- MONAI Label's own exceptions are answered with their message and a 4xx where they are about
  the input (`monailabel_exception_handler`), never a bare 500; the dataset archive is deleted
  after it is sent, and an empty datastore answers 404 instead of failing an assertion.
- every other temporary file of the server and its training jobs goes to ``<app>/tmp``.
- ``output=dicom_seg`` at inference writes the SEG with `medadapt.monailabel.dicomseg`
  (upstream runs dcmqi's ``itkimage2segimage``, which is not installed).
- the DICOMweb proxy's reads go through a bounded session (`medadapt.monailabel.pacs`) in a
  worker thread: upstream read the PACS's answer whole, without a timeout, on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
from fastapi import HTTPException
from monailabel.app import app as monailabel_app
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.endpoints import datastore as datastore_endpoints
from monailabel.endpoints import infer as infer_endpoints
from monailabel.endpoints import proxy as proxy_endpoints
from monailabel.endpoints import session as session_endpoints
from monailabel.endpoints import train as train_endpoints
from monailabel.interfaces.exception import MONAILabelException
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import remove_file
from starlette.background import BackgroundTask
from starlette.responses import FileResponse

from medadapt.monailabel.errors import (
    InvalidInput,
    http_error,
    monailabel_exception_handler,
)
from medadapt.monailabel.imagefiles import (
    UploadFolder,
    discard_upload,
    use_upload_folder,
)
from medadapt.monailabel.limits import (
    MAX_LARGE_BODIES,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_BYTES_ENV,
    MEMORY_BODY_BYTES,
    MIN_BODY_RATE,
    STALL_TIMEOUT,
    UPLOAD_TIMEOUT,
    UPLOAD_TIMEOUT_ENV,
    env_number,
    parse_json_object,
)
from medadapt.monailabel.pacs import bounded_proxy

logger = logging.getLogger("medadapt.monailabel")

CHECKSUMS = ("SHA256", "SHA512", "MD5")  # what MONAI Label's file_checksum computes
# Worker threads running requests: above the inference queues' TOTAL_PENDING, whose requests
# wait in them, so quick requests always find one.
REQUEST_THREADS = 64
BODY_CHUNK = 1024 ** 2  # bytes per message when a received body is replayed to the app
LARGE_BODY_RETRY = 5  # s, the Retry-After when MAX_LARGE_BODIES are being received
# (method or None for any, path prefix) -> (status, message) for upstream routes refused here.
REFUSED_ROUTES = {
    ("PUT", "/model/"): (405, "model files cannot be uploaded here: models are built from bundles and trained "
                              "adapters (POST /train/{model} trains them)"),
    ("DELETE", "/model/"): (405, "model files cannot be deleted here: models are built from bundles and trained "
                                 "adapters"),
    (None, "/infer/wsi/"): (404, "this server has no whole-slide (WSI) models; use POST /infer/{model}"),
    (None, "/infer/wsi_v2/"): (404, "this server has no whole-slide (WSI) models; use POST /infer/{model}"),
    ("POST", "/proxy/"): (405, "the DICOMweb proxy only reads (GET): store labels with PUT /datastore/label, which "
                               "writes them to the DICOMweb server as DICOM SEG"),
}


class RequestGuard:
    """ASGI middleware bounding each HTTP request and running it off the event loop.

    MONAI Label's endpoints are coroutines that run their (long) work without awaiting: while
    one inference ran, every request, ``/info/`` included, waited for it. Here each request's
    body is first received on the event loop, bounded, into a spooled file (memory up to
    `MEMORY_BODY_BYTES`, then the app's tmp folder), so a slow client costs no thread; then the
    request runs with that body in a worker thread of its own (`REQUEST_THREADS` of them), in
    an event loop of its own, while the server's loop keeps taking other requests.

    Arguments:
      app: the ASGI app to guard.
      max_body_bytes: largest request body accepted (413 above it).
      upload_timeout: seconds the client may take to send a body (408 after it).
      remote_datastore: whether the studies are a DICOMweb server (the /proxy routes need one).
      api_prefix: MONAI Label's MONAI_LABEL_API_STR, the prefix of its routes ("" by default).
      stall_timeout: seconds a body may stop coming before the request is answered with 408.
      threads: worker threads that run requests (more wait for one, on the event loop).
    """

    def __init__(self, app, max_body_bytes: int, upload_timeout: float, remote_datastore: bool = False,
                 api_prefix: str = "", stall_timeout: float = STALL_TIMEOUT, threads: int = REQUEST_THREADS):
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.upload_timeout = float(upload_timeout)
        self.stall_timeout = float(stall_timeout)
        self.remote_datastore = remote_datastore
        self.api_prefix = api_prefix.rstrip("/")
        self.threads = ThreadPoolExecutor(threads, thread_name_prefix="REQUEST")
        self._large_bodies = 0  # bodies over MEMORY_BODY_BYTES being received (event loop only)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope)
        if refusal:
            return await _answer(send, *refusal)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            return await _answer(send, 413, self._too_large(f"{declared:,} bytes"))
        large = (declared or 0) > MEMORY_BODY_BYTES or _header(scope, b"transfer-encoding") is not None
        if large and self._large_bodies >= MAX_LARGE_BODIES:
            return await _answer(send, 503, f"this server receives at most {MAX_LARGE_BODIES} request bodies over "
                                            f"{MEMORY_BODY_BYTES // 1024} KiB at once; try again shortly",
                                 {"Retry-After": str(LARGE_BODY_RETRY)})
        self._large_bodies += large
        try:
            body = await self._received_body(receive, send)
        finally:
            self._large_bodies -= large
        if body is None:
            return  # answered (408, 413) or the client left
        with body:
            await self._run_in_thread(scope, body, receive, send)

    def refusal(self, scope) -> tuple[int, str] | None:
        """(status, message) for a request refused from its method, path and query alone."""
        path, method = scope["path"], scope["method"]
        if "\0" in path or any(part in (".", "..") for part in path.split("/")):
            return 400, f"request path {path[:200]!r} has a '.' or '..' segment or a NUL character"
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        for key, value in query:
            if "\0" in key or "\0" in value:
                return 400, f"query parameter {key[:60]!r} holds a NUL character"
        if self.api_prefix and path.startswith(self.api_prefix + "/"):
            path = path[len(self.api_prefix):]
        for (refused_method, prefix), answer in REFUSED_ROUTES.items():
            if path.startswith(prefix) and refused_method in (None, method):
                return answer
        if path.startswith("/proxy/") and not self.remote_datastore:
            return 404, "no DICOMweb datastore to proxy to: this server's studies are a local folder"
        return None

    async def _received_body(self, receive, send) -> tempfile.SpooledTemporaryFile | None:
        """The whole request body, received within the upload time, never stalling longer than
        the stall time and within the byte limit; None when it was answered instead (408, 413)
        or the client disconnected."""
        body = tempfile.SpooledTemporaryFile(max_size=MEMORY_BODY_BYTES)  # noqa: SIM115 (closed by the caller)
        received, started = 0, time.monotonic()
        try:
            while True:
                elapsed = time.monotonic() - started
                allowed = min(self.upload_timeout, self.stall_timeout + received / MIN_BODY_RATE)
                wait = min(allowed - elapsed, self.stall_timeout)
                try:
                    message = await asyncio.wait_for(receive(), max(wait, 0.001))
                except TimeoutError:
                    await _answer(send, 408, "request body " + self._too_slow(received, allowed, wait))
                    body.close()
                    return None
                if message["type"] != "http.request":
                    body.close()
                    return None  # http.disconnect
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > self.max_body_bytes:
                    await _answer(send, 413, self._too_large(f"more than {self.max_body_bytes:,} bytes"))
                    body.close()
                    return None
                body.write(chunk)
                if not message.get("more_body", False):
                    body.seek(0)
                    return body
        except BaseException:
            body.close()
            raise

    async def _run_in_thread(self, scope, body, receive, send) -> None:
        """Run the app on the request in a worker thread, in an event loop of the thread's own;
        its receive replays ``body`` (then waits for the client's disconnect on the server's
        loop), its send goes out through the server's loop."""
        loop = asyncio.get_running_loop()

        async def on_server_loop(coroutine):
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, loop))

        size, more = _size(body), True

        async def replayed_receive():
            nonlocal more
            if not more:
                return await on_server_loop(receive())
            chunk = body.read(BODY_CHUNK)
            more = body.tell() < size
            return {"type": "http.request", "body": chunk, "more_body": more}

        async def forwarded_send(message):
            await on_server_loop(send(message))

        await loop.run_in_executor(self.threads, asyncio.run, self.app(scope, replayed_receive, forwarded_send))

    def _too_slow(self, received: int, allowed: float, wait: float) -> str:
        if allowed >= self.upload_timeout and wait < self.stall_timeout:
            return f"not received within {self.upload_timeout:g} s"
        if wait >= self.stall_timeout:
            return f"stalled: nothing arrived for {self.stall_timeout:g} s"
        return (f"too slow: {received:,} bytes in {allowed:.0f} s, under this server's minimum of "
                f"{MIN_BODY_RATE // 1024} KiB/s after the first {self.stall_timeout:g} s")

    def _too_large(self, size: str) -> str:
        return (f"request body of {size} exceeds this server's limit of {self.max_body_bytes:,} bytes "
                f"({self.max_body_bytes / 2 ** 20:g} MiB)")


def _size(file) -> int:
    position = file.tell()
    file.seek(0, os.SEEK_END)
    size = file.tell()
    file.seek(position)
    return size


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value
    return None


def _content_length(scope) -> int | None:
    try:
        return int(_header(scope, b"content-length"))
    except (TypeError, ValueError):
        return None


async def _answer(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": message}).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------- MONAI Label's endpoints
def guard_endpoints(uploads: UploadFolder) -> None:
    """Make MONAI Label's infer and datastore endpoints write uploads into ``uploads`` and check
    their JSON form fields. Their route functions look these names up at call time, so
    replacing the module attributes is enough; calling this again changes nothing."""
    for module in (infer_endpoints, datastore_endpoints):
        module.tempfile = _UploadNames(uploads)
    infer_endpoints.run_inference = _checked_inference(_original(infer_endpoints.run_inference))
    for name, field in (("add_image", "params"), ("save_label", "params"),
                        ("update_image_info", "info"), ("update_label_info", "info")):
        function = _original(getattr(datastore_endpoints, name))
        setattr(datastore_endpoints, name, _with_json_field(function, field))
    datastore_endpoints.download_dataset = _removed_after_sending(_original(datastore_endpoints.download_dataset))
    datastore_endpoints.download_image = _checked_checksum(_original(datastore_endpoints.download_image))
    infer_endpoints.nifti_to_dicom_seg = inference_seg
    train_endpoints.run_model = _checked_training(_original(train_endpoints.run_model))
    train_endpoints.run = _checked_training_of_all(_original(train_endpoints.run))
    proxy_endpoints.proxy_dicom = bounded_proxy(_studies_session)
    session_endpoints.create_session = functools.partial(create_session, uploads)
    session_endpoints.get_session = get_session
    session_endpoints.remove_session = remove_session


# ---------------------------------------------------------------------------- sessions
def create_session(uploads: UploadFolder, background_tasks: Any = None, uncompress: bool = False, expiry: int = 0,
                   files: list | None = None) -> dict[str, Any]:
    """``PUT /session/``: a session holding the one image file sent (see `SessionStore.create`)."""
    if uncompress:
        raise HTTPException(400, "uncompress: archives are not unpacked here; send the image file itself (NIfTI, "
                                 "NRRD, PNG or JPG)")
    if not files or len(files) != 1:
        raise HTTPException(400, f"files: send one image file per session, got {len(files or [])}")
    upload = files[0]
    path = uploads.new_file("".join(Path(upload.filename or "").suffixes))
    try:
        with open(path, "wb") as out:
            shutil.copyfileobj(upload.file, out)
        session = app_instance().sessions().create(path, upload.filename or "", expiry)
    except InvalidInput as error:
        discard_upload(path)
        raise http_error(error) from None
    return {"session_id": session.session_id, "session_info": session.to_json()}


def get_session(session_id: str, update_ts: bool = False, image: bool = False):
    """``GET /session/{id}``: the session's record, or with ``image=true`` its image."""
    try:
        session = app_instance().sessions().get(session_id, touch=update_ts)
    except InvalidInput as error:
        raise http_error(error) from None
    if image:
        return FileResponse(session.image, filename=Path(session.image).name)
    return session.to_json()


def remove_session(session_id: str) -> dict[str, Any]:
    """``DELETE /session/{id}``: the session and its files are deleted."""
    try:
        return app_instance().sessions().remove(session_id).to_json()
    except InvalidInput as error:
        raise http_error(error) from None


def _studies_session():
    """A bounded session to the DICOMweb server the studies are on (for the proxy routes)."""
    from medadapt.monailabel.dicomweb import dicomweb_session

    return dicomweb_session(str(settings.MONAI_LABEL_STUDIES).strip().rstrip("/"))


def inference_seg(series_dir: str, label: str, label_info: Any = None, use_itk: bool = True, **_) -> str:
    """Stands in for MONAI Label's ``nifti_to_dicom_seg`` in its infer endpoint
    (``output=dicom_seg``): a SEG file of the label over the series in ``series_dir``, written
    with highdicom. Returns the file (sent to the client, then deleted)."""
    import nibabel as nib

    from medadapt.monailabel.dicomseg import SegGeometryError, write_seg
    from medadapt.monailabel.dicomweb import segment_names

    image = nib.load(label)
    handle, path = tempfile.mkstemp(suffix=".dcm", prefix="medadapt_seg_")
    os.close(handle)
    try:
        write_seg(np.rint(np.asarray(image.dataobj)).astype(np.int64), image.affine, series_dir,
                  segment_names({"label_info": label_info if isinstance(label_info, list) else []}), path)
    except SegGeometryError as error:
        remove_file(path)
        raise HTTPException(422, f"output=dicom_seg: {error}") from None
    return path


class _UploadNames:
    """Stands in for the `tempfile` module in MONAI Label's infer and datastore endpoints, which
    use it only as ``tempfile.NamedTemporaryFile(suffix=...).name`` to name an upload's copy."""

    def __init__(self, uploads: UploadFolder):
        self.uploads = uploads

    def NamedTemporaryFile(self, suffix: str = "", **_) -> types.SimpleNamespace:  # noqa: N802 (tempfile's name)
        return types.SimpleNamespace(name=self.uploads.new_file(suffix))


def _original(function):
    return getattr(function, "__wrapped__", function)


def _with_json_field(function, field: str):
    """``function`` with its form field ``field`` checked to hold a JSON object first."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def checked(*args, **kwargs):
        value = signature.bind(*args, **kwargs).arguments.get(field)
        if isinstance(value, str):
            try:
                parse_json_object(value, field)
            except ValueError as error:
                raise HTTPException(400, str(error)) from None
        return function(*args, **kwargs)

    return checked


def _checked_inference(run_inference):
    """Upstream's run_inference, refusing with 4xx what it would answer with a 500."""
    with_params = _with_json_field(run_inference, "params")
    signature = inspect.signature(run_inference)

    @functools.wraps(run_inference)
    def checked(*args, **kwargs):
        arguments: dict[str, Any] = signature.bind(*args, **kwargs).arguments
        if arguments.get("session_id"):
            try:  # upstream then runs on the session's image, whatever ?image= says
                app_instance().sessions().get(arguments["session_id"])
            except InvalidInput as error:
                raise http_error(error) from None
        elif not arguments.get("file") and not arguments.get("image"):
            raise HTTPException(400, "send an image: ?image=ID (a datastore id), ?session_id=ID (PUT /session/) or a "
                                     "file in form field 'file'")
        if arguments.get("label"):
            raise HTTPException(400, "this server's models take no label input (form field 'label')")
        output = arguments.get("output")
        if getattr(output, "value", output) != "dicom_seg":
            return with_params(*args, **kwargs)
        if not isinstance(app_instance().datastore(), DICOMWebDatastore):
            raise HTTPException(400, "output=dicom_seg needs a DICOMweb datastore; use output=image")
        # Upstream answers 404 without params "label_info"; the model's own label names serve.
        bound = signature.bind(*args, **kwargs)
        try:
            params = parse_json_object(bound.arguments.get("params"), "params")
        except ValueError as error:
            raise HTTPException(400, str(error)) from None
        labels = getattr(app_instance()._infers.get(arguments.get("model")), "labels", None)
        if "label_info" not in params and isinstance(labels, dict):
            params["label_info"] = [{"name": name, "idx": value} for name, value in labels.items()]
        bound.arguments["params"] = json.dumps(params)
        response = with_params(*bound.args, **bound.kwargs)
        if isinstance(response, FileResponse):  # the SEG file, written for this answer only
            # Added to upstream's tasks (they delete the label file): a response's own background
            # would replace them.
            bound.arguments["background_tasks"].add_task(remove_file, response.path)
        return response

    return checked


def _check_training(model: str, params: dict | None) -> None:
    """The checks of a training request, as the job would see it (upstream merges the
    trainer's config and the params), before it is queued: 4xx naming the option."""
    instance = app_instance()
    request = {"model": model, **instance.info().get("config", {}).get("train", {}), **(params or {})}
    try:
        instance.check_training_request(request)
    except MONAILabelException as error:
        raise http_error(error) from None


def _checked_training(run_model):
    """Upstream's training start for one model, its options checked first: a job queued in
    the background would only fail later, out of the client's sight."""

    @functools.wraps(run_model)
    def checked(model: str, params: dict | None = None, run_sync: bool | None = False,
                enqueue: bool | None = False):
        _check_training(model, params)
        return run_model(model, params, run_sync, enqueue)

    return checked


def _checked_training_of_all(run):
    """Upstream's (deprecated) training of every model, each model's request checked first."""

    @functools.wraps(run)
    def checked(params: dict | None = None, run_sync: bool | None = False):
        for model in app_instance().info()["trainers"]:
            own = (params or {}).get(model)
            _check_training(model, {**(params or {}), **(own if isinstance(own, dict) else {})})
        return run(params, run_sync)

    return checked


def _checked_checksum(download_image):
    """Upstream's image download and check, refusing a checksum algorithm it has no hash for
    (400 instead of its ValueError's 500)."""
    signature = inspect.signature(download_image)

    @functools.wraps(download_image)
    def checked(*args, **kwargs):
        check_sum = signature.bind(*args, **kwargs).arguments.get("check_sum")
        if isinstance(check_sum, str) and ":" in check_sum:
            algorithm = check_sum.split(":")[0]
            if algorithm not in CHECKSUMS:
                raise HTTPException(400, f"check_sum: unknown algorithm {algorithm[:20]!r}; use one of {CHECKSUMS}")
        return download_image(*args, **kwargs)

    return checked


def _removed_after_sending(download_dataset):
    """Upstream's dataset download, its ZIP archive (a new temporary file each time) deleted
    once sent, and 404 when nothing is labelled (upstream fails an assertion: a 500)."""

    @functools.wraps(download_dataset)
    def removed(*args, **kwargs):
        if not app_instance().datastore().datalist():
            raise HTTPException(404, "no labelled studies to put into a dataset archive")
        response = download_dataset(*args, **kwargs)
        response.background = BackgroundTask(remove_file, response.path)
        return response

    return removed


# ---------------------------------------------------------------------------- the app
def app_folders(app_dir: str | Path) -> tuple[UploadFolder, Path]:
    """The app's uploads folder and temporary folder, inside ``app_dir``."""
    temporary = Path(app_dir).resolve() / "tmp"
    temporary.mkdir(parents=True, exist_ok=True)
    return UploadFolder(Path(app_dir) / "uploads"), temporary


def build_app():
    """MONAI Label's app, guarded; its process's temporary files go to the app's folder."""
    uploads, temporary = app_folders(settings.MONAI_LABEL_APP_DIR)
    # Starlette's spooled uploads, the label files the tasks write, training subprocesses: all here.
    tempfile.tempdir = str(temporary)
    os.environ["TMPDIR"] = str(temporary)
    use_upload_folder(uploads)
    guard_endpoints(uploads)
    monailabel_app.add_exception_handler(MONAILabelException, monailabel_exception_handler)
    guard = RequestGuard(monailabel_app, env_number(MAX_REQUEST_BYTES_ENV, MAX_REQUEST_BYTES),
                         env_number(UPLOAD_TIMEOUT_ENV, UPLOAD_TIMEOUT),
                         remote_datastore=str(settings.MONAI_LABEL_STUDIES).startswith(("http://", "https://")),
                         api_prefix=settings.MONAI_LABEL_API_STR)
    logger.info("request guard: bodies up to %d bytes, sent within %g s; uploads in %s, temporary files in %s",
                guard.max_body_bytes, guard.upload_timeout, uploads.folder, temporary)
    return guard


app = build_app()
