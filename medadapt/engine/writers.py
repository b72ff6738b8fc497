"""Prediction writers for the inference configs: NIfTI label maps, PNG masks, a CSV of class
probabilities. Each file is written atomically and named after its input case."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd, MapTransform

from medadapt.engine.transforms import RegionsToLabelsd
from medadapt.io import atomic_path, atomic_write_text


def case_name(meta: dict) -> str:
    source = meta.get("filename_or_obj", "case")
    if isinstance(source, (list, tuple)):
        source = source[0]
    name = Path(str(source)).name
    for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _meta(d: dict, key: str) -> dict:
    value = d.get(key)
    return dict(getattr(value, "meta", {}) or {})


class WriteNiftid(MapTransform):
    """Write ``key`` (1, X, Y, Z) as ``<output_dir>/<case>_seg.nii.gz`` with the affine of the
    input image, after ``Invertd`` has put it back on the input's grid."""

    def __init__(self, keys: KeysCollection, output_dir: str, image_key: str = "image", dtype=np.uint8):
        super().__init__(keys)
        self.output_dir, self.image_key, self.dtype = Path(output_dir), image_key, dtype

    def __call__(self, data):
        import nibabel as nib

        d = dict(data)
        image_meta = _meta(d, self.image_key)
        for key in self.key_iterator(d):
            value = d[key]
            meta = dict(getattr(value, "meta", {}) or {})
            affine = np.asarray(meta.get("affine", image_meta.get("original_affine")), dtype=np.float64)
            array = np.asarray(torch.as_tensor(value).detach().cpu())[0].astype(self.dtype)
            path = self.output_dir / f"{d.get('case') or case_name(image_meta or meta)}_seg.nii.gz"
            with atomic_path(path) as tmp:
                nib.save(nib.Nifti1Image(array, affine), str(tmp))
            d[f"{key}_path"] = str(path)
        return d


class WritePngd(MapTransform):
    """Write a binary mask ``key`` (1, H, W) as an 8-bit PNG (0 / 255) named ``<case><suffix>``."""

    def __init__(self, keys: KeysCollection, output_dir: str, suffix: str = "_mask.png", image_key: str = "image"):
        super().__init__(keys)
        self.output_dir, self.suffix, self.image_key = Path(output_dir), suffix, image_key

    def __call__(self, data):
        from PIL import Image

        d = dict(data)
        for key in self.key_iterator(d):
            mask = np.asarray(torch.as_tensor(d[key]).detach().cpu())[0] > 0.5
            path = self.output_dir / f"{d.get('case') or case_name(_meta(d, self.image_key))}{self.suffix}"
            buffer = io.BytesIO()
            Image.fromarray((mask * 255).astype(np.uint8)).save(buffer, format="PNG")
            with atomic_path(path) as tmp:
                tmp.write_bytes(buffer.getvalue())
            d[f"{key}_path"] = str(path)
        return d


class WriteClassProbabilitiesd(MapTransform):
    """Append each case's class probabilities to ``<output_dir>/predictions.csv`` (rewritten
    atomically after every case, so the file is always complete)."""

    def __init__(self, keys: KeysCollection, output_dir: str, class_names: list[str], image_key: str = "image"):
        super().__init__(keys)
        self.path = Path(output_dir) / "predictions.csv"
        self.class_names, self.image_key = list(class_names), image_key
        self.rows: list[list] = []

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            probs = torch.as_tensor(d[key]).detach().cpu().float().reshape(-1).softmax(dim=0)
            if len(probs) != len(self.class_names):
                raise ValueError(f"model gives {len(probs)} classes, the config names {len(self.class_names)}")
            best = int(probs.argmax())
            self.rows.append([d.get("case") or case_name(_meta(d, self.image_key)), self.class_names[best],
                              *[f"{p:.6f}" for p in probs.tolist()]])
            out = io.StringIO()
            writer = csv.writer(out)
            writer.writerow(["case", "prediction", *self.class_names])
            writer.writerows(self.rows)
            atomic_write_text(self.path, out.getvalue())
        return d


def prediction_writer(task: str, dataset: str, output_dir: str, preprocessing, release: str = "auto",
                      class_names: list[str] | None = None) -> Compose:
    """The inference post-processing of a bundle: activation, back to the input's grid, file."""
    if task == "classification":
        return Compose([WriteClassProbabilitiesd("pred", output_dir, class_names or [])])
    steps = [
        Activationsd(keys="pred", sigmoid=True),
        AsDiscreted(keys="pred", threshold=0.5),
        # Undo orientation, spacing and resizing so the prediction lies on the input's grid.
        Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=True, to_tensor=True),
    ]
    if task == "segmentation3d":
        # "auto" reads the release from the file names; predictions default to 2021 labels.
        labels = "2021" if release == "auto" else release
        steps += [RegionsToLabelsd("pred", release=labels), WriteNiftid("pred", output_dir)]
    else:
        suffix = "_segmentation.png" if dataset.startswith("isic") else "_mask.png"
        steps.append(WritePngd("pred", output_dir, suffix=suffix))
    return Compose(steps)
