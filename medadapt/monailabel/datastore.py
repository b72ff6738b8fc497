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
  match its image's kind and shape, and an upload never replaces an existing image; an NRRD
  image or label (3D Slicer's format) is stored as NIfTI, and a (W, H) or (W, H, 1) volume
  label of a 2D image (3D Slicer's label of a PNG) as a PNG (`medadapt.monailabel.formats`);
- links are followed only where they stay inside the studies folder: an image or label that
  is a link leading outside is not listed, read, written or deleted (upstream deleted a link's
  target, a whole folder for a folder link), and deleting a served link removes the link;
- every image, label and record file is written to a temporary file and renamed over the old
  one (`ConfinedFiles`, shared with the DICOMweb datastore's cache): a kill or a full disk
  leaves the old file or the new one, never a torn label that training then fails on.

Errors reach the client as 4xx with a message.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.exception import ImageNotFoundException

from medadapt.io import atomic_copy, atomic_write_text
from medadapt.monailabel.errors import InvalidInput, http_error
from medadapt.monailabel.formats import stored_image, stored_label
from medadapt.monailabel.imagefiles import (
    ImageFileError,
    discard_upload,
    inspect_image_file,
)
from medadapt.monailabel.paths import confined, plain_name, resolves_inside

logger = logging.getLogger("medadapt.monailabel")


def check_id(image_id: str | None) -> None:
    """Raise InvalidInput for a new image id that is not a plain name ("" or None: the
    datastore derives the id from the file name, which is checked the same way)."""
    if image_id is None or image_id == "":
        return
    plain_name(image_id, "image id")


class ConfinedFiles(LocalDatastore):
    """`LocalDatastore`'s writes, each through a temporary file and a rename and inside the
    datastore folder (links followed): image and label copies and the record file
    (``datastore_v2.json``, which upstream rewrites in place and cannot start from when torn)."""

    def _update_datastore_file(self, lock: bool = True) -> None:
        def write() -> None:
            self._ignore_event_config = True
            atomic_write_text(self._datastore_config_path,
                              json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str))
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def _copy_in(self, source: str, folder: str, name: str, what: str) -> None:
        """Copy ``source`` to ``folder/name`` atomically; InvalidInput 409 if the folder leads
        outside the datastore folder (an operator's link), so nothing is written there, and 507
        if the disk refuses the copy (full), the file there before being unchanged."""
        root = self._datastore_path
        if not resolves_inside(folder, root):
            raise InvalidInput(f"{what}: the folder {folder} leads outside {root} (a link); this server writes "
                               "only inside it", 409)
        try:
            os.makedirs(folder, exist_ok=True)
            atomic_copy(source, confined(root, os.path.relpath(folder, root), name, what=what))
        except OSError as error:
            raise InvalidInput(f"{what}: the server could not store it ({error.strerror or error}); the file it "
                               "had is unchanged", 507) from None

    def _add_image_file(self, image_id: str, source: str, info: dict[str, Any] | None) -> str:
        """Upstream's add_image, its copy atomic and confined."""
        _, ext = self._to_id(os.path.basename(source))
        name = self._filename(image_id, ext)
        with FileLock(self._lock_file):
            self._copy_in(source, self._datastore.image_path(), name, f"image {image_id!r}")
            info = {**(info or {}), "ts": int(time.time()), "name": name}
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        return image_id

    def _add_label_file(self, image_id: str, source: str, tag: str, info: dict[str, Any] | None) -> str:
        """Upstream's save_label, its copy atomic and confined."""
        record = self._datastore.objects.get(image_id)
        if not record:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, ext = self._to_id(os.path.basename(source))
        name = self._filename(image_id, ext)
        with FileLock(self._lock_file):
            self._copy_in(source, self._datastore.label_path(tag), name, f"label of {image_id!r} with tag {tag!r}")
            record.labels[tag] = DataModel(info={**(info or {}), "ts": int(time.time()), "name": name}, ext=ext)
            self._update_datastore_file(lock=False)
        return image_id


class CheckedDatastore(ConfinedFiles):
    """`LocalDatastore` with uploads validated before they are stored and paths confined."""

    # Paths logged as leading outside, each logged once. A class attribute: upstream's __init__
    # lists the folder before a subclass's __init__ could set one.
    _not_served: set[str] = set()

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
        # hand to point elsewhere, or a link leading outside, is treated as absent, so nothing
        # outside is read, written or deleted.
        try:
            path = confined(self._datastore_path, *parts, what="datastore record")
        except InvalidInput as error:
            logger.warning("ignored: %s", error)
            return ""
        return path if self._served(path) else ""

    def _served(self, path: str) -> bool:
        if resolves_inside(path, self._datastore_path):
            return True
        if path not in self._not_served:
            self._not_served.add(path)
            logger.warning("not served: %s is a link leading outside the studies folder %s (to %s)", path,
                           self._datastore_path, os.path.realpath(path))
        return False

    def _list_files(self, path: str, patterns) -> dict[str, str]:
        # What upstream lists as images and labels: links leading outside are left out.
        listed = super()._list_files(path, patterns)
        return {name: file for name, file in listed.items()
                if self._served(os.path.normpath(os.path.join(path, file)))}

    def _remove_non_existing(self) -> int:
        # Records of files no longer served (a link made to lead outside since) go too.
        removed = super()._remove_non_existing()
        for image_id, record in list(self._datastore.objects.items()):
            if not self._image_file(image_id):
                del self._datastore.objects[image_id]
                removed += 1
                continue
            for tag in [tag for tag in record.labels if not self._label_file(image_id, tag)]:
                del record.labels[tag]
                removed += 1
        return removed

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
        converted = image_filename
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
            converted = stored_image(image_filename, f"uploaded image {new_id!r}")
            inspect_image_file(converted, read_data=True, name=f"uploaded image {new_id!r}")
            return self._add_image_file(new_id, converted, image_info)
        except (InvalidInput, ImageFileError) as error:
            discard_upload(image_filename)
            raise _refusal(error, "upload refused") from None
        finally:
            if converted != image_filename:
                _remove_entry(converted)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        converted = label_filename
        try:
            plain_name(label_tag, "label tag")
            image_uri = self.get_image_uri(image_id)
            if not image_uri:
                raise InvalidInput(f"no image {image_id!r} in the datastore to attach a label to", 404)
            ext = self._to_id(os.path.basename(label_filename))[1]
            confined(self._datastore_path, self._datastore.labels_dir, label_tag, self._filename(image_id, ext),
                     what=f"label of {image_id!r} with tag {label_tag!r}")
            image = inspect_image_file(image_uri)
            converted = stored_label(label_filename, image, f"uploaded label of {image_id!r}")
            label = inspect_image_file(converted, read_data=True, name=f"uploaded label of {image_id!r}")
            if label.kind != image.kind or label.spatial_shape != image.spatial_shape:
                raise InvalidInput(
                    f"label refused: a label for {image_id!r} must be a {image.kind.upper()} label map of shape "
                    f"{image.spatial_shape}, got {label.kind.upper()} of shape {label.spatial_shape}", 422)
            return self._add_label_file(image_id, converted, label_tag, label_info)
        except (InvalidInput, ImageFileError) as error:
            discard_upload(label_filename)
            raise _refusal(error, "label refused") from None
        finally:
            if converted != label_filename:
                _remove_entry(converted)

    # Upstream deletes the real path of an entry: through a link, its target (rmtree for a folder).
    def remove_image(self, image_id: str) -> None:
        self._require_image(image_id)
        for tag in list(self._datastore.objects[image_id].labels):
            _remove_entry(self._label_file(image_id, tag))
        _remove_entry(self._image_file(image_id))
        self._forget_removed()

    def remove_label(self, label_id: str, label_tag: str) -> None:
        self._require_label(label_id, label_tag)
        _remove_entry(self._label_file(label_id, label_tag))
        self._forget_removed()

    def _forget_removed(self) -> None:
        # As upstream: with auto-reload the file watcher's thread reconciles the records, and a
        # second reconciliation here at the same time would change them under its feet.
        if not self._auto_reload:
            self.refresh()

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


def _remove_entry(path: str) -> None:
    """Delete the folder entry ``path`` itself: a link is unlinked, never followed."""
    if not path:
        return
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _refusal(error: InvalidInput | ImageFileError, what: str) -> HTTPException:
    if isinstance(error, ImageFileError):
        error = InvalidInput(f"{what}: {error}", error.status)
    return http_error(error)
