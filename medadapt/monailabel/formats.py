"""The file formats 3D Slicer and OHIF ask for and send, next to this server's own.

The server stores and trains on PNG images and labels (2D) and NIfTI volumes (3D). Clients
see everything as volumes: 3D Slicer loads a PNG as a (W, H, 1) volume (ITK's reading: column
i, row j, spacing 1, origin 0), asks for results as NRRD (its default) or NIfTI with
``result_extension`` / ``result_dtype`` / ``result_compress``, saves labels in the format the
user has (NRRD or NIfTI, (W, H, 1) for a 2D image), and uploads local volumes as NRRD. Here:

- `ResultFormat` / `result_format`: what a request asks for, checked (400 naming the key);
  `write_label` writes a label in it, a 2D label as ITK's (W, H, 1) volume of the image.
- `stored_label` turns a label a client sent into the stored form of its image's kind (an NRRD
  into NIfTI; a (W, H) or (W, H, 1) volume for a 2D image into a PNG), `stored_image` an NRRD
  image into NIfTI. NRRD headers are checked first: their size against the server's voxel
  limit before anything is decoded, and a header naming a detached data file (``data file:``,
  which would make the reader open any path on the server) is refused.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medadapt.monailabel.errors import InvalidInput
from medadapt.monailabel.imagefiles import (
    ImageFileError,
    ImageFileInfo,
    file_suffix,
    upload_folder,
    write_png_label,
)
from medadapt.monailabel.limits import MAX_VOLUME_VOXELS

NRRD = ".nrrd"
VOLUME_EXTENSIONS = (".nii.gz", ".nii", NRRD)
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32", "float32")
NRRD_MAGIC = b"NRRD000"
MAX_NRRD_HEADER = 64 * 1024  # bytes; a real header is a few hundred
# NRRD fields that make a reader open another file (detached data): never from a client.
DETACHED_DATA_FIELDS = ("data file", "datafile")


@dataclass(frozen=True)
class ResultFormat:
    """How a request wants its label file.

    Attributes:
      extension: ".png" (2D models only), ".nii.gz", ".nii" or ".nrrd"; None: the model's own
        (PNG for images, NIfTI for volumes).
      dtype: the label's voxel type.
      compress: compress an NRRD's data (gzip).
    """

    extension: str | None = None
    dtype: str = "uint8"
    compress: bool = True


def result_format(request: dict[str, Any], kind: str) -> ResultFormat:
    """The `ResultFormat` of an infer request for a model of input ``kind`` ("2d" or "3d");
    InvalidInput (400) naming the key that is wrong."""
    extension = request.get("result_extension")
    if extension in (None, ""):
        extension = None
    elif not isinstance(extension, str):
        raise InvalidInput(f"result_extension must be a file extension such as '.nrrd', got {extension!r}", 400)
    else:
        extension = "." + extension.lower().lstrip(".")
        allowed = VOLUME_EXTENSIONS + ((".png",) if kind == "2d" else ())
        if extension not in allowed:
            raise InvalidInput(f"result_extension {extension!r} is not one this model writes; use one of "
                               f"{list(allowed)}", 400)
    dtype = request.get("result_dtype") or "uint8"
    if dtype not in RESULT_DTYPES:
        raise InvalidInput(f"result_dtype {dtype!r} is not one of {list(RESULT_DTYPES)}", 400)
    if extension in (None, ".png") and kind == "2d" and dtype not in ("uint8", "uint16"):
        raise InvalidInput(f"result_dtype {dtype!r}: a PNG label is uint8 or uint16; ask for result_extension "
                           "'.nrrd' or '.nii.gz' for other types", 400)
    compress = request.get("result_compress", True)
    if not isinstance(compress, bool):
        raise InvalidInput(f"result_compress must be true or false, got {compress!r}", 400)
    return ResultFormat(extension, dtype, compress)


def write_label(label: np.ndarray, kind: str, affine: np.ndarray | None, result: ResultFormat) -> str:
    """Write a label map into a new temporary file in ``result``'s format and return it.

    Arguments:
      label: (H, W) for an image ("2d"), (X, Y, Z) for a volume ("3d"), small integers.
      kind: the input's kind.
      affine: the volume's voxel-to-world matrix (None for images).
      result: the format asked for.
    """
    extension = result.extension or (".png" if kind == "2d" else ".nii.gz")
    handle, path = tempfile.mkstemp(suffix=extension, prefix="medadapt_label_")
    os.close(handle)  # MONAI Label deletes the file after sending it
    data = np.asarray(label).astype(result.dtype)
    if extension == ".png":
        _write_png(data, path)
    elif kind == "2d":
        import SimpleITK as sitk

        # ITK's geometry of a PNG (what 3D Slicer shows): index (column, row, 0), spacing 1, origin 0.
        sitk.WriteImage(sitk.GetImageFromArray(data[None]), path, result.compress)
    else:
        _write_volume(data, affine, path, result.compress)
    return path


def _write_png(label: np.ndarray, path: str) -> None:
    if label.dtype == np.uint8:
        write_png_label(label, path)
        return
    from PIL import Image

    Image.fromarray(label.astype(np.uint16)).save(path)


def _write_volume(label: np.ndarray, affine: np.ndarray, path: str, compress: bool) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(label, np.asarray(affine, dtype=np.float64))
    image.set_data_dtype(label.dtype)
    if not path.endswith(NRRD):
        nib.save(image, path)
        return
    import SimpleITK as sitk

    # Through NIfTI, so the NRRD's geometry is exactly what ITK (and so 3D Slicer) reads from it.
    handle, nifti = tempfile.mkstemp(suffix=".nii", prefix="medadapt_label_")
    os.close(handle)
    try:
        nib.save(image, nifti)
        sitk.WriteImage(sitk.ReadImage(nifti), path, compress)
    finally:
        os.remove(nifti)


# ---------------------------------------------------------------------------- files clients send
def check_nrrd_header(path: str | Path, name: str) -> tuple[tuple[int, ...], int]:
    """(size per axis, components) of an NRRD file from its header alone; ImageFileError for a
    file that is not an attached-data NRRD (422) or claims more voxels than the server decodes
    (413)."""
    with open(path, "rb") as file:
        head = file.read(MAX_NRRD_HEADER)
    if not head.startswith(NRRD_MAGIC):
        raise ImageFileError(f"{name}: not a readable NRRD file (no NRRD000 magic)")
    end = head.find(b"\n\n")
    if end < 0:
        raise ImageFileError(f"{name}: NRRD header without its end (a blank line) in the first "
                             f"{MAX_NRRD_HEADER // 1024} KiB")
    for line in head[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        field = line.split(":", 1)[0].strip().lower()
        if field in DETACHED_DATA_FIELDS:
            raise ImageFileError(f"{name}: an NRRD with detached data ('{field}:') is refused; send one file with "
                                 "the data attached (3D Slicer's .nrrd)")
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("NrrdImageIO")  # never another reader chosen from the content
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ImageFileError(f"{name}: not a readable NRRD file ({str(error).strip().splitlines()[-1][:200]})") from None
    size, components = tuple(int(s) for s in reader.GetSize()), int(reader.GetNumberOfComponents())
    voxels = int(np.prod(size, dtype=np.int64)) * components
    if voxels > MAX_VOLUME_VOXELS:
        raise ImageFileError(f"{name}: NRRD of size {size} x {components} component(s) ({voxels:,} voxels) exceeds "
                             f"this server's limit of {MAX_VOLUME_VOXELS:,} voxels", status=413)
    if len(size) not in (2, 3) or components != 1:
        raise ImageFileError(f"{name}: expected a 2D or 3D NRRD with one value per voxel, got size {size} with "
                             f"{components} component(s)")
    return size, components


def _new_upload(suffix: str, beside: str | Path) -> str:
    """A new file for a converted upload: in the app's uploads folder (so refusals clean it
    up), else beside the original."""
    folder = upload_folder()
    if folder is not None:
        return folder.new_file(suffix)
    handle, path = tempfile.mkstemp(suffix=suffix, dir=Path(beside).parent)
    os.close(handle)
    return path


def nrrd_to_nifti(path: str | Path, name: str) -> str:
    """An NRRD file as a new NIfTI file (same voxels and geometry), header checked first."""
    import SimpleITK as sitk

    check_nrrd_header(path, name)
    reader = sitk.ImageFileReader()
    reader.SetImageIO("NrrdImageIO")
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise ImageFileError(f"{name}: not a readable NRRD file ({str(error).strip().splitlines()[-1][:200]})") from None
    target = _new_upload(".nii.gz", path)
    sitk.WriteImage(image, target, True)
    return target


def stored_image(path: str, name: str) -> str:
    """The image file to store or run for an uploaded ``path``: an NRRD becomes NIfTI, every
    other file is kept as it is (its own checks follow)."""
    return nrrd_to_nifti(path, name) if file_suffix(path) == NRRD else path


def stored_label(path: str, image: ImageFileInfo, name: str) -> str:
    """The label file to store for an uploaded label ``path`` of ``image``: an NRRD becomes
    NIfTI; for a 2D image a (W, H) or (W, H, 1) volume (3D Slicer's label of a PNG) becomes a
    PNG of the image's (H, W). Returns ``path`` itself when it needs no change, else a new file
    (the caller deletes it once stored)."""
    converted = nrrd_to_nifti(path, name) if file_suffix(path) == NRRD else path
    if image.kind != "2d" or file_suffix(converted) not in (".nii", ".nii.gz"):
        return converted
    try:
        return _volume_label_as_png(converted, image, name)
    finally:
        if converted != path:
            os.remove(converted)


def _volume_label_as_png(path: str, image: ImageFileInfo, name: str) -> str:
    import nibabel as nib

    height, width = image.spatial_shape
    try:
        volume = nib.load(path)
        shape = tuple(int(s) for s in volume.shape)
    except Exception as error:  # nibabel raises many types
        raise ImageFileError(f"{name}: not a readable NIfTI volume ({type(error).__name__}: {error})") from None
    if shape not in ((width, height), (width, height, 1)):
        raise InvalidInput(f"label refused: {name} is a volume of shape {shape}; a label of a 2D image of "
                           f"{width}x{height} pixels is a PNG of (H, W) = {(height, width)} or a volume of "
                           f"(W, H) = {(width, height)} or (W, H, 1) = {(width, height, 1)}", 422)
    if int(np.prod(shape)) > MAX_VOLUME_VOXELS:
        raise ImageFileError(f"{name}: label of shape {shape} exceeds this server's limit", status=413)
    data = np.asarray(volume.dataobj).reshape(width, height).T  # (column, row) -> (row, column)
    if not np.isfinite(data).all() or (data != np.rint(data)).any() or data.min() < 0 or data.max() > 255:
        raise InvalidInput(f"label refused: {name} must hold whole label values from 0 to 255", 422)
    target = _new_upload(".png", path)
    write_png_label(data.astype(np.uint8), target)
    return target
