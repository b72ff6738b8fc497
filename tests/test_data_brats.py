"""BraTS preset: official layouts, release detection, label conversion, transforms."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import (
    SHAPE3D,
    bundle_transforms,
    label_map,
    make_brats2021,
    make_brats2023,
    make_msd,
    write_nifti,
)
from monai.transforms import LoadImaged

from medadapt.data.errors import DatasetError
from medadapt.datasets.brats import MODALITIES, brats_datalist, detect_release
from medadapt.datasets.brats.labels import (
    RELEASES,
    ConvertBraTSLabels,
    ConvertBraTSLabelsd,
    canonical_release,
)

# The release conventions as the BraTS organisers define them (the requirement under test).
SPEC = {
    "2021": {"tc": {1, 4}, "wt": {1, 2, 4}, "et": {4}},
    "2023": {"tc": {1, 3}, "wt": {1, 2, 3}, "et": {3}},
    "msd": {"tc": {2, 3}, "wt": {1, 2, 3}, "et": {3}},
}


# ---------------------------------------------------------------------------- layouts
def test_2021_layout(tmp_path):
    ids = make_brats2021(tmp_path, cases=3)
    datalist = brats_datalist(tmp_path)
    assert detect_release(tmp_path) == "2021"
    assert [e["case"] for e in datalist] == sorted(ids)
    for entry in datalist:
        assert len(entry["image"]) == 4
        suffixes = [os.path.basename(p).split("_")[-1].split(".")[0] for p in entry["image"]]
        assert suffixes == list(MODALITIES)
        assert all(os.path.isfile(p) for p in entry["image"] + [entry["label"]])
        assert entry["label"].endswith(f"{entry['case']}_seg.nii.gz")
        assert entry["group"] == entry["case"]


def test_2023_layout_maps_names_to_fixed_order(tmp_path):
    make_brats2023(tmp_path, cases=2)
    datalist = brats_datalist(tmp_path, release="2023")
    assert detect_release(tmp_path) == "2023"
    suffixes = [os.path.basename(p).rsplit("-", 1)[-1].split(".")[0] for p in datalist[0]["image"]]
    assert suffixes == ["t1n", "t1c", "t2w", "t2f"]  # = t1, t1ce, t2, flair
    assert datalist[0]["label"].endswith("-seg.nii.gz")


def test_msd_layout_and_parent_folder(tmp_path):
    ids = make_msd(tmp_path / "Task01_BrainTumour", cases=3)
    for root in (tmp_path / "Task01_BrainTumour", tmp_path):  # the folder or its parent
        datalist = brats_datalist(root)
        assert detect_release(root) == "msd"
        assert [e["case"] for e in datalist] == ids
        assert all(isinstance(e["image"], str) and os.path.isfile(e["image"]) for e in datalist)


def test_requested_release_must_match_layout(tmp_path):
    make_brats2021(tmp_path, cases=1)
    with pytest.raises(DatasetError, match="2021"):
        brats_datalist(tmp_path, release="2023")


def test_missing_modality_names_case_and_file(tmp_path):
    ids = make_brats2021(tmp_path, cases=2)
    os.remove(tmp_path / ids[1] / f"{ids[1]}_t1ce.nii.gz")
    with pytest.raises(DatasetError) as error:
        brats_datalist(tmp_path)
    assert ids[1] in str(error.value) and "t1ce" in str(error.value)
    assert ids[0] not in str(error.value)


def test_wrong_file_names_in_case_folder(tmp_path):
    ids = make_brats2021(tmp_path, cases=2)
    folder = tmp_path / ids[0]
    for path in folder.iterdir():  # e.g. upper-case suffixes from a re-export
        path.rename(folder / path.name.replace("_flair", "_FLAIR"))
    with pytest.raises(DatasetError) as error:
        brats_datalist(tmp_path)
    assert ids[0] in str(error.value) and "flair" in str(error.value)


def test_misnamed_case_folder(tmp_path):
    make_brats2021(tmp_path, cases=2)
    (tmp_path / "patient_7").mkdir()
    with pytest.raises(DatasetError, match="patient_7"):
        brats_datalist(tmp_path)


def test_empty_or_unknown_folder(tmp_path):
    with pytest.raises(DatasetError, match="no BraTS layout"):
        brats_datalist(tmp_path)
    with pytest.raises(FileNotFoundError):
        brats_datalist(tmp_path / "absent")


def test_mixed_releases_rejected(tmp_path):
    make_brats2021(tmp_path, cases=1)
    make_brats2023(tmp_path, cases=1)
    with pytest.raises(DatasetError, match="mixes"):
        detect_release(tmp_path)


def test_validation_release_without_labels(tmp_path):
    ids = make_brats2021(tmp_path, cases=2)
    os.remove(tmp_path / ids[0] / f"{ids[0]}_seg.nii.gz")
    with pytest.raises(DatasetError, match="seg"):
        brats_datalist(tmp_path)
    datalist = brats_datalist(tmp_path, require_labels=False)
    assert "label" not in datalist[0] and "label" in datalist[1]


# ---------------------------------------------------------------------------- labels
@pytest.mark.parametrize("release", ["2021", "2023", "msd"])
def test_label_conversion_follows_release(release):
    rng = np.random.default_rng(0)
    values = [0, *RELEASES[release].values]
    label = rng.choice(values, size=(1, 8, 9, 7)).astype(np.float32)
    out = ConvertBraTSLabels(release)(torch.from_numpy(label))
    assert out.shape == (3, 8, 9, 7) and out.dtype == torch.float32
    raw = label[0]
    for channel, name in enumerate(("tc", "wt", "et")):
        expected = np.isin(raw, sorted(SPEC[release][name]))
        assert np.array_equal(out[channel].numpy() > 0, expected), (release, name)
    tc, wt, et = (out[i].bool() for i in range(3))
    assert bool((et <= tc).all()) and bool((tc <= wt).all())  # ET inside TC inside WT
    assert torch.equal(wt, torch.from_numpy(raw > 0))
    assert et.any()  # the release's ET value is present, so ET is not empty


@pytest.mark.parametrize(
    "release, values, bad",
    [("2021", (1, 2, 3), 3), ("2023", (1, 2, 4), 4), ("msd", (1, 2, 4), 4)],
)
def test_release_mismatch_raises_with_file_and_values(tmp_path, release, values, bad):
    path = write_nifti(tmp_path / "BraTS_case_seg.nii.gz", label_map(values))
    data = LoadImaged(keys="label", ensure_channel_first=True)({"label": str(path), "case": "case-42"})
    with pytest.raises(DatasetError) as error:
        ConvertBraTSLabelsd(keys="label", release=release)(data)
    message = str(error.value)
    assert "case-42" in message and "BraTS_case_seg.nii.gz" in message and str(bad) in message


def test_same_values_different_release_caught_by_name(tmp_path):
    # 2023 and MSD both use {1, 2, 3}; reading a 2023 file as MSD would swap TC silently.
    make_brats2023(tmp_path, cases=1)
    seg = next(tmp_path.rglob("*-seg.nii.gz"))
    data = LoadImaged(keys="label", ensure_channel_first=True)({"label": str(seg)})
    with pytest.raises(DatasetError, match="2023"):
        ConvertBraTSLabelsd(keys="label", release="msd")(data)
    auto = ConvertBraTSLabelsd(keys="label", release="auto")(data)["label"]
    explicit = ConvertBraTSLabelsd(keys="label", release="2023")(data)["label"]
    assert torch.equal(auto, explicit)


def test_non_integer_labels_rejected():
    label = torch.zeros(1, 4, 4, 4)
    label[0, 1, 1, 1] = 1.5
    with pytest.raises(DatasetError, match="non-integer"):
        ConvertBraTSLabels("2021")(label)


def test_release_aliases():
    assert canonical_release("2019") == "2021"
    assert canonical_release("GLI") == "2023"
    assert canonical_release("Task01") == "msd"
    with pytest.raises(ValueError, match="unknown BraTS release"):
        canonical_release("2017b")


# ---------------------------------------------------------------------------- transforms
def test_transforms_validation_and_training_shapes(tmp_path):
    make_brats2021(tmp_path, cases=1, spacing=2.0)
    entry = brats_datalist(tmp_path)[0]
    out = bundle_transforms("dka_brats", release="2021", pixdim=[1.0, 1.0, 1.0])(entry)
    # 2 mm input resampled to 1 mm: about twice the voxels per axis.
    assert out["image"].shape[0] == 4 and out["label"].shape[0] == 3
    assert out["image"].shape[1:] == out["label"].shape[1:]
    assert all(abs(n - 2 * s) <= 2 for n, s in zip(out["image"].shape[1:], SHAPE3D))
    brain = out["image"][0] != 0
    assert abs(float(out["image"][0][brain].mean())) < 0.05  # z-scored over brain voxels
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0}

    crops = bundle_transforms("dka_brats", "train", roi_size=[8, 8, 8], pixdim=None,
                              **{"train#transforms#crop#num_samples": 3})(entry)
    assert len(crops) == 3
    for crop in crops:
        assert crop["image"].shape == (4, 8, 8, 8) and crop["label"].shape == (3, 8, 8, 8)
    padded = bundle_transforms("dka_brats", "train", roi_size=[16, 16, 16], pixdim=None)(entry)[0]
    assert padded["image"].shape == (4, 16, 16, 16)  # smaller volume padded up to the ROI


def test_transforms_reorder_msd_channels(tmp_path):
    make_msd(tmp_path, cases=1, channel_slabs=True)
    entry = brats_datalist(tmp_path)[0]
    for release in ("msd", "auto"):
        out = bundle_transforms("dka_brats", release=release, pixdim=None)(entry)
        # MSD stores FLAIR, T1w, t1gd, T2w; the output must be t1, t1ce, t2, flair.
        slab_of = [int(np.argwhere(out["image"][c].abs().sum((1, 2)).numpy() > 0).min() // 3) for c in range(4)]
        assert slab_of == [1, 2, 3, 0], release


def test_transforms_keep_order_of_separate_files(tmp_path):
    make_brats2021(tmp_path, cases=1)
    entry = brats_datalist(tmp_path)[0]
    for k, path in enumerate(entry["image"]):  # modality k non-zero only in x-slab k
        data = np.zeros(SHAPE3D, np.float32)
        data[3 * k : 3 * k + 3] = 1.0 + np.random.default_rng(k).random((3,) + SHAPE3D[1:])
        write_nifti(Path(path), data)
    out = bundle_transforms("dka_brats", release="auto", pixdim=None)(entry)
    slab_of = [int(np.argwhere(out["image"][c].abs().sum((1, 2)).numpy() > 0).min() // 3) for c in range(4)]
    assert slab_of == [0, 1, 2, 3]


def test_transforms_stop_on_mismatched_release(tmp_path):
    make_brats2021(tmp_path, cases=1, values=(1, 2, 3))  # 2021 names, 2023 values
    entry = brats_datalist(tmp_path)[0]
    with pytest.raises(RuntimeError) as error:
        bundle_transforms("dka_brats", release="2021", pixdim=None)(entry)
    cause = error.value.__cause__
    assert isinstance(cause, DatasetError) and entry["case"] in str(cause) and "[3]" in str(cause)


def test_preset_reads_copied_tree_the_same(tmp_path):
    make_brats2021(tmp_path / "a", cases=2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a, b = brats_datalist(tmp_path / "a"), brats_datalist(tmp_path / "b")
    assert [e["case"] for e in a] == [e["case"] for e in b]
    assert [os.path.relpath(e["label"], tmp_path / "a") for e in a] == [os.path.relpath(e["label"], tmp_path / "b") for e in b]
