"""Careless input to the bundles: each is named before any work starts, and nothing is left behind.

Runs use the tiny ConvNeXt of test_bundles through the real configs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fixtures_data import make_brats2021, make_busi
from test_bundles import REPO, SMALL_DEMO, TINY, run_bundle

BRATS = [*TINY, "--roi_size", "[32,32,4]", "--slice_size", "32", "--method_options", "{'bottleneck': 4}"]


@pytest.fixture(scope="module")
def trained_brats(tmp_path_factory) -> Path:
    """One tiny epoch of dka_brats on its demo: adapters to predict with."""
    out = tmp_path_factory.mktemp("brats_run")
    run_bundle("bundles/dka_brats/train.json", *BRATS, "--demo_options", SMALL_DEMO["dka_brats"], "--max_epochs", "1",
               "--val_interval", "1", "--output_dir", str(out))
    return out / "models"


def _case(root: Path, name: str = "BraTS2021_00001") -> Path:
    make_brats2021(root, cases=1)
    folder = next(p for p in root.iterdir() if p.is_dir())
    target = root / name
    if folder != target:
        folder.rename(target)
        for file in target.iterdir():
            file.rename(target / file.name.replace(folder.name, name))
    return target


@pytest.mark.slow
def test_nan_voxels_are_refused_at_inference_naming_the_file(trained_brats, tmp_path):
    case = _case(tmp_path / "cases")
    flair = case / f"{case.name}_flair.nii.gz"
    image = nib.load(str(flair))
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[2:4, 2:4, 2:4] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), str(flair))
    out = tmp_path / "pred"
    result = run_bundle("bundles/dka_brats/inference.json", *BRATS, "--dataset_dir", str(tmp_path / "cases"),
                        "--model_file", str(trained_brats / "model.pt"), "--output_dir", str(out), check=False)
    assert result.returncode != 0
    assert flair.name in result.stderr and ("NaN" in result.stderr or "non-finite" in result.stderr)
    assert not list(out.glob("*_pred.nii.gz"))


@pytest.mark.slow
def test_predictions_of_plain_files_and_separate_sequences_keep_their_names(trained_brats, tmp_path):
    # One case folder holding the four sequences as separate files, outside any dataset layout.
    case = _case(tmp_path / "loose", "patient_17")
    (case / "patient_17_seg.nii.gz").unlink()
    out = tmp_path / "pred"
    run_bundle("bundles/dka_brats/inference.json", *BRATS, "--dataset_dir", str(case), "--model_file",
               str(trained_brats / "model.pt"), "--output_dir", str(out))
    assert [p.name for p in out.glob("*.nii.gz")] == ["patient_17_pred.nii.gz"]
    # A truncated file is named, not predicted.
    broken = tmp_path / "broken"
    shutil.copytree(case, broken)
    t1 = broken / "patient_17_t1.nii.gz"
    t1.write_bytes(t1.read_bytes()[: len(t1.read_bytes()) // 2])
    result = run_bundle("bundles/dka_brats/inference.json", *BRATS, "--dataset_dir", str(broken), "--model_file",
                        str(trained_brats / "model.pt"), "--output_dir", str(tmp_path / "pred2"), check=False)
    assert result.returncode != 0 and "patient_17_t1.nii.gz" in result.stderr


def test_a_release_that_contradicts_the_labels_stops_before_training(tmp_path):
    # BraTS 2021 names, but the 2023 label values (ET = 3): found before any file is written.
    data = tmp_path / "cases"
    make_brats2021(data, cases=4, values=(1, 2, 3))
    out = tmp_path / "run"
    result = run_bundle("bundles/dka_brats/train.json", *BRATS, "--dataset_dir", str(data), "--output_dir", str(out),
                        check=False)
    assert result.returncode != 0 and "3" in result.stderr and "2021" in result.stderr, result.stderr[-2000:]
    assert not (out / "splits.json").exists() and not (out / "train.log").exists() and not (out / "models").exists()


@pytest.mark.parametrize("fold, message", [("1.5", "whole number"), ("abc", "whole number"), ("7", "in [0, 5)")])
def test_bad_folds_are_named(tmp_path, fold, message):
    out = tmp_path / "run"
    result = run_bundle("bundles/dka_busi_cls/train.json", *TINY, "--fold", fold, "--output_dir", str(out), check=False)
    assert result.returncode != 0 and "'fold'" in result.stderr and message in result.stderr
    assert not (out / "models").exists()


def test_a_splits_file_of_another_folder_or_dataset_is_refused(tmp_path):
    from medadapt.cli import main

    first, second = tmp_path / "busi_a", tmp_path / "busi_b"
    make_busi(first, per_class=5)
    make_busi(second, per_class=5)
    splits = tmp_path / "splits.json"
    assert main(["split", "--dataset", "busi", "--root", str(first), "--fractions", "1.0", "--folds", "1",
                 "--out", str(splits)]) == 0
    out = tmp_path / "run"
    result = run_bundle("bundles/dka_busi_cls/train.json", *TINY, "--dataset_dir", str(second), "--splits_file",
                        str(splits), "--output_dir", str(out), check=False)
    assert result.returncode != 0 and "splits_file" in result.stderr and "another folder" in result.stderr
    assert not (out / "models").exists()

    brats = tmp_path / "brats"
    make_brats2021(brats, cases=4)
    result = run_bundle("bundles/dka_brats/train.json", *BRATS, "--dataset_dir", str(brats), "--splits_file",
                        str(splits), "--output_dir", str(out), check=False)
    assert result.returncode != 0 and "made for dataset 'busi'" in result.stderr
    assert json.loads(splits.read_text(encoding="utf-8"))["dataset"] == "busi"


def test_configs_run_from_any_working_directory_given_their_bundle_root(tmp_path):
    import subprocess
    import sys

    def run(*extra):
        args = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
                str(REPO / "bundles/dka_busi_cls/train.json"), *TINY, "--demo_options", SMALL_DEMO["dka_busi_cls"],
                "--max_epochs", "1", "--image_size", "64", "--progress", "False", *extra]
        return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", errors="replace",
                              timeout=600)

    # From elsewhere, as for any model-zoo bundle: say where the bundle is (here, a copy of it).
    copy = tmp_path / "dka_busi_cls"
    shutil.copytree(REPO / "bundles/dka_busi_cls", copy)
    result = run("--bundle_root", str(copy))
    assert result.returncode == 0, result.stderr[-3000:]
    (run_name,) = [p for p in (copy / "runs").iterdir() if p.name != "demo_data"]
    assert [p for p in run_name.iterdir() if (p / "metrics.json").is_file()]
    # Without it, the working directory is not the bundle: refused before any work, saying how to fix it.
    result = run()
    assert result.returncode != 0 and "--bundle_root" in result.stderr and not (tmp_path / "runs").exists()
