"""The MONAI Label app: medadapt models served for annotation and fine-tuned on the labels.

Started by ``medadapt label --studies DIR`` (see `medadapt.monailabel.cli`), or directly::

    monailabel start_server --app APP_DIR --studies DIR --uvicorn_app medadapt.monailabel.server:app \\
        --conf bundles bundles --conf runs runs [--conf config models.json]

``--uvicorn_app medadapt.monailabel.server:app`` is required: it puts the request guard (size
and time bounds, uploads into the app's own folder) in front of MONAI Label's endpoints, and
the app refuses to start without it.

App options (``--conf KEY VALUE``, else the environment variable in brackets):
``bundles`` [MEDADAPT_LABEL_BUNDLES] bundle folder (default ``bundles``), ``runs``
[MEDADAPT_LABEL_RUNS] where trained adapters live (default ``runs``), ``config``
[MEDADAPT_LABEL_CONFIG] a JSON model config replacing the default model list (see
`medadapt.monailabel.specs`), ``serve_untrained`` [MEDADAPT_LABEL_SERVE_UNTRAINED] "true" to
serve bundle models that have no trained adapters yet (default: they are listed under
``not_served`` in ``/info/`` and answer 409 until trained).

MONAI Label loads this file as a module named ``main``, not as part of the package, so
imports here are absolute.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import handle_torch_linalg_multithread, remove_file

import medadapt
from medadapt.monailabel.datastore import CheckedDatastore
from medadapt.monailabel.dicomweb import CheckedDICOMwebDatastore
from medadapt.monailabel.errors import InvalidInput, http_error
from medadapt.monailabel.formats import stored_image
from medadapt.monailabel.imagefiles import (
    DATASTORE_PATTERNS,
    ImageFileError,
    discard_upload,
    file_kind,
    inspect_image_file,
    is_upload,
)
from medadapt.monailabel.infer_tasks import make_infer_task
from medadapt.monailabel.limits import check_json_value
from medadapt.monailabel.paths import plain_name
from medadapt.monailabel.queues import InferenceQueues
from medadapt.monailabel.sessions import SessionStore
from medadapt.monailabel.specs import ServedModel, load_models
from medadapt.monailabel.train_task import AdapterTrainTask

logger = logging.getLogger("medadapt.monailabel")

GUARD_MODULE = "medadapt.monailabel.server"  # the uvicorn app that must front this app
# Infer request keys MONAI Label or this app interprets; each model adds the keys of its own
# config() (the box model's "box"). Other keys a client sends are dropped before any task runs.
# 3D Slicer and OHIF send the result_* keys (the label file's format), client_id and label_info
# (the segments the user has: names a DICOM SEG's segments).
INFER_KEYS = ("model", "image", "device", "timeout", "save_label", "label_tag", "result_extension", "result_dtype",
              "result_compress", "client_id", "label_info")
DEVICE = re.compile(r"cpu|cuda(:\d{1,2})?")
# App option -> (environment variable, default).
OPTIONS = {
    "bundles": ("MEDADAPT_LABEL_BUNDLES", "bundles"),
    "runs": ("MEDADAPT_LABEL_RUNS", "runs"),
    "config": ("MEDADAPT_LABEL_CONFIG", ""),
    "serve_untrained": ("MEDADAPT_LABEL_SERVE_UNTRAINED", ""),
}


def app_option(conf: dict[str, str], key: str) -> str:
    """An app option from MONAI Label's ``--conf``, else its environment variable, else the default."""
    env, default = OPTIONS[key]
    return str(conf.get(key) or os.environ.get(env) or default)


class MedAdaptApp(MONAILabelApp):
    """Infer tasks for every served model, training tasks for the segmentation ones.

    Arguments (from MONAI Label): app_dir, studies, conf (see the module docstring).
    """

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        conf = dict(conf or {})
        self.models: list[ServedModel] = load_models(
            app_option(conf, "config") or None, app_option(conf, "bundles"), app_option(conf, "runs"))
        self._models = {model.name: model for model in self.models}
        serve_untrained = app_option(conf, "serve_untrained").lower() in ("1", "true", "yes")
        for model in self.models:
            model.serve_untrained = serve_untrained
            refusal = model.refusal()
            if refusal:
                logger.warning("not serving %s (%s, from %s) yet: %s", model.name, model.task, model.source, refusal)
            else:
                logger.info("serving %s (%s, from %s)", model.name, model.task, model.source)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="medadapt",
            description="Adapted foundation models (DKA, LKA, CLAdapter, ...) for 2D and 3D medical images",
            version=medadapt.__version__,
        )
        # MONAI Label bounds an inference's time (MONAI_LABEL_INFER_TIMEOUT) only in its optional
        # thread pool, and forgets a late result there: the label file it wrote stays. Inference
        # runs in these queues instead (a worker per model, bounded), so a late result is cleaned
        # up and one model's long inference holds no other.
        self._infers_threadpool = None
        self._queues = InferenceQueues()
        self._training = threading.Lock()
        # Series a request needs from a DICOMweb server are fetched here, within the request's
        # inference time (a fetch that outlasts it goes on, and is kept for the next request).
        self._fetch_worker = ThreadPoolExecutor(max_workers=2, thread_name_prefix="FETCH")

    # ------------------------------------------------------------------ MONAI Label hooks
    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            # Not upstream's: it downloads dcmqi from GitHub at start and lists only CT series.
            return CheckedDICOMwebDatastore.from_settings(self.studies.strip().rstrip("/"), self.app_dir)
        return CheckedDatastore(
            self.studies,
            extensions=DATASTORE_PATTERNS,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {model.name: make_infer_task(model) for model in self.models}

    def init_trainers(self) -> dict[str, TrainTask]:
        # Trainers share their model's name, so a client retrains the model it shows.
        return {model.name: AdapterTrainTask(model) for model in self.models if model.trainable}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def _load_sessions(self, load: bool = False) -> SessionStore:
        # Not MONAI Label's sessions (kept in ~/.cache, folders built from client-sent ids,
        # client archives unpacked): this app's, in its own folder (`medadapt.monailabel.sessions`).
        return SessionStore(Path(self.app_dir) / "sessions")

    def info(self) -> dict[str, Any]:
        info = super().info()  # lists the models whose task is valid: those served now
        info["not_served"] = {model.name: reason for model in self.models if (reason := model.refusal())}
        return info

    def on_init_complete(self) -> None:
        if GUARD_MODULE not in sys.modules:
            raise RuntimeError(f"the medadapt MONAI Label app must be served through its request guard: start it "
                               f"with `medadapt label` or pass --uvicorn_app {GUARD_MODULE}:app to monailabel")
        super().on_init_complete()

    # ------------------------------------------------------------------ request checks
    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """Upstream's infer on a checked request (see `_checked_infer_request`); bad input is
        answered by 4xx, an inference over its time bound by 504."""
        uploads = [request["image"]] if is_upload(request.get("image")) else []
        started = time.monotonic()
        try:
            if uploads:  # an NRRD (3D Slicer's local volume) runs as NIfTI
                request = {**request, "image": stored_image(uploads[0], "the uploaded file")}
                uploads = list(dict.fromkeys([*uploads, request["image"]]))
            store = datastore or self.datastore()
            checked, image_id = self._checked_infer_request(request, store, started)
            result = self._infer_in_time(checked, store, started + checked["timeout"])
            if checked.get("save_label") and image_id and result.get("file"):
                # Upstream saves only when it is given an id; it is given the checked path.
                tag = checked.get("label_tag") or "original"
                result["label"] = store.save_label(image_id, result["file"], tag,
                                                   {"model": checked["model"], "params": result.get("params")})
                result["tag"] = tag
            for path in uploads[1:]:  # a converted copy (upstream deletes the upload itself)
                discard_upload(path)
            return result
        except Exception as error:  # re-raised: only the uploads are cleaned up here
            # MONAI Label deletes uploads in background tasks that only run after a success.
            for path in uploads:
                discard_upload(path)
            if isinstance(error, ImageFileError):
                raise http_error(InvalidInput(str(error), error.status)) from None
            if isinstance(error, MONAILabelException):
                raise http_error(error) from error
            raise

    def _checked_infer_request(self, request: dict[str, Any], store: Datastore,
                               started: float) -> tuple[dict[str, Any], str | None]:
        """The request a task may see, and the image's datastore id (None for an upload).

        Every path in it is one the server chose: "image" becomes the file of a datastore id
        inside the studies folder, or one of the app's own uploads; anything else a client put
        there (a path in params) is refused, whatever other keys say (``"session": true`` once
        skipped the check). Only `INFER_KEYS` and the model's config keys are kept, each checked.
        """
        model = request.get("model")
        if model not in self._infers:
            raise InvalidInput(f"unknown model {model!r}; this server has {sorted(self._infers)}", 404)
        refusal = self._models[model].refusal()
        if refusal:
            raise InvalidInput(refusal, 409)
        allowed = set(INFER_KEYS) | set(self._infers[model].config())
        dropped = sorted(str(k) for k in request if k not in allowed)
        if dropped:
            logger.info("infer %s: ignoring request keys %s", model, dropped)
        checked = {k: v for k, v in request.items() if k in allowed}
        _check_json(checked, "infer params")
        checked["timeout"] = self._infer_timeout(checked)
        fetch = functools.partial(self._fetched_in_time, store, started + checked["timeout"], checked["timeout"])

        image = checked.get("image")
        image_id = None
        if is_upload(image):
            path, name = image, "the uploaded file"
        elif self.sessions().owns(image):
            path, name = image, f"the image of session {Path(image).parent.name}"
        elif isinstance(image, str) and image:
            path = fetch(store.get_image_uri, image)
            if not path:
                shown = image if len(image) <= 200 else image[:197] + "..."
                raise InvalidInput(f"unknown image {shown!r}: not in the datastore (image ids are names, not "
                                   "paths; GET /datastore/?output=all lists them)", 404)
            image_id, name = image, f"image {image!r} ({os.path.basename(path)})"
        else:
            raise InvalidInput(f"model {model!r} needs an image: a datastore id (?image=ID) or an uploaded file", 400)
        sequences = self._models[model].sequences
        if sequences and image_id is not None and isinstance(store, CheckedDICOMwebDatastore):
            # A multi-sequence model on a DICOMweb study: the study's series as channels.
            path = fetch(store.sequence_volume, image_id, sequences)
        checked["image"] = path
        _check_device(checked.get("device"))
        client = checked.get("client_id")
        if client is not None and (not isinstance(client, str) or len(client) > 256):
            raise InvalidInput(f"client_id must be a name of at most 256 characters, got {str(client)[:60]!r}", 400)
        if not isinstance(checked.get("save_label", False), bool):
            raise InvalidInput(f"save_label must be true or false, got {checked['save_label']!r}", 400)
        if checked.get("save_label"):
            if image_id is None:
                raise InvalidInput("save_label needs a datastore image, not an uploaded file", 400)
            checked["label_tag"] = plain_name(checked.get("label_tag") or "original", "label tag")
        _check_values(path, name)
        return checked, image_id

    def _fetched_in_time(self, store: Datastore, deadline: float, limit: float, fetch, *args) -> Any:
        """``fetch(*args)`` (an image path from ``store``); from a DICOMweb datastore, which may
        first download the series, in the fetch worker and answered with 504 once ``deadline``
        has passed: the series' download counts against the request's inference time."""
        if not isinstance(store, CheckedDICOMwebDatastore):
            return fetch(*args)
        future = self._fetch_worker.submit(fetch, *args)
        try:
            return future.result(max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            raise InvalidInput(f"the series did not arrive from the DICOMweb server {store.name()} within the "
                               f"{limit:g} s this inference may take; the download goes on (within the server's "
                               "--dicomweb-timeout) and is kept for the next request", 504) from None

    def _infer_in_time(self, request: dict[str, Any], store: Datastore, deadline: float) -> dict[str, Any]:
        """Upstream's infer of a checked request in the inference worker; 504 at ``deadline``
        (the late inference still finishes, and its label file is then deleted)."""
        def run() -> dict[str, Any]:
            handle_torch_linalg_multithread(request)
            return MONAILabelApp.infer(self, request, store)

        future = self._queues.submit(request["model"], run)
        try:
            return future.result(max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            future.add_done_callback(_discard_late_result)
            raise HTTPException(504, f"model {request['model']!r} did not finish within {request['timeout']:g} s; "
                                     "the server's limit is MONAI_LABEL_INFER_TIMEOUT "
                                     f"({settings.MONAI_LABEL_INFER_TIMEOUT} s)") from None

    def _infer_timeout(self, request: dict[str, Any]) -> float:
        """The request's "timeout" (a client may shorten, never lengthen, the server's)."""
        limit = float(settings.MONAI_LABEL_INFER_TIMEOUT)
        timeout = request.get("timeout", limit)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (0 < timeout <= limit):
            raise InvalidInput(f"timeout must be a number of seconds in (0, {limit:g}], got {timeout!r}", 400)
        return float(timeout)

    def batch_infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """Upstream's batch inference (each image through `infer`), its request checked first."""
        if request.get("model") not in self._infers:
            raise http_error(InvalidInput(f"unknown model {request.get('model')!r}; this server has "
                                          f"{sorted(self._infers)}", 404))
        try:
            _check_json(request, "batch params")
            _check_device(request.get("device"))
        except InvalidInput as error:
            raise http_error(error) from None
        if not torch.cuda.is_available():
            request = {**request, "multi_gpu": False}  # upstream divides by the GPU count (0 here)
        return super().batch_infer(request, datastore)

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        strategy = request.get("strategy")
        if strategy not in self._strategies:  # upstream: a 500
            raise http_error(InvalidInput(f"unknown strategy {strategy!r}; this server has "
                                          f"{sorted(self._strategies)}", 404))
        return super().next_sample(request)

    def infer_wsi(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        # Upstream's WSI path opens any server path it is given; this app serves no WSI models.
        raise http_error(InvalidInput("this server has no whole-slide (WSI) models; use POST /infer/{model}", 404))

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        # In the server this is a run_sync request, holding a request thread: one at a time.
        # (Background jobs run in a process of their own, one at a time by MONAI Label.)
        if not self._training.acquire(blocking=False):
            raise HTTPException(429, "a training requested with run_sync=true is running; wait for it, or start "
                                     "this one in the background (run_sync=false)", headers={"Retry-After": "60"})
        try:
            self.check_training_request(request)
            return super().train(request)
        except MONAILabelException as error:
            raise http_error(error) from error
        finally:
            self._training.release()

    def check_training_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """The typed options of a training request, or InvalidInput (4xx) naming what is wrong.
        Run before a job is queued (`server.guard_endpoints`) and again in the job itself."""
        model = request.get("model")
        if model not in self._trainers:
            raise InvalidInput(f"unknown model {model!r} for training; this server trains {sorted(self._trainers)}", 404)
        _check_json(request, "training options")
        _check_device(request.get("device"))
        return self._trainers[model].options(request)

    def bundle_path(self, model: str | None) -> str | None:
        # Called by MONAI Label before it queues a training job in a subprocess: the one place
        # where an unknown model can still be refused with a 4xx instead of a failed job.
        if model and model not in self._trainers and model not in self._infers:
            raise HTTPException(404, f"unknown model {model!r}; this server trains {sorted(self._trainers)}")
        return None


def _discard_late_result(future) -> None:
    if not future.cancelled() and future.exception() is None:
        remove_file((future.result() or {}).get("file"))


def _check_json(value: dict[str, Any], where: str) -> None:
    try:
        check_json_value(value, where)
    except ValueError as error:
        raise InvalidInput(str(error), 400) from None


def _check_device(device: Any) -> None:
    """A device the server has ("cpu", "cuda", "cuda:N"); upstream falls back to the CPU for
    "cuda" without a GPU but fails with a 500 on any other name."""
    if device is None:
        return
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise InvalidInput(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}", 400)
    index = int(device.partition(":")[2] or 0)
    if device.startswith("cuda") and torch.cuda.is_available() and index >= torch.cuda.device_count():
        raise InvalidInput(f"device {device!r}: this server has {torch.cuda.device_count()} GPU(s)", 400)


def _check_values(path: str, name: str) -> None:
    """422 for a volume with NaN or infinite voxels (a model turns them into an all-background
    label). Images are PNG/JPG, integers only. Decoded once per file version."""
    try:
        if file_kind(path) != "3d":
            return
        stat = os.stat(path)
    except (ImageFileError, OSError):
        return  # not a volume, or gone: the model's own input check says what it runs on
    try:
        _decoded_volume_ok(path, name, stat.st_size, stat.st_mtime_ns)
    except ImageFileError as error:
        raise InvalidInput(str(error), error.status) from None


@functools.lru_cache(maxsize=128)
def _decoded_volume_ok(path: str, name: str, size: int, mtime_ns: int) -> bool:
    # Only successes are cached, keyed by the file's size and time: a changed file is read again.
    inspect_image_file(path, read_data=True, name=name)
    return True
