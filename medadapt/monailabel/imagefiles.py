"""Check, read and write the files a MONAI Label client sends: PNG/JPG images, NIfTI volumes.

Every check raises `ImageFileError` (a ValueError) carrying the HTTP status the server should
answer with: 415 for a file type the app does not serve, 422 for a file that claims a known
type but cannot be read, 413 for one whose header claims more pixels or voxels than the server
decodes (`medadapt.monailabel.limits`; checked before anything is decoded). Upstream MONAI
Label stores any upload as is and fails later with a 500, so these checks run on upload and
again before inference.

Uploads are the files the app itself writes for a request (`UploadFolder`), recognised by
where they lie, never by their name or age.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medadapt.data.validate import affine_problem
from medadapt.monailabel.limits import MAX_IMAGE_PIXELS, MAX_VOLUME_VOXELS

FLOAT32_MAX = float(np.finfo(np.float32).max)  # models read voxels as float32

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
VOLUME_SUFFIXES = (".nii", ".nii.gz")
# Patterns for MONAI Label's datastore: the files it lists as images.
DATASTORE_PATTERNS = ["*.nii.gz", "*.nii", "*.png", "*.jpg", "*.jpeg", "*.PNG", "*.JPG", "*.JPEG"]


class ImageFileError(ValueError):
    """A file that is not a readable image of a served kind.

    Arguments:
      message: what is wrong, naming the file.
      status: HTTP status to answer with (404 no such file, 413 more pixels or voxels than the
        server decodes, 415 unsupported type, 422 unreadable content).
    """

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageFileInfo:
    """What the app needs to know about an input file before running a model.

    Attributes:
      path: the file.
      kind: "2d" (PNG/JPG) or "3d" (NIfTI).
      spatial_shape: (H, W) for images (numpy row order), (X, Y, Z) for volumes.
      channels: colour channels of an image as stored (1 grey, 3 RGB, 4 RGBA, ...), or the
        fourth axis of a 4D volume (1 for a 3D volume).
      affine: the volume's voxel-to-world matrix (None for images).
    """

    path: str
    kind: str
    spatial_shape: tuple[int, ...]
    channels: int
    affine: np.ndarray | None = None


def file_suffix(path: str | Path) -> str:
    """The lower-case suffix, with ``.nii.gz`` kept whole."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def file_kind(path: str | Path, name: str | None = None) -> str:
    """"2d" or "3d" from the file name; ImageFileError (415) for anything else."""
    suffix = file_suffix(path)
    if suffix in IMAGE_SUFFIXES:
        return "2d"
    if suffix in VOLUME_SUFFIXES:
        return "3d"
    raise ImageFileError(
        f"{name or Path(path).name}: unsupported file type {suffix or '(none)'!r}; this app serves "
        f"PNG/JPG images ({', '.join(IMAGE_SUFFIXES)}) and NIfTI volumes ({', '.join(VOLUME_SUFFIXES)})",
        status=415,
    )


def inspect_image_file(path: str | Path, read_data: bool = False, name: str | None = None) -> ImageFileInfo:
    """Open ``path`` and describe it; raise ImageFileError if it is not a readable image.

    Arguments:
      path: a PNG/JPG image or a NIfTI volume.
      read_data: decode all pixels / voxels (catches truncated files; used on upload).
        Without it images are still decoded (cheap) but volumes only have their header read.
      name: how messages call the file (default: its file name).
    """
    path = Path(path)
    name = name or path.name
    if not path.is_file():
        raise ImageFileError(f"{name}: no such file", status=404)
    kind = file_kind(path, name)
    return _inspect_2d(path, name) if kind == "2d" else _inspect_3d(path, name, read_data)


def _image_header(path: Path, name: str) -> tuple[int, int]:
    """(width, height) of a PNG/JPG from its header alone: nothing is decoded, and PIL's own
    decompression-bomb check (an exception above 179 M pixels) never runs, so a header that
    claims too much gets this module's 413 with its size instead of a 500."""
    from PIL import JpegImagePlugin, PngImagePlugin

    with open(path, "rb") as file:
        signature = file.read(8)
    if signature.startswith(PNG_SIGNATURE):
        opener = PngImagePlugin.PngImageFile
    elif signature.startswith(JPEG_SIGNATURE):
        opener = JpegImagePlugin.JpegImageFile
    else:
        raise ImageFileError(f"{name}: not a readable PNG/JPG image (no PNG or JPEG signature)")
    try:
        with opener(str(path)) as image:
            return image.size
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageFileError(f"{name}: not a readable PNG/JPG image ({error})") from None


def _inspect_2d(path: Path, name: str) -> ImageFileInfo:
    from PIL import Image, UnidentifiedImageError

    width, height = _image_header(path, name)
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageFileError(f"{name}: image of {width}x{height} pixels ({width * height:,}) exceeds this server's "
                             f"limit of {MAX_IMAGE_PIXELS:,} pixels", status=413)
    try:
        with Image.open(path) as image:
            # verify() checks the structure, load() decodes: a truncated file fails one of them.
            image.verify()
        with Image.open(path) as image:
            image.load()
            width, height = image.size
            channels = len(image.getbands())
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageFileError(f"{name}: not a readable PNG/JPG image ({error})") from None
    if width < 2 or height < 2:
        raise ImageFileError(f"{name}: image of {width}x{height} pixels is too small to segment")
    # PNG and JPEG hold integers only, so an image cannot carry NaN or infinite values.
    return ImageFileInfo(str(path), "2d", (height, width), channels)


def _inspect_3d(path: Path, name: str, read_data: bool) -> ImageFileInfo:
    import nibabel as nib

    try:
        image = nib.load(str(path))  # the header only: voxels are read below, if at all
        shape = tuple(int(s) for s in image.shape)
    except Exception as error:  # nibabel raises many types (ImageFileError, EOFError, zlib errors)
        raise ImageFileError(f"{name}: not a readable NIfTI volume ({type(error).__name__}: {error})") from None
    if len(shape) not in (3, 4) or min(shape[:3]) < 1:
        raise ImageFileError(f"{name}: expected a 3D volume or a 4D volume with channels last, got shape {shape}")
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > MAX_VOLUME_VOXELS:
        raise ImageFileError(f"{name}: volume of shape {shape} ({voxels:,} voxels) exceeds this server's limit "
                             f"of {MAX_VOLUME_VOXELS:,} voxels", status=413)
    placement = affine_problem(image.affine)
    if placement:
        raise ImageFileError(f"{name}: {placement}")
    if read_data:
        _check_voxel_values(image, name)
    channels = shape[3] if len(shape) == 4 else 1
    return ImageFileInfo(str(path), "3d", shape[:3], channels, np.asarray(image.affine, dtype=np.float64))


def _check_voxel_values(image, name: str) -> None:
    """ImageFileError (422) for NaN or infinite voxels, as stored or once the header's scaling
    (scl_slope, scl_inter) is applied in float32, as the models read them."""
    try:
        # The values as stored: scaling would turn an 8-bit volume into 8 bytes per voxel.
        data = image.dataobj.get_unscaled() if hasattr(image.dataobj, "get_unscaled") else image.get_fdata()
    except Exception as error:
        raise ImageFileError(f"{name}: not a readable NIfTI volume ({type(error).__name__}: {error})") from None
    bad = int(data.size - np.count_nonzero(np.isfinite(data))) if np.issubdtype(data.dtype, np.inexact) else 0
    if bad:
        raise ImageFileError(f"{name}: volume holds {bad:,} NaN or infinite voxels; replace them "
                             "(e.g. with 0) before sending it")
    slope, inter = float(getattr(image.dataobj, "slope", 1.0)), float(getattr(image.dataobj, "inter", 0.0))
    if data.size and (slope, inter) != (1.0, 0.0):
        extremes = np.array([data.min(), data.max()], dtype=np.float64) * slope + inter
        if not np.isfinite(extremes).all() or np.abs(extremes).max() > FLOAT32_MAX:
            raise ImageFileError(f"{name}: the header's scaling (scl_slope {slope:g}, scl_inter {inter:g}) makes "
                                 f"voxels of up to {np.abs(extremes).max():.3g}, beyond float32: they would be "
                                 "infinite; fix the scaling")


class UploadFolder:
    """The folder where the app writes the files a request uploads, and the only place uploads
    are recognised: every file in it was created by `new_file`, so a path a client sends can
    name an upload only if the app made it there, and a refused upload is deleted only there.

    Arguments:
      folder: a folder of the app's own (``<app>/uploads``), created if missing.
    """

    PREFIX = "upload-"
    SUFFIX = re.compile(r"(\.[A-Za-z0-9_-]{1,10}){0,3}")  # ".nii.gz", ".png", ".txt"; nothing odd or long

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)

    def new_file(self, suffix: str | None = "") -> str:
        """Create an empty file for an upload and return its path. The suffix (from the
        client's file name) is kept when it is short and plain, so type checks can name it."""
        suffix = suffix or ""
        if not self.SUFFIX.fullmatch(suffix):  # "scan (1).v2.png": keep ".png"
            last = "." + suffix.rsplit(".", 1)[-1]
            suffix = last if self.SUFFIX.fullmatch(last) else ".unknown"
        handle, path = tempfile.mkstemp(prefix=self.PREFIX, suffix=suffix, dir=self.folder)
        os.close(handle)
        return path

    def owns(self, path: object) -> bool:
        """Whether ``path`` is a file this folder made (a plain file directly inside it)."""
        if not isinstance(path, (str, Path)) or not str(path) or "\0" in str(path):
            return False
        path = Path(path)
        return (path.is_absolute() and path.parent == self.folder and path.name.startswith(self.PREFIX)
                and path.is_file() and not path.is_symlink())


_uploads: UploadFolder | None = None


def use_upload_folder(folder: UploadFolder | None) -> None:
    """Make ``folder`` the one where this process's uploads are written and recognised (set
    once by the server at start; None: no uploads, as in training subprocesses)."""
    global _uploads
    _uploads = folder


def upload_folder() -> UploadFolder | None:
    """The folder set by `use_upload_folder`, or None."""
    return _uploads


def is_upload(path: str | Path | None) -> bool:
    """Whether ``path`` is a file the app wrote for an uploaded request file (see `UploadFolder`)."""
    return _uploads is not None and _uploads.owns(path)


def discard_upload(path: str | Path | None) -> None:
    """Delete a refused upload: MONAI Label removes its temporary copies in background tasks
    that never run when the request fails, so without this every refused upload stays. Only
    the app's own uploads are ever deleted."""
    if is_upload(path):
        try:
            os.remove(path)
        except OSError:
            pass


def write_png_label(label: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W) label map of small integers as an 8-bit grey PNG."""
    from PIL import Image

    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"a PNG label must be (H, W), got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError("PNG label values must lie in [0, 255]")
    Image.fromarray(label.astype(np.uint8), mode="L").save(str(path))
    return Path(path)


def write_nifti_label(label: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write an (X, Y, Z) label map as uint8 NIfTI with the image's affine."""
    import nibabel as nib

    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"a NIfTI label must be (X, Y, Z), got shape {label.shape}")
    image = nib.Nifti1Image(label.astype(np.uint8), np.asarray(affine, dtype=np.float64))
    image.set_data_dtype(np.uint8)
    nib.save(image, str(path))
    return Path(path)
