"""The server's bounds: request bytes, decoded pixels and voxels, JSON options, time.

Every bound is checked before the work it guards: request bytes as they arrive (from the
Content-Length header first), pixels and voxels from the file's header before it is decoded,
JSON options as they are parsed. The byte and time bounds can be set per server (``medadapt
label --max-request-mb/--upload-timeout/--infer-timeout``, passed on in the environment
variables below); the others are fixed here. This module needs no MONAI Label: its checks
raise ValueError, which the server turns into a 400 naming the field.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

# Server-wide bounds, set by `medadapt label` through the environment (see medadapt.monailabel.cli).
MAX_REQUEST_BYTES_ENV = "MEDADAPT_LABEL_MAX_REQUEST_BYTES"
UPLOAD_TIMEOUT_ENV = "MEDADAPT_LABEL_UPLOAD_TIMEOUT"
DICOMWEB_TIMEOUT_ENV = "MEDADAPT_LABEL_DICOMWEB_TIMEOUT"
MAX_REQUEST_BYTES = 512 * 1024 ** 2  # an uncompressed float32 NIfTI of MAX_VOLUME_VOXELS is 256 MiB
UPLOAD_TIMEOUT = 300.0  # s to receive a request's body
STALL_TIMEOUT = 10.0  # s a request body may stop coming (a slow client holds no more than this)
MIN_BODY_RATE = 4 * 1024  # bytes/s a body must average after its first STALL_TIMEOUT seconds
MEMORY_BODY_BYTES = 256 * 1024  # a body up to this size is kept in memory, a larger one spooled to disk
MAX_LARGE_BODIES = 8  # bodies over MEMORY_BODY_BYTES received at once: bounds the disk they take
INFER_TIMEOUT = 600.0  # s for one inference (MONAI Label's own default, MONAI_LABEL_INFER_TIMEOUT)
DICOMWEB_TIMEOUT = 120.0  # s for one request to a DICOMweb server, answer read in full

# Decoded sizes, checked from headers: a BraTS case (240 x 240 x 155 x 4) is 36 M voxels.
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_VOLUME_VOXELS = 2 ** 26  # all channels together: 256 MiB as float32
# A DICOM series' instances (slices): thin-slice CT reaches ~3,000; reading each file costs time
# that no bound on voxels limits (10,000 tiny instances took minutes).
MAX_SERIES_INSTANCES = 4096

# JSON options (infer params, label info, training options).
MAX_JSON_DEPTH = 8
MAX_JSON_ITEMS = 1000  # keys or list items in one object or list
MAX_JSON_INT = 2 ** 53  # beyond it float() loses the value or overflows
MAX_TRAIN_EPOCHS = 1000
MAX_TRAIN_BATCH = 64


def env_number(name: str, default: float) -> float:
    """A positive number from the environment variable ``name``, else ``default``."""
    text = os.environ.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}={text!r} must be a positive number")
    return value


def parse_json_object(text: str | None, field: str) -> dict[str, Any]:
    """The JSON object in a request's form field ``field`` ("" means {}), checked by
    `check_json_value`; ValueError naming the field otherwise."""
    if text is None or text == "":
        return {}

    def refuse_constant(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        value = json.loads(text, parse_constant=refuse_constant)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{field} must be a JSON object: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a JSON object, got {type(value).__name__}")
    check_json_value(value, field)
    return value


def check_json_value(value: Any, where: str, depth: int = 0) -> None:
    """ValueError unless ``value`` is plain JSON within the bounds above: at most
    `MAX_JSON_DEPTH` deep, `MAX_JSON_ITEMS` per container, finite numbers of magnitude at most
    `MAX_JSON_INT` (a number such as 1e400 or 10**400 makes float() overflow downstream)."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        if abs(value) > MAX_JSON_INT or not math.isfinite(value):  # abs() first: 10**400 has no float
            shown = repr(value) if len(repr(value)) <= 30 else repr(value)[:27] + "..."
            raise ValueError(f"{where}: {shown} is not a finite number of magnitude <= 2**53")
        return
    if isinstance(value, (dict, list, tuple)):
        if len(value) > MAX_JSON_ITEMS:
            raise ValueError(f"{where}: more than {MAX_JSON_ITEMS} items")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            check_json_value(item, f"{where}.{key}" if isinstance(value, dict) else f"{where}[{key}]", depth + 1)
        return
    raise ValueError(f"{where}: {type(value).__name__} is not a JSON value")
