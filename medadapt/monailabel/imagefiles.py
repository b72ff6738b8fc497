"""Check, read and write the files a MONAI Label client sends: PNG/JPG images, NIfTI volumes.

Every check raises `ImageFileError` (a ValueError) carrying the HTTP status the server should
answer with: 415 for a file type the app does not serve, 422 for a file that claims a known
type but cannot be read. Upstream MONAI Label stores any upload as is and fails later with a
500, so these checks run on upload and again before inference.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VOLUME_SUFFIXES = (".nii", ".nii.gz")
# Patterns for MONAI Label's datastore: the files it lists as images.
DATASTORE_PATTERNS = ["*.nii.gz", "*.nii", "*.png", "*.jpg", "*.jpeg", "*.PNG", "*.JPG", "*.JPEG"]


class ImageFileError(ValueError):
    """A file that is not a readable image of a served kind.

    Arguments:
      message: what is wrong, naming the file.
      status: HTTP status to answer with (415 unsupported type, 422 unreadable content).
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


def _inspect_2d(path: Path, name: str) -> ImageFileInfo:
    from PIL import Image, UnidentifiedImageError

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
    return ImageFileInfo(str(path), "2d", (height, width), channels)


def _inspect_3d(path: Path, name: str, read_data: bool) -> ImageFileInfo:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        shape = tuple(int(s) for s in image.shape)
        if read_data:
            data = np.asanyarray(image.dataobj)
            if not np.isfinite(data).all():
                raise ImageFileError(f"{name}: volume holds NaN or infinite values")
    except ImageFileError:
        raise
    except Exception as error:  # nibabel raises many types (ImageFileError, EOFError, zlib errors)
        raise ImageFileError(f"{name}: not a readable NIfTI volume ({type(error).__name__}: {error})") from None
    if len(shape) not in (3, 4) or min(shape[:3]) < 1:
        raise ImageFileError(f"{name}: expected a 3D volume or a 4D volume with channels last, got shape {shape}")
    channels = shape[3] if len(shape) == 4 else 1
    return ImageFileInfo(str(path), "3d", shape[:3], channels, np.asarray(image.affine, dtype=np.float64))


def is_upload(path: str | Path, max_age: float | None = None) -> bool:
    """Whether ``path`` looks like the temporary file MONAI Label writes for an uploaded
    request file (``<tempdir>/tmpXXXXXXXX<ext>``), written within ``max_age`` seconds.

    A client can also send such a path as an image id; the age limit keeps that from
    reaching files other than the uploads of requests now being handled.
    """
    path = Path(path)
    if not (path.is_absolute() and path.parent == Path(tempfile.gettempdir()) and path.name.startswith("tmp")):
        return False
    if max_age is None:
        return True
    try:
        return path.is_file() and time.time() - path.stat().st_mtime < max_age
    except OSError:
        return False


def discard_upload(path: str | Path | None) -> None:
    """Delete a refused upload: MONAI Label removes its temporary copies in background tasks
    that never run when the request fails, so without this every refused upload stays."""
    if path and is_upload(path):
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
