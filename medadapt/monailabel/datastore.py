"""A local MONAI Label datastore that refuses files it could not serve and keeps every path inside.

Upstream's `LocalDatastore` copies any upload into the studies folder (a text file named
``x.nii.gz`` becomes an "image" that fails at inference with a 500), builds stored file names
from the client's image id and label folders from the client's tag (``tag=../../x`` or
``tag=/tmp/x`` writes and creates folders outside the studies folder), and overwrites an
image when an upload reuses its id. Here:

- names a request sends (new image ids, label tags) must be plain names (`plain_name`);
- every image and label path is built in `_image_file` / `_label_file` and confined to the
  studies folder (`confined`), whatever the stored records say;
- uploads are opened and checked first (size from the header, then the data), a label must
  match its image's kind and shape, and an upload never replaces an existing image.

Errors reach the client as 4xx with a message.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from medadapt.monailabel.errors import InvalidInput, http_error
from medadapt.monailabel.imagefiles import ImageFileError, discard_upload, inspect_image_file
from medadapt.monailabel.paths import confined, plain_name

logger = logging.getLogger("medadapt.monailabel")


def check_id(image_id: str | None) -> None:
    """Raise InvalidInput for a new image id that is not a plain name ("" or None: the
    datastore derives the id from the file name, which is checked the same way)."""
    if image_id is None or image_id == "":
        return
    plain_name(image_id, "image id")


class CheckedDatastore(LocalDatastore):
    """`LocalDatastore` with uploads validated before they are stored and paths confined."""

    # ------------------------------------------------------------------ the only path builders
    def _image_file(self, image_id: str) -> str:
        """The image file of a stored id inside the studies folder, or "" if there is none."""
        obj = self._datastore.objects.get(image_id)
        if not obj:
            return ""
        return self._inside(self._datastore.images_dir, self._filename(image_id, obj.image.ext))

    def _label_file(self, image_id: str, tag: str) -> str:
        """The label file of a stored id and tag inside the studies folder, or "" if none."""
        label = self._datastore.label(image_id, tag)
        if not label:
            return ""
        return self._inside(self._datastore.labels_dir, tag, self._filename(image_id, label.ext))

    def _inside(self, *parts: str) -> str:
        # Records come from the studies folder's listing or from checked requests; one edited by
        # hand to point elsewhere is treated as absent, so nothing outside is read or written.
        try:
            return confined(self._datastore_path, *parts, what="datastore record")
        except InvalidInput as error:
            logger.warning("ignored: %s", error)
            return ""

    def get_image_uri(self, image_id: str) -> str:
        return self._image_file(image_id)

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return self._label_file(label_id, label_tag)

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        info = super().get_image_info(image_id)
        if info:
            info["path"] = self._image_file(image_id)
        return info

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        pairs = [{"image": self._image_file(image_id), "label": self._label_file(image_id, "final")}
                 for image_id in self._datastore.filter_by_tag("final")]
        pairs = [pair for pair in pairs if pair["image"] and pair["label"]]
        if not full_path:
            pairs = [{key: os.path.relpath(path, self._datastore_path) for key, path in pair.items()} for pair in pairs]
        return pairs

    # ------------------------------------------------------------------ writes
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        try:
            new_id = image_id or self._to_id(os.path.basename(image_filename))[0]
            check_id(new_id)
            if new_id in self._datastore.objects:
                raise InvalidInput(f"image id {new_id!r} is already in the datastore; upload under another id or "
                                   f"remove it first (DELETE /datastore/image?id={new_id})", 409)
            ext = self._to_id(os.path.basename(image_filename))[1]
            destination = confined(self._datastore_path, self._datastore.images_dir, self._filename(new_id, ext),
                                   what=f"image {new_id!r}")
            if os.path.lexists(destination):
                raise InvalidInput(f"image id {new_id!r}: the studies folder already holds "
                                   f"{os.path.basename(destination)}; upload under another id", 409)
            inspect_image_file(image_filename, read_data=True, name=f"uploaded image {new_id!r}")
        except (InvalidInput, ImageFileError) as error:
            discard_upload(image_filename)
            raise _refusal(error, "upload refused") from None
        return super().add_image(new_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        try:
            plain_name(label_tag, "label tag")
            image_uri = self.get_image_uri(image_id)
            if not image_uri:
                raise InvalidInput(f"no image {image_id!r} in the datastore to attach a label to", 404)
            ext = self._to_id(os.path.basename(label_filename))[1]
            confined(self._datastore_path, self._datastore.labels_dir, label_tag, self._filename(image_id, ext),
                     what=f"label of {image_id!r} with tag {label_tag!r}")
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

    def remove_image(self, image_id: str) -> None:
        self._require_image(image_id)
        super().remove_image(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        self._require_label(label_id, label_tag)
        super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        self._require_image(image_id)
        super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        self._require_label(label_id, label_tag)
        super().update_label_info(label_id, label_tag, info)

    # Upstream raises exceptions that reach the client as 500 for unknown ids and tags.
    def _require_image(self, image_id: str) -> None:
        if not self._image_file(image_id):
            raise HTTPException(404, f"no image {image_id!r} in the datastore")

    def _require_label(self, image_id: str, tag: str) -> None:
        if not self._label_file(image_id, tag):
            raise HTTPException(404, f"no label of image {image_id!r} with tag {tag!r} in the datastore")


def _refusal(error: InvalidInput | ImageFileError, what: str) -> HTTPException:
    if isinstance(error, ImageFileError):
        error = InvalidInput(f"{what}: {error}", error.status)
    return http_error(error)
