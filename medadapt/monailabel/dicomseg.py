"""Label volumes to DICOM SEG and back, placed voxel by voxel through the geometry of the source series.

The server runs models on a series converted to NIfTI (SimpleITK's reading of the series:
its affine in RAS). A label on that grid becomes a DICOM SEG (highdicom, binary, one segment per
label value) whose frames are the source instances: each pixel of each source instance is found
in the label through the instance's own Image Position / Orientation (Patient) and Pixel
Spacing and the label's affine, so nothing depends on the order in which the files were read
or on the orientation of either grid. A label whose grid does not hold every source pixel at a
voxel centre is refused (`SegGeometryError`), rather than resampled silently.

Reading back (`read_seg`) applies the same mapping in reverse: SEG frames by source instance
into a label volume on the series' NIfTI grid. The label values are restored from the
segments' property type codes written here (scheme ``99MEDADAPT``, code ``L<value>``); other
SEGs map segment number N to value N.

MONAI Label 0.8.5 writes SEGs with dcmqi's ``itkimage2segimage`` binary, which it downloads
from GitHub at start (impossible offline) and which is not on PyPI; highdicom is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger("medadapt.monailabel")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
VALUE_SCHEME = "99MEDADAPT"  # a private coding scheme ("99" prefix): label values of segments
GRID_TOLERANCE = 1e-2  # voxels: a source pixel centre must lie this close to a label voxel centre
# Patient and study attributes a SEG must carry (DICOM type 2: present, possibly empty), which
# highdicom copies from the source instances and fails on (AttributeError) when one is missing.
TYPE2_SOURCE_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                           "StudyID", "AccessionNumber", "ReferringPhysicianName")


class SegGeometryError(ValueError):
    """A label that does not lie on the source series' grid (or a series without geometry)."""


def read_series(series_dir: str | Path):
    """The DICOM instances of a series folder (pixel data included) that have pixel data."""
    import pydicom

    datasets = []
    for path in sorted(Path(series_dir).iterdir()):
        if path.is_file():
            ds = pydicom.dcmread(str(path))
            if "PixelData" in ds:
                datasets.append(ds)
    if not datasets:
        raise SegGeometryError(f"series folder {series_dir} holds no DICOM images")
    return datasets


def series_geometry_problem(series_dir: str | Path) -> str | None:
    """Why the DICOM series in ``series_dir`` cannot be read as a volume with trustworthy
    geometry, or None. A reader that stacks slices (SimpleITK, GDCM) guesses where the
    geometry is missing or irregular: a spacing of 1 mm without Image Position (Patient), one
    averaged spacing over slices that are not evenly spaced. Refused here: instances without
    Image Position / Orientation (Patient) or Pixel Spacing, or of other orientations,
    spacings or sizes; multi-frame instances (their per-frame geometry is not read); slices
    that share a position, or lie more than a tenth of a voxel off an even stack along the
    slice normal, or shifted within their plane (a tilted gantry)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in Path(series_dir).iterdir() if p.is_file())
    geometry = []
    for path in files:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as error:
            return f"its file {path.name} is not readable DICOM ({type(error).__name__})"
        name = f"instance {getattr(ds, 'SOPInstanceUID', path.name)}"
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            return f"{name} holds several frames, whose per-frame geometry this server does not read"
        values = {}
        for keyword, count in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6), ("PixelSpacing", 2)):
            try:
                values[keyword] = np.asarray([float(v) for v in ds[keyword].value], dtype=np.float64)
            except (KeyError, TypeError, ValueError):
                return f"{name} has no usable {keyword}"
            if values[keyword].shape != (count,) or not np.isfinite(values[keyword]).all():
                return f"{name} has a malformed {keyword} {list(values[keyword])}"
        if (values["PixelSpacing"] <= 0).any():
            return f"{name} has a Pixel Spacing of {list(values['PixelSpacing'])}"
        geometry.append((values, (int(getattr(ds, "Rows", 0)), int(getattr(ds, "Columns", 0)))))
    if not geometry:
        return "it holds no DICOM instances"
    return _stack_problem(geometry)


def _stack_problem(geometry: list) -> str | None:
    """`series_geometry_problem` for the instances' ({keyword: values}, (rows, columns))."""
    first, size = geometry[0]
    for values, other_size in geometry[1:]:
        if other_size != size:
            return f"its instances differ in size ({size} and {other_size})"
        for keyword in ("ImageOrientationPatient", "PixelSpacing"):
            if not np.allclose(values[keyword], first[keyword], atol=1e-4):
                return f"its instances differ in {keyword} ({list(first[keyword])} and {list(values[keyword])})"
    along_row, along_column = first["ImageOrientationPatient"][:3], first["ImageOrientationPatient"][3:]
    if (abs(np.linalg.norm(along_row) - 1) > 1e-3 or abs(np.linalg.norm(along_column) - 1) > 1e-3
            or abs(along_row @ along_column) > 1e-3):
        return f"its Image Orientation (Patient) {list(first['ImageOrientationPatient'])} is not two orthogonal " \
               "unit vectors"
    if len(geometry) == 1:
        return None
    normal = np.cross(along_row, along_column)
    positions = np.stack([values["ImagePositionPatient"] for values, _ in geometry])
    depth = np.sort(positions @ normal)
    gaps = np.diff(depth)
    if gaps.min() < 1e-3:
        return "two of its instances lie at the same position (repeated slices)"
    step = (depth[-1] - depth[0]) / (len(depth) - 1)
    off_grid = np.abs(depth - (depth[0] + step * np.arange(len(depth)))).max()
    if off_grid > 0.1 * step:
        return (f"its slices are not evenly spaced: gaps from {gaps.min():.4g} to {gaps.max():.4g} mm "
                "(a missing or misplaced slice)")
    in_plane = positions - np.outer(positions @ normal, normal)
    shift = np.linalg.norm(in_plane - in_plane[0], axis=1).max()
    if shift > 0.1 * first["PixelSpacing"].min():
        return f"its slices are shifted within their plane by up to {shift:.4g} mm (a tilted gantry or a mixed stack)"
    return None


def pixel_indices(dataset, affine: np.ndarray) -> np.ndarray:
    """Voxel indices (rows, cols, 3) of the label grid ``affine`` (RAS) at every pixel centre
    of a source instance, as floats."""
    try:
        origin = np.asarray(dataset.ImagePositionPatient, dtype=np.float64)
        orientation = np.asarray(dataset.ImageOrientationPatient, dtype=np.float64)
        row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
    except (AttributeError, TypeError, ValueError) as error:
        raise SegGeometryError(f"instance {getattr(dataset, 'SOPInstanceUID', '?')} has no usable Image Position / "
                               f"Orientation (Patient) or Pixel Spacing: {error}") from None
    along_row, along_column = orientation[:3], orientation[3:]  # directions of increasing column / row index
    rows, cols = int(dataset.Rows), int(dataset.Columns)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    lps = (origin + c[..., None] * column_spacing * along_row + r[..., None] * row_spacing * along_column)
    ras = lps @ LPS_TO_RAS.T
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return ras @ inverse[:3, :3].T + inverse[:3, 3]


def _voxel_lookup(dataset, affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Integer voxel indices (i, j, k), each (rows, cols), of a source instance's pixels."""
    indices = pixel_indices(dataset, affine)
    rounded = np.rint(indices)
    if np.abs(indices - rounded).max() > GRID_TOLERANCE:
        raise SegGeometryError("the label's grid does not match the series: source pixel centres fall between "
                               "label voxels (send the label on the grid of the image the server gave)")
    rounded = rounded.astype(np.int64)
    if (rounded < 0).any() or (rounded >= np.asarray(shape[:3])).any():
        raise SegGeometryError("the label's grid does not cover the series: source pixels lie outside the label "
                               f"volume of shape {tuple(shape[:3])}")
    return rounded[..., 0], rounded[..., 1], rounded[..., 2]


def label_frames(label: np.ndarray, affine: np.ndarray, datasets: Sequence) -> np.ndarray:
    """The label sampled at every source instance's pixels: (instances, rows, cols)."""
    label = np.asarray(label)
    return np.stack([label[_voxel_lookup(ds, affine, label.shape)] for ds in datasets])


def write_seg(label: np.ndarray, affine: np.ndarray, series_dir: str | Path, segment_names: Mapping[int, str],
              path: str | Path, algorithm: str = "medadapt", series_description: str | None = None,
              manual: bool = False):
    """Write ``label`` (a label map on the grid ``affine``) as a DICOM SEG of the series in
    ``series_dir``; returns the SEG dataset.

    Arguments:
      label: (X, Y, Z) integer label map; 0 is background, every other value a segment.
      affine: the label's voxel-to-RAS matrix (the series' NIfTI affine).
      series_dir: the source series' DICOM files.
      segment_names: label value -> name (values without a name are called "label <value>").
      path: the file to write.
      algorithm: the model name, recorded as the segmentation algorithm.
      series_description: of the new SEG series (default "<algorithm> segmentation").
      manual: the label was edited by a person (SegmentAlgorithmType MANUAL, else AUTOMATIC).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import medadapt

    datasets = read_series(series_dir)
    for dataset in datasets:  # a source series may lack them (no PatientBirthDate): empty, as DICOM allows
        for keyword in TYPE2_SOURCE_ATTRIBUTES:
            if keyword not in dataset:
                setattr(dataset, keyword, "")
    frames = label_frames(label, affine, datasets)
    values = [int(v) for v in np.unique(frames) if v != 0]
    if not values:
        raise SegGeometryError("the label is empty (only background): a DICOM SEG needs at least one segment")
    identification = hd.AlgorithmIdentificationSequence(name=algorithm[:64], family=codes.DCM.ArtificialIntelligence,
                                                        version=medadapt.__version__)
    descriptions = []
    for number, value in enumerate(values, start=1):
        name = str(segment_names.get(value) or f"label {value}")[:64]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical structure"),
            segmented_property_type=hd.sr.CodedConcept(f"L{value}", VALUE_SCHEME, name),
            algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.MANUAL if manual
                            else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC),
            algorithm_identification=None if manual else identification,
        ))
    masks = np.stack([frames == value for value in values], axis=-1)  # (instances, rows, cols, segments)
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medadapt",
        manufacturer_model_name=algorithm[:64],
        software_versions=medadapt.__version__,
        device_serial_number="0",
        series_description=(series_description or f"{algorithm} segmentation")[:64],
        omit_empty_frames=False,  # every source instance has its frame: readers need not infer empties
    )
    seg.save_as(str(path))
    logger.info("DICOM SEG %s: %d segment(s) %s over %d source instance(s)", path, len(values),
                dict(zip(values, (d.SegmentLabel for d in descriptions))), len(datasets))
    return seg


def segment_values(seg) -> dict[int, int]:
    """Segment number -> label value: from this module's codes, else the segment number."""
    values = {}
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        value = number
        for code in getattr(item, "SegmentedPropertyTypeCodeSequence", []):
            text = str(getattr(code, "CodeValue", ""))
            if getattr(code, "CodingSchemeDesignator", "") == VALUE_SCHEME and text[1:].isdigit():
                value = int(text[1:])
        values[number] = value
    return values


def read_seg(seg_path: str | Path, series_dir: str | Path, shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """A SEG of the series in ``series_dir`` as a uint8 label map of ``shape`` on the grid
    ``affine`` (later segments painted over earlier ones where they overlap)."""
    import highdicom as hd

    seg = hd.seg.segread(str(seg_path))
    datasets = read_series(series_dir)
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    datasets = [ds for ds in datasets if ds.SOPInstanceUID in referenced]
    if not datasets:
        raise SegGeometryError(f"{os.path.basename(seg_path)} references none of the instances in {series_dir}")
    values = segment_values(seg)
    numbers = sorted(values)
    pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in datasets], segment_numbers=numbers)
    label = np.zeros(tuple(shape[:3]), dtype=np.uint8)
    for ds, frame in zip(datasets, pixels):
        index = _voxel_lookup(ds, affine, shape)
        for channel, number in enumerate(numbers):
            label[tuple(i[frame[..., channel] > 0] for i in index)] = values[number]
    return label
