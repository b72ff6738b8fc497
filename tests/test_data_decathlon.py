"""Your own data: Medical Segmentation Decathlon and nnU-Net v2 raw folders (2D and 3D, one or
two channels), read from their dataset.json, checked and split as every dataset, and trained
through the generic segmentation bundles, which take their classes and channels from it."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from test_bundles import TINY, run_bundle

from medadapt.data import get_dataset
from medadapt.data.errors import DatasetError
from medadapt.datasets.decathlon.demo import make_demo_decathlon
from medadapt.engine.data import prepare_data

DECATHLON = get_dataset("decathlon")
# (layout, spatial dims, channels): the Decathlon's own layout is 3D only.
FIXTURES = [("nnunet", 2, 1), ("nnunet", 2, 2), ("nnunet", 3, 1), ("nnunet", 3, 2), ("msd", 3, 1), ("msd", 3, 2)]


def fixture(tmp_path: Path, layout: str, dims: int, channels: int, cases: int = 6) -> Path:
    return Path(make_demo_decathlon(tmp_path / f"{layout}{dims}d{channels}", layout=layout, spatial_dims=dims,
                                    channels=channels, cases=cases, size=16, test_cases=2))


def task_of(dims: int) -> str:
    return "segmentation3d" if dims == 3 else "segmentation"


@pytest.mark.parametrize("layout,dims,channels", FIXTURES)
def test_both_layouts_are_read_checked_and_split_as_every_dataset(layout, dims, channels, tmp_path):
    root = fixture(tmp_path, layout, dims, channels)
    entries = DECATHLON.datalist(root, task=task_of(dims))
    assert [e["case"] for e in entries] == [f"demo_{i:03d}" for i in range(6)]
    for entry in entries:
        files = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        # nnU-Net: a file per channel; the Decathlon: one (4D) file.
        assert len(files) == (channels if layout == "nnunet" else 1) and Path(entry["label"]).is_file()
    # Classes and channels come from dataset.json.
    assert DECATHLON.bundle_settings(task_of(dims), root) == {"class_names": ["background", "organ", "lesion"],
                                                              "image_channels": channels}
    data = prepare_data("decathlon", str(root), str(tmp_path / "run"), task=task_of(dims), fraction=0.5, folds=2)
    assert data["counts"]["train"] + data["counts"]["val"] + data["counts"]["test"] <= 6 and data["train"]
    splits = json.loads((tmp_path / "run" / "splits.json").read_text(encoding="utf-8"))
    assert splits["dataset"] == "decathlon" and splits["task"] == task_of(dims)
    # Prediction reads the test images (imagesTs), without labels.
    test = DECATHLON.datalist(root, task=task_of(dims), require_labels=False)
    assert [e["case"] for e in test] == ["demo_006", "demo_007"] and not any("label" in e for e in test)


def _write_json(root: Path, **changes) -> None:
    description = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    description.update(changes)
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")


@pytest.mark.parametrize("changes,message", [
    ({"labels": {"background": 0, "tumour": [1, 2]}}, "region-based labels"),
    ({"labels": {"background": 0, "organ": 1, "ignore": 2}}, "'ignore' label"),
    ({"labels": {"background": 0, "organ": 2}}, "label values must be 0..1"),
    ({"file_ending": ".tif"}, "'file_ending' '.tif' is not supported"),
    ({"channel_names": {"1": "T1"}}, "keys of 'channel_names' must be 0..0"),
    ({"numTraining": 9}, "numTraining 9"),
])
def test_a_bad_dataset_json_is_named_with_the_field_at_fault(changes, message, tmp_path):
    root = fixture(tmp_path, "nnunet", 3, 1)
    _write_json(root, **changes)
    with pytest.raises(DatasetError, match="dataset.json") as error:
        DECATHLON.datalist(root, task="segmentation3d")
    assert message in str(error.value)


def test_bad_files_are_named_before_training(tmp_path):
    root = fixture(tmp_path, "nnunet", 2, 2)
    # A channel file gone: the case holds 1 channel where dataset.json names 2.
    (root / "imagesTr" / "demo_001_0001.png").unlink()
    # A label value dataset.json does not define.
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(root / "labelsTr" / "demo_002.png")
    # An image without a label.
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "imagesTr" / "demo_009_0000.png")
    with pytest.raises(DatasetError, match=r"demo_009_0000.png has no label labelsTr/demo_009.png"):
        DECATHLON.datalist(root, task="segmentation")
    (root / "imagesTr" / "demo_009_0000.png").unlink()
    with pytest.raises(DatasetError) as error:
        prepare_data("decathlon", str(root), str(tmp_path / "run"), task="segmentation")
    text = str(error.value)
    assert "case demo_001" in text and "hold 1 channel(s)" in text and "names 2" in text
    assert "demo_002.png" in text and "value(s) [7]" in text and "1: organ" in text
    assert not (tmp_path / "run" / "splits.json").exists()
    # 2D data under a 3D bundle, and the other way round: said before anything is read.
    with pytest.raises(DatasetError, match="describes 2D images.*use a 2D segmentation bundle"):
        DECATHLON.datalist(root, task="segmentation3d")
    # A 4D Decathlon image whose channels are not the ones dataset.json names.
    msd = fixture(tmp_path, "msd", 3, 2)
    image = msd / "imagesTr" / "demo_003.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8, 3), np.float32), np.eye(4)), str(image))
    with pytest.raises(DatasetError, match=r"case demo_003.*\(16, 16, 8, 3\).*expected \(H, W, D, 2\)"):
        DECATHLON.validate(DECATHLON.datalist(msd, task="segmentation3d"), "segmentation3d", root=msd)


@pytest.mark.slow
@pytest.mark.parametrize("layout,dims,channels", [("nnunet", 2, 1), ("nnunet", 2, 2), ("nnunet", 3, 1),
                                                  ("msd", 3, 2)])
def test_the_generic_bundles_train_on_it_with_its_classes_and_channels(layout, dims, channels, tmp_path):
    from medadapt.checkpoint import read_adapter_config

    root = fixture(tmp_path, layout, dims, channels)
    bundle = "dka_mni152_tissue_3d" if dims == 3 else "dka_mni152_tissue"
    sizes = ["--image_size", "32", "--roi_size", "[32,32,4]"] if dims == 3 else ["--image_size", "64"]
    out = tmp_path / "run"
    run_bundle(f"bundles/{bundle}/train.json", *TINY, *sizes, "--dataset_name", "decathlon", "--dataset_dir",
               str(root), "--max_epochs", "1", "--val_interval", "1", "--output_dir", str(out))
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0
    built = read_adapter_config(out / "models" / "best_adapters")["model"]["arguments"]
    # Three classes from dataset.json; a grey channel repeated to the backbone's three, two passed on.
    assert built["num_classes"] == 3 and built["in_channels"] == (3 if channels == 1 else channels)
    predictions = tmp_path / "predictions"
    run_bundle(f"bundles/{bundle}/inference.json", *TINY, *sizes, "--dataset_name", "decathlon", "--dataset_dir",
               str(root), "--model_file", str(out / "models" / "model.pt"), "--output_dir", str(predictions))
    suffix = "_pred.nii.gz" if dims == 3 else "_pred.png"
    for case in ("demo_006", "demo_007"):
        written = predictions / f"{case}{suffix}"
        labels = np.asarray(nib.load(str(written)).dataobj) if dims == 3 else np.asarray(Image.open(written))
        assert set(np.unique(labels)) <= {0, 1, 2} and labels.shape == (16, 16, 8)[:dims]
