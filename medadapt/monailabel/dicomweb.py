"""A DICOMweb datastore: studies on a PACS (QIDO-RS / WADO-RS / STOW-RS), labels back as DICOM SEG.

``medadapt label --studies http://HOST:PORT/dicom-web`` serves the series a DICOMweb server
lists. It builds on MONAI Label's `DICOMWebDatastore` (images are series, identified by their
Series Instance UID; a series is downloaded once and converted to NIfTI by SimpleITK, whose
affine is the series' geometry in RAS), and changes what upstream cannot do here or does unsafely:

- no dcmqi: upstream downloads dcmqi's ``itkimage2segimage`` from GitHub when the app starts
  (impossible offline) to write SEGs; here `medadapt.monailabel.dicomseg` writes them with
  highdicom, placing every pixel through the source instances' geometry;
- images are the series of every image modality the server lists, or those matching
  ``medadapt label --dicomweb-filter`` (upstream lists only Modality "CT"); SEG, SR and other
  non-image series are left out;
- every id a request names must be a DICOM UID the server lists (anything else: unknown, 404);
  every cache path is built from checked UIDs and plain tag names and confined to the cache
  folder, which lies inside the app folder (``<app>/dicomweb/<hash of the URL>``) unless
  MONAI_LABEL_DICOMWEB_CACHE_PATH names another; downloaded files are named by their position,
  never by a UID the server sent;
- a series larger than the server's voxel or instance limits is refused before it is
  downloaded (from QIDO's instance list), and its download may hold no more bytes than that list
  announces; every DICOMweb request has a total deadline and a byte budget, checked as the answer
  streams in (`medadapt.monailabel.pacs`); a download that fails leaves nothing in the cache;
- an answer the server gets wrong (too slow: 504; too large, cut off, HTML or a bogus multipart
  answer instead of DICOM, JSON that is not a list of objects: 502) is answered naming the server;
  a failed listing keeps the last good one (or none) for /info/ and the datastore lists, so the
  server keeps serving what it can;
- a series whose geometry cannot be trusted (an instance without Image Position / Orientation
  (Patient) or Pixel Spacing, slices at irregular or repeated positions, tilted or mixed
  orientations) is refused (422 naming the series and the problem) before any model sees it,
  instead of being read with a guessed spacing;
- a label (``PUT /datastore/label``, or ``save_label`` at inference) must lie on the series'
  grid; a "final" label is stored on the DICOMweb server as a SEG series referencing the source
  series (STOW-RS), and kept in the cache for training; SEGs already on the server (from this
  server or another tool) are read back for training;
- images cannot be uploaded to or deleted from this datastore (405): they live on the PACS.

Multi-sequence models (BraTS: t1, t1ce, t2, flair) get the study's four series, found by
their Series Description (`SEQUENCE_NAMES`), as one 4-channel volume on the grid of the series
the request names (`sequence_volume`); a series on another grid is resampled onto it, and the
log says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import requests
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from medadapt.io import atomic_path
from medadapt.monailabel.cli import SEARCH_FILTER_ENV
from medadapt.monailabel.datastore import ConfinedFiles
from medadapt.monailabel.dicomseg import (
    SegGeometryError,
    read_seg,
    series_geometry_problem,
    write_seg,
)
from medadapt.monailabel.errors import InvalidInput, http_error
from medadapt.monailabel.formats import stored_label
from medadapt.monailabel.imagefiles import (
    ImageFileError,
    discard_upload,
    inspect_image_file,
)
from medadapt.monailabel.limits import (
    DICOMWEB_TIMEOUT,
    DICOMWEB_TIMEOUT_ENV,
    MAX_SERIES_INSTANCES,
    MAX_VOLUME_VOXELS,
    env_number,
    parse_json_object,
)
from medadapt.monailabel.pacs import (
    MAX_PIXEL_ANSWER_BYTES,
    BoundedSession,
    PACSError,
    dicom_datasets,
    request_bounds,
)
from medadapt.monailabel.paths import confined, plain_name

logger = logging.getLogger("medadapt.monailabel")

UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # DICOM UIDs: digits and dots, at most 64 characters
# Series of these modalities hold no image to segment.
NON_IMAGE_MODALITIES = {"SEG", "SR", "PR", "KO", "REG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "DOC", "FID",
                        "ECG", "AU", "PLAN"}
LIST_TTL = 30.0  # s: how long a QIDO listing of the server's series is reused
AFFINE_TOLERANCE = 1e-3  # mm: a label's affine must match its series' within this
# What a series' download may hold beyond the pixel bytes its instance listing announces:
# each instance's header (CT ~5 KB, MR with private tags ~30 KB) and the multipart framing.
INSTANCE_HEADER_BYTES = 64 * 1024
# Series Description (lower case, without spaces, '-', '_' and '.') -> the sequence it holds.
SEQUENCE_NAMES = {
    "t1": ("t1", "t1w", "t1n", "t1native", "t1pre", "t1precontrast"),
    "t1ce": ("t1ce", "t1c", "t1gd", "t1wce", "t1post", "t1postcontrast", "t1contrast", "t1gad"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "t2flair", "t2f", "t2wflair"),
}


def is_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and UID.fullmatch(value) is not None


def normalised_description(text: str) -> str:
    return re.sub(r"[\s_.\-]+", "", str(text)).lower()


def sequence_of(description: str) -> str | None:
    """The sequence (t1, t1ce, t2, flair) a Series Description names, or None."""
    name = normalised_description(description)
    for sequence, names in SEQUENCE_NAMES.items():
        if name in names:
            return sequence
    return None


def dicomweb_session(url: str) -> BoundedSession:
    """A session to the DICOMweb server at ``url`` with the server's credentials (MONAI
    Label's settings), every request bounded (`BoundedSession`, `DICOMWEB_TIMEOUT_ENV`)."""
    session = BoundedSession(env_number(DICOMWEB_TIMEOUT_ENV, DICOMWEB_TIMEOUT))
    user = settings.MONAI_LABEL_DICOMWEB_USERNAME or settings.MONAI_LABEL_DATASTORE_USERNAME
    password = settings.MONAI_LABEL_DICOMWEB_PASSWORD or settings.MONAI_LABEL_DATASTORE_PASSWORD
    if user and password:
        session.auth = (user, password)
    return session


class CheckedDICOMwebClient(DICOMwebClientX):
    """MONAI Label's DICOMweb client, refusing a multipart answer without the boundary it
    announces: dicomweb-client would read the whole answer as one part, and pydicom a file
    out of its first part, silently dropping the rest of the series."""

    def _decode_multipart_message(self, response: requests.Response, stream: bool) -> Iterator[bytes]:
        parameters = [p.strip() for p in response.headers.get("content-type", "").split(";")[1:]]
        boundary = next((p.partition("=")[2].strip('"') for p in parameters if p.lower().startswith("boundary=")), "")
        if boundary and b"--" + boundary.encode() not in response.content:
            raise ValueError(f"the multipart answer does not hold the boundary {boundary[:70]!r} it announces")
        return super()._decode_multipart_message(response, stream)


def dicomweb_client(url: str) -> CheckedDICOMwebClient:
    """MONAI Label's DICOMweb client for ``url`` with its settings (QIDO/WADO/STOW prefixes),
    through `dicomweb_session`, making each request once: dicomweb-client retries any failure
    up to 5 times with growing waits, so a request over its deadline would take five."""
    client = CheckedDICOMwebClient(url=url, session=dicomweb_session(url),
                                   qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                   wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                   stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
    client.set_http_retry_params(retry=False)
    return client


def _value(item: dict, tag: str, default: Any = "") -> Any:
    """A value of a DICOM JSON item (QIDO answer); ``default`` where it is absent or malformed."""
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    if not isinstance(values, list) or not values:
        return default
    value = values[0]
    return value.get("Alphabetic", default) if isinstance(value, dict) else value


def _reason(error: requests.RequestException) -> str:
    """A short account of a failed request: an HTTP status, a refused connection, JSON that is not."""
    response = getattr(error, "response", None)
    if response is not None and response.status_code >= 400:
        return f"HTTP {response.status_code} {response.reason or ''}".strip()
    if isinstance(error, requests.JSONDecodeError):
        return "its answer is not JSON"
    if isinstance(error, requests.ConnectionError):
        return "cannot connect"
    return f"{type(error).__name__}: {str(error)[:200]}"


def _count(item: dict, tag: str, default: int) -> int:
    """A whole-number value of a QIDO item (Rows, Columns, ...); PACSError (502) if it is not one."""
    value = _value(item, tag, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise PACSError(f"the instance listing gives {tag} = {str(value)[:40]!r}, not a whole number", 502) from None
    if not 0 <= number <= 2 ** 31:
        raise PACSError(f"the instance listing gives {tag} = {number}", 502)
    return number


class CheckedDICOMwebDatastore(ConfinedFiles, DICOMWebDatastore):
    """`DICOMWebDatastore` with checked ids, confined cache paths, highdicom SEGs and
    multi-sequence studies (see the module docstring).

    Arguments:
      url: the DICOMweb root, e.g. ``http://127.0.0.1:8042/dicom-web``.
      cache_dir: the folder for this server's copies (a subfolder per URL is made in it).
      search_filter: QIDO filter of the listed series (default: all; non-image series dropped).
    """

    def __init__(self, url: str, cache_dir: str, search_filter: dict[str, Any] | None = None):
        self._url = url.rstrip("/")
        self._listing: tuple[float, dict[str, dict[str, str]]] = (0.0, {})
        self._listing_failure: InvalidInput | None = None  # why the last listing failed, if it did
        self._seg_listing: tuple[float, dict[str, tuple[str, str]]] = (0.0, {})
        self._fetch_lock = threading.Lock()
        # Upstream puts the cache in <cache_dir>/<md5 of the URL>.
        super().__init__(client=dicomweb_client(self._url), search_filter=dict(search_filter or {}),
                         cache_path=os.path.abspath(cache_dir), fetch_by_frame=False, convert_to_nifti=True)
        self._cache_root = os.path.realpath(self._datastore_path)
        self._sequences_dir = self._cache_root + "-sequences"  # outside the datastore: not listed as images
        os.makedirs(self._sequences_dir, exist_ok=True)

    @classmethod
    def from_settings(cls, url: str, app_dir: str) -> CheckedDICOMwebDatastore:
        """The datastore for ``medadapt label --studies URL``: cache in the app folder unless
        MONAI_LABEL_DICOMWEB_CACHE_PATH says otherwise; QIDO filter from `SEARCH_FILTER_ENV`
        (``medadapt label --dicomweb-filter``). Upstream's MONAI_LABEL_DICOMWEB_SEARCH_FILTER is
        not used: MONAI Label exports its default ({"Modality": "CT"}) to the environment, so a
        filter set on purpose cannot be told from it."""
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or os.path.join(app_dir, "dicomweb")
        return cls(url, cache, parse_json_object(os.environ.get(SEARCH_FILTER_ENV, ""), SEARCH_FILTER_ENV))

    def name(self) -> str:
        return self._url

    @contextlib.contextmanager
    def _asking(self, what: str) -> Iterator[None]:
        """Run the block's requests to the DICOMweb server within one `DICOMWEB_TIMEOUT`; what
        goes wrong with them as InvalidInput naming the server: 504 too slow, else 502."""
        timeout = env_number(DICOMWEB_TIMEOUT_ENV, DICOMWEB_TIMEOUT)
        try:
            with request_bounds(deadline=time.monotonic() + timeout):
                yield
        except PACSError as error:
            raise InvalidInput(f"{what}: the DICOMweb server {self._url} failed: {error}", error.status) from None
        except requests.RequestException as error:  # refused connection, an HTTP error status, bad JSON
            raise InvalidInput(f"{what}: the DICOMweb server {self._url} failed: {_reason(error)}", 502) from None

    # ------------------------------------------------------------------ what the server lists
    def series(self) -> dict[str, dict[str, str]]:
        """Series UID -> {"study", "description", "modality"} of the image series listed,
        from one QIDO search reused for `LIST_TTL` seconds. When the search fails, the last
        good listing (or none) serves for `LIST_TTL` seconds too, and `_listed` says why."""
        listed_at, listing = self._listing
        if time.monotonic() - listed_at < LIST_TTL:
            return listing
        try:
            with self._asking("listing the series"):
                found = dicom_datasets(self._client.search_for_series(
                    search_filters=self._search_filter, get_remaining=True,
                    fields=["SeriesDescription", "Modality", "StudyInstanceUID"]), "QIDO series search")
        except InvalidInput as error:
            logger.warning("%s; serving the last listing (%d series)", error, len(listing))
            self._listing, self._listing_failure = (time.monotonic(), listing), error
            return listing
        listing = {}
        for item in found:
            uid, study = _value(item, "0020000E"), _value(item, "0020000D")
            modality = str(_value(item, "00080060")).upper()
            if not (is_uid(uid) and is_uid(study)) or modality in NON_IMAGE_MODALITIES:
                continue
            listing[uid] = {"study": study, "description": str(_value(item, "0008103E")), "modality": modality}
        self._listing, self._listing_failure = (time.monotonic(), listing), None
        return listing

    def list_images(self) -> list[str]:
        return list(self.series())

    def _listed(self, image_id: object) -> dict[str, str] | None:
        """The listing of a series, None for one the server does not list; InvalidInput (502)
        when the server could not be asked."""
        if not is_uid(image_id):
            return None
        listed = self.series().get(image_id) or self._refreshed().get(image_id)
        if listed is None and self._listing_failure is not None:
            raise self._listing_failure
        return listed

    def _refreshed(self) -> dict[str, dict[str, str]]:
        self._listing = (0.0, self._listing[1])  # expired: a series stored since is found at once
        return self.series()

    # ------------------------------------------------------------------ cache paths
    def _cache(self, *parts: str) -> str:
        return confined(self._cache_root, *parts, what="DICOMweb cache path")

    def _series_dir(self, uid: str) -> str:
        return self._cache(uid)

    def _nifti(self, uid: str) -> str:
        return self._cache(f"{uid}.nii.gz")

    # ------------------------------------------------------------------ images
    def get_image_uri(self, image_id: str) -> str:
        """The NIfTI of a listed series (downloaded and converted on first use), or "" for an
        id the server does not list."""
        listed = self._listed(image_id)
        if listed is None:
            return ""
        with self._fetch_lock:
            path = self._nifti(image_id)
            if not os.path.isfile(path) or image_id not in self._datastore.objects:
                self._fetch(image_id, listed)
            return path

    def _fetch(self, uid: str, listed: dict[str, str]) -> None:
        """Download the series (once) and convert it; on any failure nothing of it stays in the cache."""
        folder = self._series_dir(uid)
        if not (os.path.isdir(folder) and os.listdir(folder)):
            self._download(uid, listed, folder)
        try:
            converted = _series_to_nifti(folder, uid)
        except InvalidInput:
            shutil.rmtree(folder, ignore_errors=True)  # refused for what it holds: fetched anew next time
            raise
        try:
            self._add_image_file(uid, converted, {"SeriesInstanceUID": uid, "StudyInstanceUID": listed["study"],
                                                  "SeriesDescription": listed["description"],
                                                  "Modality": listed["modality"]})
        finally:
            os.remove(converted)

    def _download(self, uid: str, listed: dict[str, str], folder: str) -> None:
        """The series' instances into ``folder`` (through ``<folder>.partial``, renamed when complete)."""
        with self._asking(f"series {uid}"):
            count, budget = self._announced(uid, listed["study"])
            with request_bounds(max_bytes=budget):
                instances = self._retrieved(self._client.retrieve_series, listed["study"], uid)
        if len(instances) != count:
            raise InvalidInput(f"series {uid}: the DICOMweb server {self._url} lists {count} instances but sent "
                               f"{len(instances)}", 502)
        partial = folder + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            os.makedirs(partial)
            for n, instance in enumerate(instances):
                instance.save_as(os.path.join(partial, f"{n:05d}.dcm"))
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        logger.info("DICOMweb: series %s (%s, %d instances) downloaded to %s", uid, listed["description"],
                    len(instances), folder)

    def _retrieved(self, retrieve, study: str, series: str) -> list:
        """The instances ``retrieve(study, series)`` gives (a WADO-RS series retrieval), or
        InvalidInput (502) when the answer is not DICOM: HTML, a bogus multipart boundary,
        truncated parts (dicomweb-client and pydicom raise these while decoding it)."""
        from pydicom.errors import InvalidDicomError

        try:
            return list(retrieve(study, series))
        except (InvalidDicomError, ValueError, KeyError, TypeError, EOFError, AttributeError) as error:
            raise InvalidInput(f"series {series}: the DICOMweb server {self._url} answered with something that is "
                               f"not DICOM instances ({type(error).__name__}: {str(error)[:200]})", 502) from None

    def _announced(self, uid: str, study: str) -> tuple[int, int]:
        """The series' instance count and the bytes its download may hold (the pixel data its
        instance listing announces, plus headers), from a QIDO search; 413 for a series over
        the server's voxel or instance limits."""
        instances = dicom_datasets(self._client.search_for_instances(
            study, uid, fields=["Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated"],
            get_remaining=True), f"QIDO instance search of series {uid}")
        if len(instances) > MAX_SERIES_INSTANCES:
            raise InvalidInput(f"series {uid}: {len(instances):,} instances exceed this server's limit of "
                               f"{MAX_SERIES_INSTANCES:,}", 413)
        voxels = pixel_bytes = 0
        for item in instances:
            samples = (_count(item, "00280010", 0) * _count(item, "00280011", 0)  # rows, columns
                       * (_count(item, "00280008", 1) or 1) * (_count(item, "00280002", 1) or 1))  # frames, samples
            voxels += samples
            pixel_bytes += samples * (((_count(item, "00280100", 16) or 16) + 7) // 8)  # bits allocated
        if voxels > MAX_VOLUME_VOXELS:
            raise InvalidInput(f"series {uid}: {len(instances)} instances with {voxels:,} voxels exceed this "
                               f"server's limit of {MAX_VOLUME_VOXELS:,} voxels", 413)
        if any(_value(item, tag, None) is None for item in instances for tag in ("00280010", "00280011")):
            # A server that does not return Rows and Columns announces no size: the general bound.
            return len(instances), MAX_PIXEL_ANSWER_BYTES
        return len(instances), min(MAX_PIXEL_ANSWER_BYTES, pixel_bytes + len(instances) * INSTANCE_HEADER_BYTES + 2 ** 20)

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        listed = self._listed(image_id)
        if listed is None:
            return {}
        info = {"SeriesInstanceUID": image_id, "StudyInstanceUID": listed["study"],
                "SeriesDescription": listed["description"], "Modality": listed["modality"]}
        local = LocalDatastore.get_image_info(self, image_id)
        if local:
            info.update(local, path=self._nifti(image_id))
        return info

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        discard_upload(image_filename)
        raise HTTPException(405, "this server's images are the series of its DICOMweb server: store new images "
                                 f"there (STOW-RS to {self._url}), not through PUT /datastore/image")

    def remove_image(self, image_id: str) -> None:
        raise HTTPException(405, "this server's images are the series of its DICOMweb server: delete them there")

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        if not self.get_image_uri(image_id):
            raise HTTPException(404, f"no series {image_id!r} on the DICOMweb server")
        LocalDatastore.update_image_info(self, image_id, info)

    def json(self):
        data = LocalDatastore.json(self)
        for uid, listed in self.series().items():  # listed but not downloaded yet
            data["objects"].setdefault(uid, {"image": {"ext": "", "info": {
                "SeriesInstanceUID": uid, "StudyInstanceUID": listed["study"],
                "SeriesDescription": listed["description"], "Modality": listed["modality"]}}, "labels": {}})
        return data

    # ------------------------------------------------------------------ multi-sequence studies
    def sequence_volume(self, image_id: str, sequences: Sequence[str]) -> str:
        """A 4D NIfTI of the ``sequences`` of ``image_id``'s study as channels (in that order),
        on the grid of ``image_id``'s series, which must be one of them; the series are found
        by their Series Description (`SEQUENCE_NAMES`)."""
        import nibabel as nib
        from nibabel.processing import resample_from_to

        listed = self._listed(image_id)
        if listed is None:
            raise InvalidInput(f"unknown image {image_id!r}: not a series of the DICOMweb server", 404)
        study = {uid: s for uid, s in self.series().items() if s["study"] == listed["study"]}
        chosen = {}
        for sequence in sequences:
            matches = sorted(uid for uid, s in study.items() if sequence_of(s["description"]) == sequence)
            if len(matches) != 1:
                found = sorted(s["description"] for s in study.values())
                problem = "no series" if not matches else f"{len(matches)} series"
                raise InvalidInput(
                    f"study {listed['study']}: {problem} for the {sequence} sequence; this model needs one series each "
                    f"of {list(sequences)}, named by Series Description (accepted: "
                    f"{ {s: list(SEQUENCE_NAMES[s]) for s in sequences} }, case, spaces, '-', '_' and '.' ignored); "
                    f"the study holds {found}", 422)
            chosen[sequence] = matches[0]
        if image_id not in chosen.values():
            raise InvalidInput(f"series {image_id} ({listed['description']!r}) is not one of the sequences "
                               f"{list(sequences)} of its study; send the id of one of them", 422)
        key = hashlib.md5("/".join(chosen[s] for s in sequences).encode() + image_id.encode()).hexdigest()
        path = confined(self._sequences_dir, f"{key}.nii.gz", what="sequence volume")
        if os.path.isfile(path):
            return path
        reference = nib.load(self.get_image_uri(image_id))
        voxels = int(np.prod(reference.shape)) * len(sequences)
        if voxels > MAX_VOLUME_VOXELS:
            raise InvalidInput(f"study {listed['study']}: {len(sequences)} sequences on the grid of series {image_id} "
                               f"{reference.shape} are {voxels:,} voxels, over this server's limit of "
                               f"{MAX_VOLUME_VOXELS:,}", 413)
        channels = []
        for sequence in sequences:
            uid = chosen[sequence]
            image = nib.load(self.get_image_uri(uid))
            if len(image.shape) != 3:
                raise InvalidInput(f"series {uid} ({sequence}) is not a 3D volume: shape {image.shape}", 422)
            if image.shape != reference.shape or not np.allclose(image.affine, reference.affine,
                                                                 atol=AFFINE_TOLERANCE):
                logger.warning("sequence %s (series %s): grid %s, spacing %s differs from series %s's %s, spacing %s: "
                               "resampled onto it (linear)", sequence, uid, image.shape,
                               np.round(nib.affines.voxel_sizes(image.affine), 3).tolist(), image_id, reference.shape,
                               np.round(nib.affines.voxel_sizes(reference.affine), 3).tolist())
                image = resample_from_to(image, reference, order=1, cval=0.0)
            channels.append(np.asarray(image.get_fdata(dtype=np.float32)))
        stacked = nib.Nifti1Image(np.stack(channels, axis=-1), reference.affine)
        with atomic_path(path) as partial:
            nib.save(stacked, str(partial))
        logger.info("sequences %s of study %s as channels: %s, on the grid of series %s", list(sequences),
                    listed["study"], [chosen[s] for s in sequences], image_id)
        return path

    # ------------------------------------------------------------------ labels
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any],
                   label_id: str = "") -> str:
        """Store a label of a listed series: a "final" one also as a SEG series on the
        DICOMweb server, referencing the source series (its UID in the label's info)."""
        converted = label_filename
        try:
            plain_name(label_tag, "label tag")
            image_uri = self.get_image_uri(image_id)
            if not image_uri:
                raise InvalidInput(f"no series {image_id!r} on the DICOMweb server to attach a label to", 404)
            image = inspect_image_file(image_uri)
            converted = stored_label(label_filename, image, f"uploaded label of {image_id!r}")  # NRRD: as NIfTI
            label = inspect_image_file(converted, read_data=True, name=f"uploaded label of {image_id!r}")
            if label.kind != "3d" or label.channels != 1 or label.spatial_shape != image.spatial_shape:
                raise InvalidInput(f"label refused: a label for series {image_id} must be a 3D NIfTI label map of "
                                   f"shape {image.spatial_shape}, got {label.kind.upper()} of shape "
                                   f"{label.spatial_shape} with {label.channels} channel(s)", 422)
            if not np.allclose(label.affine, image.affine, atol=AFFINE_TOLERANCE):
                raise InvalidInput(f"label refused: its affine {np.round(label.affine, 3).tolist()} differs from the "
                                   f"series' {np.round(image.affine, 3).tolist()}; send it on the grid of the image "
                                   f"this server gives (GET /datastore/image?image={image_id})", 422)
            info = dict(label_info or {})
            if label_tag == DefaultLabelTag.FINAL:
                info.update(self._store_seg(image_id, converted, image.affine, info))
            return self._add_label_file(image_id, converted, label_tag, info)
        except (InvalidInput, ImageFileError, SegGeometryError) as error:
            discard_upload(label_filename)
            if isinstance(error, InvalidInput):
                raise http_error(error) from None
            raise HTTPException(getattr(error, "status", 422), f"label refused: {error}") from None
        finally:
            if converted != label_filename and os.path.isfile(converted):
                os.remove(converted)

    def _store_seg(self, image_id: str, label_filename: str, affine: np.ndarray, info: dict[str, Any]) -> dict:
        import nibabel as nib
        import pydicom

        label = np.rint(np.asarray(nib.load(label_filename).dataobj)).astype(np.int64)
        if label.min() < 0 or label.max() > 255:
            raise InvalidInput(f"label refused: values must lie in 0..255, got {label.min()}..{label.max()}", 422)
        model = info.get("model")
        handle, seg_path = tempfile.mkstemp(suffix=".dcm", prefix="medadapt_seg_")
        os.close(handle)
        try:
            seg = write_seg(label, affine, self._series_dir(image_id), segment_names(info), seg_path,
                            algorithm=str(model or "medadapt label"), manual=model is None)
            with self._asking("storing the label as a SEG"):
                try:
                    answer = self._client.store_instances([pydicom.dcmread(seg_path)])
                except (ValueError, TypeError, KeyError) as error:  # an answer dicomweb-client cannot decode
                    raise PACSError(f"the DICOMweb server {self._url} answered with an unreadable STOW-RS "
                                    f"response ({type(error).__name__})", 502) from None
        finally:
            os.remove(seg_path)
        failed = (answer.get("FailedSOPSequence") if hasattr(answer, "get") else None) or []
        if failed:
            reasons = [str(item.get("FailureReason", "?")) for item in failed]
            raise InvalidInput(f"the DICOMweb server refused the SEG (failure reasons {reasons})", 502)
        self._seg_listing = (0.0, {})
        logger.info("label of series %s stored on the DICOMweb server as SEG series %s", image_id,
                    seg.SeriesInstanceUID)
        return {"SeriesInstanceUID": str(seg.SeriesInstanceUID), "SOPInstanceUID": str(seg.SOPInstanceUID),
                "StudyInstanceUID": str(seg.StudyInstanceUID), "ReferencedSeriesInstanceUID": image_id,
                "segments": {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}}

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The label of a listed series (label ids are image ids): the cached one, else, for
        "final", the newest SEG on the server that references the series."""
        image_id = image_id or label_id
        if self._listed(image_id) is None or not isinstance(label_tag, str):
            return ""
        try:
            plain_name(label_tag, "label tag")
        except InvalidInput:
            return ""
        local = LocalDatastore.get_label_uri(self, image_id, label_tag)
        if local and os.path.isfile(local):
            return confined(self._cache_root, os.path.relpath(local, self._cache_root), what="label")
        if label_tag != DefaultLabelTag.FINAL:
            return ""
        seg = self.segs().get(image_id)
        if seg is None:  # a SEG stored since the last listing is found at once
            self._seg_listing = (0.0, {})
            seg = self.segs().get(image_id)
        return self._fetch_seg(image_id, *seg) if seg else ""

    def segs(self) -> dict[str, tuple[str, str]]:
        """Listed series UID -> (study, SEG series) of the newest SEG on the server referencing
        it, from a QIDO search (and each SEG's metadata) reused for `LIST_TTL` seconds."""
        listed_at, found = self._seg_listing
        if time.monotonic() - listed_at < LIST_TTL:
            return found
        listing = self.series()
        try:
            with self._asking("listing the SEG series"):
                searched = dicom_datasets(self._client.search_for_series(
                    search_filters={"Modality": "SEG"}, get_remaining=True), "QIDO SEG search")
                found = {uid: seg for item in searched for uid, seg in self._seg_references(item, listing)}
        except InvalidInput as error:
            logger.warning("%s; using the last SEG listing (%d labelled series)", error, len(found))
        self._seg_listing = (time.monotonic(), found)
        return found

    def _seg_references(self, item: dict, listing: dict) -> list[tuple[str, tuple[str, str]]]:
        """(listed series UID, (study, SEG series)) for each listed series the SEG of a QIDO
        item references (from its metadata); none when the metadata cannot be read."""
        study, seg_series = _value(item, "0020000D"), _value(item, "0020000E")
        if not (is_uid(study) and is_uid(seg_series)):
            return []
        try:
            meta = dicom_datasets(self._client.retrieve_series_metadata(study, seg_series),
                                  f"metadata of SEG series {seg_series}")[0]
        except PACSError as error:
            if error.status == 504:
                raise  # the listing's time is spent: the rest would fail alike
            return []
        except (requests.RequestException, IndexError):
            return []
        element = meta.get("00081115")  # Referenced Series Sequence
        sequence = element.get("Value") if isinstance(element, dict) else None
        uids = [_value(s, "0020000E") for s in sequence if isinstance(s, dict)] if isinstance(sequence, list) else []
        return [(uid, (study, seg_series)) for uid in uids if uid in listing]

    def _fetch_seg(self, image_id: str, study: str, seg_series: str) -> str:
        import nibabel as nib

        with self._asking(f"SEG series {seg_series}"), request_bounds(max_bytes=MAX_PIXEL_ANSWER_BYTES):
            instances = self._retrieved(self._client.retrieve_series, study, seg_series)
        if not instances:
            return ""
        handle, seg_path = tempfile.mkstemp(suffix=".dcm", prefix="medadapt_seg_")
        os.close(handle)
        handle, label_path = tempfile.mkstemp(suffix=".nii.gz", prefix="medadapt_label_")
        os.close(handle)
        try:
            instances[0].save_as(seg_path)
            image = nib.load(self.get_image_uri(image_id))
            label = read_seg(seg_path, self._series_dir(image_id), image.shape, image.affine)
            nib.save(nib.Nifti1Image(label, image.affine), label_path)
            self._add_label_file(image_id, label_path, DefaultLabelTag.FINAL,
                                 {"SeriesInstanceUID": seg_series, "StudyInstanceUID": study})
        except (SegGeometryError, ValueError, AttributeError, KeyError) as error:  # highdicom's, for a bad SEG
            logger.warning("SEG series %s of series %s not used: %s", seg_series, image_id, error)
            return ""
        finally:
            for path in (seg_path, label_path):
                if os.path.exists(path):
                    os.remove(path)
        return LocalDatastore.get_label_uri(self, image_id, DefaultLabelTag.FINAL)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        if label_tag == DefaultLabelTag.FINAL:
            raise HTTPException(405, "final labels are SEG series on the DICOMweb server: delete the SEG there")
        if not self.get_label_uri(label_id, label_tag):
            raise HTTPException(404, f"no label of series {label_id!r} with tag {label_tag!r}")
        LocalDatastore.remove_label(self, label_id, label_tag)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        if not self.get_label_uri(label_id, label_tag):
            raise HTTPException(404, f"no label of series {label_id!r} with tag {label_tag!r}")
        LocalDatastore.update_label_info(self, label_id, label_tag, info)

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        local = set(LocalDatastore.get_labeled_images(self))
        return sorted((local | set(self.segs())) & set(self.series()))

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        return sorted(set(self.series()) - set(self.get_labeled_images()))

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        self._seg_listing = (0.0, {})  # training sees every SEG stored until now
        pairs = []
        for uid in self.get_labeled_images():
            image, label = self.get_image_uri(uid), self.get_label_uri(uid, DefaultLabelTag.FINAL)
            if image and label:
                pairs.append({"image": image, "label": label})
        if not full_path:
            pairs = [{k: os.path.relpath(v, self._cache_root) for k, v in p.items()} for p in pairs]
        return pairs


def segment_names(info: dict[str, Any]) -> dict[int, str]:
    """Label value -> name from a label's info: MONAI Label clients' ``label_info`` (3D
    Slicer: [{"name", "idx"}]), ``label_names`` ({name: value}), or an inference's
    ``params.label_values`` ({name: value})."""
    names: dict[int, str] = {}
    for item in info.get("label_info") or []:
        if isinstance(item, dict) and isinstance(item.get("idx"), int) and item.get("name"):
            names[item["idx"]] = str(item["name"])
    for source in (info.get("label_names"), (info.get("params") or {}).get("label_values")):
        if isinstance(source, dict):
            for name, value in source.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    names.setdefault(value, str(name))
    return names


def _series_to_nifti(folder: str, uid: str) -> str:
    """A temporary NIfTI of the DICOM series in ``folder`` (SimpleITK, sorted by position);
    InvalidInput (422) for a series whose geometry SimpleITK would have to guess."""
    import SimpleITK as sitk

    problem = series_geometry_problem(folder)
    if problem:
        raise InvalidInput(f"series {uid}: its geometry cannot be trusted: {problem}; this server does not guess "
                           "positions or spacings", 422)
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(folder, uid)
    if not files:
        raise InvalidInput(f"series {uid}: SimpleITK finds no readable image series in its files", 422)
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InvalidInput(f"series {uid} cannot be read as a volume: {str(error).strip().splitlines()[-1]}",
                           422) from None
    voxels = int(np.prod(image.GetSize())) * image.GetNumberOfComponentsPerPixel()
    if voxels > MAX_VOLUME_VOXELS:
        raise InvalidInput(f"series {uid}: volume of {voxels:,} voxels exceeds this server's limit of "
                           f"{MAX_VOLUME_VOXELS:,}", 413)
    handle, path = tempfile.mkstemp(suffix=".nii.gz", prefix="medadapt_series_")
    os.close(handle)
    sitk.WriteImage(image, path)
    return path
