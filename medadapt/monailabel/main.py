"""The MONAI Label app: medadapt models served for annotation and fine-tuned on the labels.

Started by ``medadapt label --studies DIR`` (see `medadapt.monailabel.cli`), or directly::

    monailabel start_server --app medadapt/monailabel --studies DIR \\
        --conf bundles bundles --conf runs runs [--conf config models.json]

App options (``--conf KEY VALUE``, else the environment variable in brackets):
``bundles`` [MEDADAPT_LABEL_BUNDLES] bundle folder (default ``bundles``), ``runs``
[MEDADAPT_LABEL_RUNS] where trained adapters live (default ``runs``), ``config``
[MEDADAPT_LABEL_CONFIG] a JSON model config replacing the default model list (see
`medadapt.monailabel.specs`).

MONAI Label loads this file as a module named ``main``, not as part of the package, so
imports here are absolute.
"""

from __future__ import annotations

import logging
import os
from typing import Any

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

import medadapt
from medadapt.monailabel.datastore import CheckedDatastore
from medadapt.monailabel.errors import InvalidInput, http_error
from medadapt.monailabel.imagefiles import DATASTORE_PATTERNS, discard_upload, is_upload
from medadapt.monailabel.infer_tasks import make_infer_task
from medadapt.monailabel.specs import ModelSpec, load_specs
from medadapt.monailabel.train_task import AdapterTrainTask

logger = logging.getLogger("medadapt.monailabel")

UPLOAD_MAX_AGE = 60.0  # s: MONAI Label writes an upload to a temporary file just before infer()
# App option -> (environment variable, default).
OPTIONS = {
    "bundles": ("MEDADAPT_LABEL_BUNDLES", "bundles"),
    "runs": ("MEDADAPT_LABEL_RUNS", "runs"),
    "config": ("MEDADAPT_LABEL_CONFIG", ""),
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
        self.specs: list[ModelSpec] = load_specs(
            app_option(conf, "config") or None, app_option(conf, "bundles"), app_option(conf, "runs"))
        for spec in self.specs:
            logger.info("serving %s (%s, from %s)", spec.name, spec.task, spec.source)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="medadapt",
            description="Adapted foundation models (DKA, LKA, CLAdapter, ...) for 2D and 3D medical images",
            version=medadapt.__version__,
        )

    # ------------------------------------------------------------------ MONAI Label hooks
    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()  # DICOMweb / remote stores: upstream as is
        return CheckedDatastore(
            self.studies,
            extensions=DATASTORE_PATTERNS,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {spec.name: make_infer_task(spec) for spec in self.specs}

    def init_trainers(self) -> dict[str, TrainTask]:
        # Trainers share their model's name, so a client retrains the model it shows.
        return {spec.name: AdapterTrainTask(spec) for spec in self.specs if spec.trainable}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    # ------------------------------------------------------------------ request checks
    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """Upstream's infer, with unknown models / images and bad input answered by 4xx."""
        uploads = [request[k] for k in ("image", "label")
                   if isinstance(request.get(k), str) and is_upload(request[k], UPLOAD_MAX_AGE)]
        try:
            self._check_request(request, datastore, uploads)
            return super().infer(request, datastore)
        except Exception as error:  # re-raised: only the uploads are cleaned up here
            # MONAI Label deletes uploads in background tasks that only run after a success.
            for path in uploads:
                discard_upload(path)
            if isinstance(error, MONAILabelException):
                raise http_error(error) from error
            raise

    def _check_request(self, request: dict[str, Any], datastore: Datastore | None, uploads: list[str]) -> None:
        model = request.get("model")
        if model not in self._infers:
            raise InvalidInput(f"unknown model {model!r}; this server has {sorted(self._infers)}", 404)
        image = request.get("image")
        # Uploads arrive as fresh temporary files; any other path is taken as an image id, so
        # a client cannot make the server read files of its own choosing.
        if isinstance(image, str) and image not in uploads and not request.get("session"):
            store = datastore or self.datastore()
            if not store.get_image_uri(image):
                raise InvalidInput(f"unknown image {image!r}: not in the datastore "
                                   "(GET /datastore/?output=all lists the image ids)", 404)

    def train(self, request: dict[str, Any]) -> dict[str, Any]:
        model = request.get("model")
        if model not in self._trainers:
            message = f"no training task {model!r}; this server trains {sorted(self._trainers)}"
            raise http_error(InvalidInput(message, 404))
        try:
            return super().train(request)
        except MONAILabelException as error:
            raise http_error(error) from error

    def bundle_path(self, model: str | None) -> str | None:
        # Called by MONAI Label before it queues a training job in a subprocess: the one place
        # where an unknown model can still be refused with a 4xx instead of a failed job.
        if model and model not in self._trainers and model not in self._infers:
            raise HTTPException(404, f"unknown model {model!r}; this server trains {sorted(self._trainers)}")
        return None
