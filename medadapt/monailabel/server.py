"""The web app `medadapt label` serves: MONAI Label's own FastAPI app behind a request guard.

Started by MONAI Label as ``--uvicorn_app medadapt.monailabel.server:app`` (the app in
`medadapt.monailabel.main` refuses to start without it). What it adds, where MONAI Label 0.8.5
does the unsafe thing itself:

- `RequestGuard`: every request body is bounded in bytes (413, from the Content-Length header
  before anything is read, else as it arrives) and in the time the client takes to send it
  (408); paths with "." / ".." segments or NUL characters are refused (400); so are the
  upstream routes that act on client-chosen server paths or files this app does not have:
  model-file upload and deletion (405), WSI inference (404),
  the DICOMweb proxy without a DICOMweb datastore (404), and writes through that proxy (POST,
  405: the proxy is for viewers reading studies; labels reach the PACS as SEGs this server
  writes).
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
    MAX_REQUEST_BYTES,
    MAX_REQUEST_BYTES_ENV,
    UPLOAD_TIMEOUT,
    UPLOAD_TIMEOUT_ENV,
    env_number,
    parse_json_object,
)
from medadapt.monailabel.pacs import bounded_proxy

logger = logging.getLogger("medadapt.monailabel")

CHECKSUMS = ("SHA256", "SHA512", "MD5")  # what MONAI Label's file_checksum computes
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
    """ASGI middleware bounding each HTTP request before MONAI Label's endpoints see it.

    Arguments:
      app: the ASGI app to guard.
      max_body_bytes: largest request body accepted (413 above it).
      upload_timeout: seconds the client may take to send a body, counted while the server
        waits for it (408 after it).
      remote_datastore: whether the studies are a DICOMweb server (the /proxy routes need one).
      api_prefix: MONAI Label's MONAI_LABEL_API_STR, the prefix of its routes ("" by default).
    """

    def __init__(self, app, max_body_bytes: int, upload_timeout: float, remote_datastore: bool = False,
                 api_prefix: str = ""):
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.upload_timeout = float(upload_timeout)
        self.remote_datastore = remote_datastore
        self.api_prefix = api_prefix.rstrip("/")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope)
        if refusal:
            return await _answer(send, *refusal)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            return await _answer(send, 413, self._too_large(f"{declared:,} bytes"))
        return await self.app(scope, self._bounded_receive(receive), send)

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

    def _bounded_receive(self, receive):
        received, waited = 0, 0.0
        body_done = False

        async def bounded_receive():
            nonlocal received, waited, body_done
            if body_done:  # after the body, only a disconnect can come: not bounded
                return await receive()
            started = time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(self.upload_timeout - waited, 0.001))
            except TimeoutError:
                raise HTTPException(408, f"request body not received within {self.upload_timeout:g} s") from None
            waited += time.monotonic() - started
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, self._too_large(f"more than {self.max_body_bytes:,} bytes"))
                body_done = not message.get("more_body", False)
            return message

        return bounded_receive

    def _too_large(self, size: str) -> str:
        return (f"request body of {size} exceeds this server's limit of {self.max_body_bytes:,} bytes "
                f"({self.max_body_bytes / 2 ** 20:g} MiB)")


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _answer(send, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
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
