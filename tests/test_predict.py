"""``medadapt.predict``: one image through the bundle's own inference, from a model, an adapter
folder or a bundle; the same labels and probabilities the bundle's inference.json writes."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from test_bundles import _as_a_user_edits_it, run_bundle
from test_export import cli, tiny, write_trained_files

import medadapt
from medadapt.data import get_dataset
from medadapt.engine.bundle import export_bundle


def trained(bundle: str, checkpoint: Path, tmp_path: Path, **values) -> tuple[Path, dict]:
    """The files training leaves (adapters, model.pt) and the settings it ran with."""
    values = {**tiny(bundle, checkpoint), **values}
    models = tmp_path / "models"
    write_trained_files(bundle, values, models)
    return models, values


def bundle_writes(bundle: str, values: dict, models: Path, data: Path, out: Path) -> Path:
    """What the bundle's inference.json writes for the cases of ``data``."""
    run_bundle(f"bundles/{bundle}/inference.json", *cli({**values, "dataset_dir": str(data)}),
               "--model_file", str(models / "model.pt"), "--output_dir", str(out))
    return out


def test_a_2d_mask_from_an_adapter_folder_a_model_and_a_bundle_is_what_the_bundle_writes(tiny_checkpoint, tmp_path):
    bundle = "dka_busi_seg"
    models, values = trained(bundle, tiny_checkpoint, tmp_path)
    data = Path(get_dataset("busi").make_demo(tmp_path / "busi", per_class=2, size=(40, 52)))
    image = min(data.rglob("malignant (1).png"))
    written = np.asarray(Image.open(bundle_writes(bundle, values, models, data, tmp_path / "out") / "malignant (1)_pred.png"))

    # An adapter folder inside no bundle: the bundle named; the settings it was trained with.
    from_folder = medadapt.predict(models / "best_adapters", image, bundle=bundle,
                                   **values)
    assert from_folder.task == "segmentation" and from_folder.class_names == ["lesion"]
    assert from_folder.labels.shape == (40, 52) and from_folder.affine is None   # the input's own size
    assert np.array_equal(from_folder.labels * 255, written) and written.any()
    # A model in memory, and a bundle folder with its published model.pt (settings in its configs).
    model = medadapt.load_model(models / "best_adapters", backbone_checkpoint=values["backbone_checkpoint"])
    assert np.array_equal(medadapt.predict(model, image, bundle=bundle, **values).labels, from_folder.labels)
    zoo = export_bundle(bundle, tmp_path / "zoo", model=models / "model.pt")
    _as_a_user_edits_it(zoo, bundle)
    assert np.array_equal(medadapt.predict(zoo, image).labels, from_folder.labels)
    # An adapter folder inside a bundle's folder (a run of it) names its bundle.
    inside = zoo / "runs" / "a_run" / "models" / "best_adapters"
    shutil.copytree(models / "best_adapters", inside)
    assert np.array_equal(medadapt.predict(inside, image, backbone_checkpoint=values["backbone_checkpoint"]).labels,
                          from_folder.labels)

    with pytest.raises(ValueError, match="needs the bundle"):
        medadapt.predict(model, image)
    with pytest.raises(ValueError, match="built for task 'segmentation', and bundle dka_busi_cls"):
        medadapt.predict(model, image, bundle="dka_busi_cls", **values)
    with pytest.raises(FileNotFoundError, match="no image file .*missing.png"):
        medadapt.predict(model, tmp_path / "missing.png", bundle=bundle, **values)


def test_class_probabilities_are_the_ones_the_bundle_writes(tiny_checkpoint, tmp_path):
    bundle = "dka_busi_cls"
    models, values = trained(bundle, tiny_checkpoint, tmp_path)
    data = Path(get_dataset("busi").make_demo(tmp_path / "busi", per_class=2, size=(40, 52)))
    image = min(data.rglob("benign (2).png"))
    rows = list(csv.reader((bundle_writes(bundle, values, models, data, tmp_path / "out") / "predictions.csv").open()))
    row = next(r for r in rows if r[0] == "benign (2)")
    prediction = medadapt.predict(models / "best_adapters", image, bundle=bundle,
                                  **values)
    assert list(prediction.probabilities) == ["benign", "malignant", "normal"] and prediction.labels is None
    assert [f"{p:.6f}" for p in prediction.probabilities.values()] == row[2:] and prediction.label == row[1]
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0)


def test_a_volume_of_two_channel_files_keeps_the_input_grid(tiny_checkpoint, tmp_path):
    from medadapt.datasets.decathlon.demo import make_demo_decathlon

    bundle = "dka_mni152_tissue_3d"
    data = Path(make_demo_decathlon(tmp_path / "nnunet", channels=2, cases=4, size=16, test_cases=1))
    affine = np.array([[0.0, -1.5, 0.0, 20.0], [1.2, 0.0, 0.0, -5.0], [0.0, 0.0, 2.5, 3.0], [0, 0, 0, 1]])
    channels = sorted((data / "imagesTs").glob("demo_004_*.nii.gz"))
    for path in channels:   # an oblique, anisotropic grid, as scanners write them
        nib.save(nib.Nifti1Image(np.asarray(nib.load(str(path)).dataobj), affine), str(path))
    models, values = trained(bundle, tiny_checkpoint, tmp_path, dataset_name="decathlon", dataset_dir=str(data),
                             image_size=32)
    written = nib.load(str(bundle_writes(bundle, values, models, data, tmp_path / "out") / "demo_004_pred.nii.gz"))
    prediction = medadapt.predict(models / "best_adapters", channels, bundle=bundle,
                                  **values)
    assert prediction.class_names == ["background", "organ", "lesion"]   # from dataset.json
    assert prediction.labels.shape == (16, 16, 8) and np.allclose(prediction.affine, affine)
    assert np.array_equal(prediction.labels, np.asarray(written.dataobj)) and np.allclose(written.affine, affine)
