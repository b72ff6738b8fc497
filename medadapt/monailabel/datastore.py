"""A local MONAI Label datastore that refuses files it could not serve.

Upstream's `LocalDatastore` copies any upload into the studies folder (a text file named
``x.nii.gz`` becomes an "image" that fails at inference with a 500) and builds the stored
file name from the client's image id, so an id such as ``../x`` writes outside the folder.
Here uploads are opened and checked first, ids are plain names, and a label must match its
image's kind and shape. Errors reach the client as 4xx with a message.
"""

from __future__ import annotations

import logging
from typing import Any

from monailabel.datastore.local import LocalDatastore

from medadapt.monailabel.errors import InvalidInput, http_error
from medadapt.monailabel.imagefiles import ImageFileError, discard_upload, inspect_image_file

logger = logging.getLogger("medadapt.monailabel")


def check_id(image_id: str | None) -> None:
    """Raise InvalidInput for ids that are paths rather than names."""
    if image_id is None or image_id == "":
        return  # the datastore derives the id from the file name
    if "/" in image_id or "\\" in image_id or image_id in (".", "..") or image_id.startswith("."):
        raise InvalidInput(f"image id {image_id!r} must be a plain name (no '/', '\\' or leading '.')", 400)


class CheckedDatastore(LocalDatastore):
    """`LocalDatastore` with uploads validated before they are stored."""

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        try:
            check_id(image_id)
            inspect_image_file(image_filename, read_data=True, name=f"uploaded image {image_id!r}")
        except (InvalidInput, ImageFileError) as error:
            discard_upload(image_filename)
            raise _refusal(error, "upload refused") from None
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        try:
            check_id(image_id)
            image_uri = self.get_image_uri(image_id)
            if not image_uri:
                raise InvalidInput(f"no image {image_id!r} in the datastore to attach a label to", 404)
            image = inspect_image_file(image_uri)
            label = inspect_image_file(label_filename, read_data=True, name=f"uploaded label of {image_id!r}")
            if label.kind != image.kind or label.spatial_shape != image.spatial_shape:
                raise InvalidInput(
                    f"label refused: a label for {image_id!r} must be a {image.kind.upper()} label map of shape "
                    f"{image.spatial_shape}, got {label.kind.upper()} of shape {label.spatial_shape}", 422)
        except (InvalidInput, ImageFileError) as error:
            discard_upload(label_filename)
            raise _refusal(error, "label refused") from None
        return super().save_label(image_id, label_filename, label_tag, label_info)


def _refusal(error: InvalidInput | ImageFileError, what: str):
    if isinstance(error, ImageFileError):
        error = InvalidInput(f"{what}: {error}", error.status)
    return http_error(error)

