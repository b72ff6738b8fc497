"""Prediction writers for the inference configs: NIfTI label maps, PNG masks, a CSV of class
probabilities. Each file is written atomically and named after its input with ``_pred``, so
a prediction never takes the name of a ground-truth file (``_seg``, ``_mask``...)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from medadapt.data.dataset import case_name as file_case_name
from medadapt.io import atomic_path, atomic_write_text

SUFFIX = "_pred"


def case_name(meta: dict) -> str:
    source = meta.get("filename_or_obj", "case")
    if isinstance(source, (list, tuple)):
        source = source[0]
    return file_case_name(str(source))


def _meta(d: dict, key: str) -> dict:
    value = d.get(key)
    return dict(getattr(value, "meta", {}) or {})


def _case(d: dict, key: str, image_key: str) -> str:
    return str(d.get("case") or case_name(_meta(d, image_key) or _meta(d, key)))


def label_affine(d: dict, key: str, image_key: str = "image") -> np.ndarray:
    """The voxel-to-world matrix of a label map ``key`` that ``Invertd`` put back on the grid of
    the input ``image_key``: its own, else the input's original one."""
    return np.asarray(_meta(d, key).get("affine", _meta(d, image_key).get("original_affine")), dtype=np.float64)


def class_probabilities(logits) -> torch.Tensor:
    """A classifier's logits (any shape holding K values) as softmax probabilities (uncalibrated)."""
    return torch.as_tensor(logits).detach().cpu().float().reshape(-1).softmax(dim=0)


class WriteNiftid(MapTransform):
    """Write ``key`` (1, X, Y, Z) as ``<output_dir>/<case>_pred.nii.gz`` with the affine of the
    input image, after ``Invertd`` has put it back on the input's grid."""

    def __init__(self, keys: KeysCollection, output_dir: str, image_key: str = "image", dtype=np.uint8,
                 suffix: str = SUFFIX + ".nii.gz"):
        super().__init__(keys)
        self.output_dir, self.image_key, self.dtype, self.suffix = Path(output_dir), image_key, dtype, suffix

    def __call__(self, data):
        import nibabel as nib

        d = dict(data)
        for key in self.key_iterator(d):
            affine = label_affine(d, key, self.image_key)
            array = np.asarray(torch.as_tensor(d[key]).detach().cpu())[0].astype(self.dtype)
            path = self.output_dir / f"{_case(d, key, self.image_key)}{self.suffix}"
            with atomic_path(path) as tmp:
                nib.save(nib.Nifti1Image(array, affine), str(tmp))
            d[f"{key}_path"] = str(path)
        return d


class WritePngd(MapTransform):
    """Write a label map ``key`` (1, H, W) as an 8-bit PNG named ``<case>_pred.png``: a binary
    mask as 0 / 255 (visible in any viewer), class indices as they are."""

    def __init__(self, keys: KeysCollection, output_dir: str, suffix: str = SUFFIX + ".png", image_key: str = "image",
                 binary: bool = True):
        super().__init__(keys)
        self.output_dir, self.suffix, self.image_key, self.binary = Path(output_dir), suffix, image_key, binary

    def __call__(self, data):
        from PIL import Image

        d = dict(data)
        for key in self.key_iterator(d):
            values = np.asarray(torch.as_tensor(d[key]).detach().cpu())[0]
            pixels = (values > 0.5) * 255 if self.binary else np.rint(values)
            path = self.output_dir / f"{_case(d, key, self.image_key)}{self.suffix}"
            buffer = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
            with atomic_path(path) as tmp:
                tmp.write_bytes(buffer.getvalue())
            d[f"{key}_path"] = str(path)
        return d


class WriteClassProbabilitiesd(MapTransform):
    """Append each case's class probabilities to ``<output_dir>/predictions.csv`` (rewritten
    atomically after every case, so the file is always complete). The probabilities are the
    model's softmax outputs, not calibrated; the file's header says so."""

    def __init__(self, keys: KeysCollection, output_dir: str, class_names: list[str], image_key: str = "image"):
        super().__init__(keys)
        self.path = Path(output_dir) / "predictions.csv"
        self.class_names, self.image_key = list(class_names), image_key
        self.rows: list[list] = []

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            probs = class_probabilities(d[key])
            if len(probs) != len(self.class_names):
                raise ValueError(f"model gives {len(probs)} classes, the config names {len(self.class_names)}")
            best = int(probs.argmax())
            self.rows.append([_case(d, key, self.image_key), self.class_names[best],
                              *[f"{p:.6f}" for p in probs.tolist()]])
            out = io.StringIO()
            writer = csv.writer(out)
            writer.writerow(["case", "prediction", *[f"p_{name} (uncalibrated)" for name in self.class_names]])
            writer.writerows(self.rows)
            atomic_write_text(self.path, out.getvalue())
        return d
