"""The bundles as users run them: ``python -m monai.bundle run --config_file bundles/X/...``.

Runs use tiny backbones and small demo datasets through the same configs; the default
(LiteMedSAM) run of dka_brats is the README's main command and is exercised by ``make demo``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "train.json").is_file())
TINY_OPTIONS = {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}  # a tiny ConvNeXt: timm's real class
TINY = ["--backbone", "timm:convnext_atto", "--backbone_options", json.dumps(TINY_OPTIONS)]


def _config(bundle: str) -> dict:
    return json.loads((REPO / "bundles" / bundle / "train.json").read_text(encoding="utf-8"))


def _small_demo(bundle: str) -> str:
    from medadapt.data import get_dataset

    return repr(get_dataset(_config(bundle)["dataset_name"]).small_demo)


# Each bundle's dataset says what a quick demo is, so a new bundle is tested without a line here.
SMALL_DEMO = {bundle: _small_demo(bundle) for bundle in BUNDLES}
# Volume bundles: small windows, and validation after a one-epoch run (the BraTS demo validates late).
# 3D bundles: a small window, and the same slice size for demo-trained models and files (a model
# trained at one slice size is refused at another)
EXTRA = {bundle: ["--roi_size", "[32,32,4]", "--slice_size", "32", "--val_interval", "1"]
         for bundle in BUNDLES if "roi_size" in _config(bundle)}


def run_bundle(config: str | list[str], *args: str, check: bool = True,
               new_process: bool = False) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file CONFIG ARGS`` from the repository root."""
    files = config if isinstance(config, str) else str(config).replace(" ", "")
    return monai_bundle("run", "--config_file", files, *args, check=check, new_process=new_process)


def monai_bundle(*command: str, check: bool = True, new_process: bool = False) -> subprocess.CompletedProcess:
    """``python -m monai.bundle COMMAND`` from the repository root: its exit code, stdout and stderr.

    The command line goes through MONAI's own entry point (the same Fire call on the same
    functions) in this process; ``new_process=True`` runs it in a new interpreter, which first
    spends ~7 s importing MONAI."""
    if new_process:
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, "-m", "monai.bundle", *command], cwd=REPO, capture_output=True,
                                text=True, encoding="utf-8", errors="replace", env=env, timeout=900)
    else:
        result = _run_in_this_process(list(command))
    if check and result.returncode != 0:
        raise AssertionError(f"monai.bundle {command[0]} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def _run_in_this_process(command: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import logging
    import traceback

    import fire
    from monai.bundle import __main__ as entry_point

    from medadapt.engine.reporting import RunLogHandler

    commands = {name: getattr(entry_point, name) for name in dir(entry_point) if not name.startswith("_")
                and callable(getattr(entry_point, name))}
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            fire.Fire(commands, command=command, name="monai.bundle")
            code = 0
        except SystemExit as exit_:  # Fire's usage errors, or a bundle that exits
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception:  # what the interpreter prints before it exits with 1
            traceback.print_exc()
            code = 1
        finally:
            # The run's log file and its logging.conf console handler end with the run, as with a process.
            for log in [logging.getLogger(), *map(logging.getLogger, list(logging.root.manager.loggerDict))]:
                for handler in [h for h in log.handlers if isinstance(h, RunLogHandler)
                                or getattr(h, "stream", None) in (stdout, stderr)]:
                    log.removeHandler(handler)
                    handler.close()
    return subprocess.CompletedProcess(["monai.bundle", *command], code, stdout.getvalue(), stderr.getvalue())


def test_bundles_run_one_after_another_in_a_process_keep_their_logs_apart(tmp_path):
    # As the protocol runner, MONAI Label and the notebooks run them: in one process.
    import shutil

    from medadapt.engine.bundle import run_workflow

    settings = {"backbone": "timm:convnext_atto", "backbone_options": TINY_OPTIONS, "demo_options": {"per_class": 3}, "image_size": 64, "max_epochs": 1, "progress": False,
                "demo_dir": str(tmp_path / "demo")}
    config = str(REPO / "bundles" / "dka_busi_cls" / "train.json")
    first, second, third = (tmp_path / name for name in ("first", "second", "third"))
    run_workflow(config, output_dir=str(first), **settings)
    first_log = (first / "train.log").read_text(encoding="utf-8")
    run_workflow(config, output_dir=str(second), **settings)
    assert (first / "train.log").read_text(encoding="utf-8") == first_log
    assert f"outputs in {second.resolve()}" in (second / "train.log").read_text(encoding="utf-8")
    shutil.rmtree(second)  # a finished run's folder may go (MONAI Label removes its run folder)
    run_workflow(config, output_dir=str(third), **settings)
    assert (third / "metrics.json").is_file()


def _as_a_user_edits_it(folder: Path, bundle: str) -> None:
    """Set the tiny backbone and a small demo in an exported bundle's own configs (and its
    metadata's input size), as a user edits a bundle by hand: no command-line override."""
    for name in ("train.json", "inference.json"):
        path = folder / "configs" / name
        config = json.loads(path.read_text(encoding="utf-8"))
        config.update({"backbone": "timm:convnext_atto", "backbone_options": TINY_OPTIONS,
                       "demo_options": json.loads(SMALL_DEMO[bundle].replace("'", '"'))})
        if "image_size" in config:
            config["image_size"] = 64
        if "roi_size" in config:
            config["roi_size"] = [32, 32, 4]
        path.write_text(json.dumps(config, indent=4), encoding="utf-8")
    meta = folder / "configs" / "metadata.json"
    metadata = json.loads(meta.read_text(encoding="utf-8"))
    for part in ("inputs", "outputs"):
        tensor = next(iter(metadata["network_data_format"][part].values()))
        tensor["spatial_shape"] = [32, 32, 4] if len(tensor["spatial_shape"]) == 3 else [64, 64]
    meta.write_text(json.dumps(metadata, indent=4), encoding="utf-8")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_exported_bundle_passes_the_model_zoo_checks_outside_the_repository(bundle, tmp_path):
    import torch

    from medadapt.engine.bundle import export_bundle, parsed, verify_bundle

    # A model.pt of the tiny network, as training would publish it.
    overrides = {"backbone": "timm:convnext_atto", "backbone_options": TINY_OPTIONS, "image_size": 64,
                 "roi_size": [32, 32, 4]}
    network = parsed(REPO / "bundles" / bundle / "inference.json", "network_def",
                     **{k: v for k, v in overrides.items() if k != "roi_size" or bundle.endswith(("brats", "3d"))})
    torch.save(network.state_dict(), tmp_path / "model.pt")
    copy = export_bundle(bundle, tmp_path / "zoo" / bundle, model=tmp_path / "model.pt")
    assert sorted(p.name for p in (copy / "configs").iterdir()) == sorted(
        ["metadata.json", "train.json", "inference.json", "evaluate.json", "multi_gpu_train.json", "logging.conf"])
    assert (copy / "LICENSE").is_file() and (copy / "docs" / "README.md").is_file()
    # The configs are the repository's, byte for byte: one source for both layouts.
    for name in ("train.json", "inference.json", "evaluate.json", "metadata.json"):
        assert (copy / "configs" / name).read_bytes() == (REPO / "bundles" / bundle / name).read_bytes()
    _as_a_user_edits_it(copy, bundle)
    passed = verify_bundle(copy)
    assert passed == ["verify_metadata", "verify_net_in_out", "ckpt_export", "train properties", "infer properties"]
    # It read and wrote nothing outside itself: its run went into the copy.
    assert list((copy / "runs").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_trains_one_epoch_and_predicts(bundle, tmp_path):
    out = tmp_path / "run"
    demo = ["--demo_options", SMALL_DEMO[bundle]]
    # The main command's bundle trains through the real command line, in a new interpreter.
    run_bundle(f"bundles/{bundle}/train.json", *TINY, *demo, *EXTRA.get(bundle, []),
               "--max_epochs", "1", "--output_dir", str(out), "--image_size", "64", new_process=bundle == "dka_brats")
    models = out / "models"
    assert any((models / "best_adapters").glob("*.safetensors"))
    assert (models / "model.pt").is_file() and (models / "training_state.pt").is_file()
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    key = "val_accuracy" if "cls" in bundle else "val_mean_dice"
    assert 0.0 <= metrics[key] <= 1.0 and metrics["epoch"] == 1 and metrics["best_epoch"] == 1
    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    train = {e["image"] if isinstance(e["image"], str) else e["image"][0] for e in splits["fractions"][0]["folds"][0]["train"]}
    held = [{e["image"] if isinstance(e["image"], str) else e["image"][0] for e in splits[part]} for part in ("val", "test")]
    assert train and all(held) and not (train & held[0]) and not (train & held[1]) and not (held[0] & held[1])

    # The fixed test set, through the same bundle: test_* beside the val_* keys.
    run_bundle(f"['bundles/{bundle}/train.json','bundles/{bundle}/evaluate.json']", *TINY, *demo,
               *EXTRA.get(bundle, []), "--output_dir", str(out), "--image_size", "64")
    evaluated = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert evaluated[key] == metrics[key] and 0.0 <= evaluated[key.replace("val_", "test_")] <= 1.0

    predictions = tmp_path / "predictions"
    run_bundle(f"bundles/{bundle}/inference.json", *TINY, *demo, *EXTRA.get(bundle, []), "--image_size", "64",
               "--model_file", str(models / "model.pt"), "--output_dir", str(predictions),
               "--demo_dir", str(tmp_path / "demo_data"))
    written = sorted(p.name for p in predictions.iterdir() if not p.name.startswith("."))
    if "cls" in bundle:
        rows = (predictions / "predictions.csv").read_text(encoding="utf-8").strip().splitlines()
        demo_data = tmp_path / "demo_data"  # beside the run folder
        assert len(rows) - 1 == len(list(demo_data.rglob("*.png")) + list(demo_data.rglob("*.jpg"))) \
            - len(list(demo_data.rglob("*_mask*.png")))
    else:
        assert written and all(n.endswith(("_pred.nii.gz", "_pred.png")) for n in written)


def _lps_case(root: Path, case: str, shape=(30, 34, 12), spacing=(1.2, 1.0, 2.5)) -> np.ndarray:
    """A BraTS 2021-layout case with an LPS, anisotropic affine and int16 images."""
    folder = root / case
    folder.mkdir(parents=True)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [40.0, 50.0, -10.0]
    rng = np.random.default_rng(0)
    for modality in ("t1", "t1ce", "t2", "flair"):
        data = (rng.random(shape) * 500).astype(np.int16)
        nib.save(nib.Nifti1Image(data, affine), str(folder / f"{case}_{modality}.nii.gz"))
    return affine


@pytest.mark.slow
def test_brats_predictions_keep_the_input_grid(tmp_path):
    """Whatever the input's orientation, spacing or dtype, the NIfTI prediction lies on its grid."""
    train_out = tmp_path / "run"
    run_bundle("bundles/dka_brats/train.json", *TINY, "--demo_options", SMALL_DEMO["dka_brats"],
               *EXTRA["dka_brats"], "--max_epochs", "1", "--output_dir", str(train_out))
    data = tmp_path / "cases"
    affine = _lps_case(data, "BraTS2021_01234")
    predictions = tmp_path / "pred"
    run_bundle("bundles/dka_brats/inference.json", *TINY, *EXTRA["dka_brats"], "--dataset_dir", str(data),
               "--model_file", str(train_out / "models" / "model.pt"), "--output_dir", str(predictions))
    image = nib.load(str(data / "BraTS2021_01234" / "BraTS2021_01234_t1.nii.gz"))
    prediction = nib.load(str(predictions / "BraTS2021_01234_pred.nii.gz"))
    assert prediction.shape == image.shape
    np.testing.assert_allclose(prediction.affine, affine, atol=1e-4)
    assert set(np.unique(prediction.get_fdata())) <= {0, 1, 2, 4}


def test_bad_dataset_stops_before_training_and_writes_nothing(tmp_path):
    data = tmp_path / "cases"
    _lps_case(data, "BraTS2021_00001")
    (data / "BraTS2021_00001" / "BraTS2021_00001_flair.nii.gz").unlink()
    out = tmp_path / "run"
    result = run_bundle("bundles/dka_brats/train.json", *TINY, "--dataset_dir", str(data), "--output_dir", str(out),
                        check=False)
    assert result.returncode != 0
    assert "BraTS2021_00001" in result.stderr and "flair" in result.stderr
    assert not (out / "models").exists() and not (out / "train.log").exists()


def test_tracking_mlflow_records_training_and_validation_metrics(tmp_path):
    # MONAI's own --tracking mlflow, into the default local store <output_dir>/mlruns.db.
    mlflow = pytest.importorskip("mlflow")
    out = tmp_path / "run"
    run_bundle("bundles/dka_busi_cls/train.json", *TINY, "--demo_options", SMALL_DEMO["dka_busi_cls"],
               "--max_epochs", "1", "--output_dir", str(out), "--image_size", "64", "--tracking", "mlflow")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    logged = set().union(*(r.data.metrics for r in runs))
    assert {"train_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_auc"} <= logged
    # what the run was: its full settings and data, learning rates by group name, its adapters
    (run,) = [r for r in runs if r.info.run_name == "dka_convnext_atto_f1_fold0_seed0"]
    params = run.data.params
    assert params["method"] == "dka" and params["backbone"] == "timm:convnext_atto" and params["fraction"] == "1.0"
    assert params["fold"] == "0" and params["seed"] == "0" and len(params["data.fingerprint"]) == 40
    assert {"lr/adapter", "lr/head"} <= set(run.data.metrics)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"adapters", "metrics.json"}
    record = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["run"]
    assert record["settings"]["method"] == "dka" and record["data"]["fingerprint"] == params["data.fingerprint"]
    # ... and in TensorBoard, with the best validation score
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    plugins = {value.metadata.plugin_data.plugin_name: value.tag for events in (out / "logs").rglob("events.out.*")
               for event in EventFileLoader(str(events)).Load() for value in event.summary.value}
    assert plugins["text"] == "run/settings/text_summary" and "hparams" in plugins


def test_bad_fraction_is_named(tmp_path):
    result = run_bundle("bundles/dka_busi_cls/train.json", *TINY, "--fraction", "0", "--output_dir",
                        str(tmp_path / "run"), check=False)
    assert result.returncode != 0 and "'fraction'" in result.stderr


def test_bad_adapter_dtype_is_named_before_training(tmp_path):
    out = tmp_path / "run"
    result = run_bundle("bundles/dka_busi_cls/train.json", *TINY, "--adapter_dtype", "int8", "--output_dir", str(out),
                        check=False)
    assert result.returncode != 0 and "dtype must be one of" in result.stderr and "'int8'" in result.stderr
    assert not (out / "models").exists()


def test_amp_runs_the_network_in_half_precision_on_the_cpu():
    import torch
    from monai.inferers import SimpleInferer

    from medadapt.engine.amp import AutocastInferer, amp_dtype, monai_amp

    seen = []

    def network(x):
        y = torch.nn.functional.linear(x, torch.ones(2, x.shape[-1]))
        seen.append(y.dtype)
        return y

    x = torch.randn(3, 4)
    out = AutocastInferer(SimpleInferer(), amp=True, device="cpu")(x, network)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32  # the loss sees float32
    AutocastInferer(SimpleInferer(), amp=False, device="cpu")(x, network)
    assert seen[-1] == torch.float32
    assert amp_dtype("fp16", "cpu") == torch.float16 and not monai_amp(True, "cpu") and monai_amp(True, "cuda")
    with pytest.raises(ValueError, match="'amp'"):
        amp_dtype("half", "cpu")


@pytest.mark.slow
def test_a_bundle_trains_with_amp_on_the_cpu(tmp_path):
    out = tmp_path / "run"
    run_bundle("bundles/dka_busi_seg/train.json", *TINY, "--demo_options", SMALL_DEMO["dka_busi_seg"],
               "--max_epochs", "1", "--output_dir", str(out), "--image_size", "64", "--amp", "True")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0
    result = run_bundle("bundles/dka_busi_seg/train.json", *TINY, "--amp", "half", "--output_dir",
                        str(tmp_path / "bad"), check=False)
    assert result.returncode != 0 and "'amp'" in result.stderr and not (tmp_path / "bad" / "splits.json").exists()


def test_every_transform_of_the_recipe_is_config_a_user_can_override_by_name():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles/dka_busi_seg/train.json"))
    parser.update({"train#transforms#contrast#prob": 0.2, "train#transforms#flip_axis1#_disabled_": True,
                   "image_size": 32})
    steps = [type(t).__name__ for t in parser.get_parsed_content("train#preprocessing").transforms]
    assert "RandFlipd" not in steps  # switched off by name
    contrast = parser.get_parsed_content("train#preprocessing").transforms[steps.index("RandAdjustContrastd")]
    assert contrast.prob == 0.2
    # validation shares the training's deterministic steps (a MONAI macro), not the augmentations
    validate = [type(t).__name__ for t in parser.get_parsed_content("validate#preprocessing").transforms]
    assert validate == ["LoadImaged", "LoadImaged", "MergeMasksd", "Resized", "ScaleIntensityd", "EnsureTyped"]


def test_the_users_command_keeps_every_run_in_a_folder_of_its_own_and_publishes_the_best(tmp_path):
    # The design card's command, from a checkout's root, on a copy of the bundle folder.
    import shutil

    shutil.copytree(REPO / "bundles" / "dka_busi_cls", tmp_path / "bundles" / "dka_busi_cls")
    args = ["--config_file", "bundles/dka_busi_cls/train.json", *TINY, "--demo_options", SMALL_DEMO["dka_busi_cls"],
            "--image_size", "64", "--max_epochs", "1", "--progress", "False"]
    first, second = (_run_in_this_process(["run", *args, "--fraction", f], cwd=tmp_path) for f in ("1.0", "0.5"))
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-3000:]
    runs = tmp_path / "bundles" / "dka_busi_cls" / "runs"
    names = sorted(p.name for p in runs.iterdir() if p.name != "demo_data")
    assert names == ["dka_convnext_atto_f0.5_fold0_seed0", "dka_convnext_atto_f1_fold0_seed0"]
    for name in names:
        (run,) = (p for p in (runs / name).iterdir() if p.name != "demo_data")  # the demo lies beside the runs
        assert (run / "metrics.json").is_file() and (run / "models" / "best_adapters").is_dir()
    models = tmp_path / "bundles" / "dka_busi_cls" / "models"
    assert (models / "model.pt").is_file() and (models / "adapters").is_dir()
    assert json.loads((models / "run.json").read_text(encoding="utf-8"))["run"].startswith(str(runs / names[0]))
    # inference reads the bundle's own published model
    done = _run_in_this_process(["run", "--config_file", "bundles/dka_busi_cls/inference.json", *TINY,
                                 "--image_size", "64", "--progress", "False"], cwd=tmp_path)
    assert done.returncode == 0 and "Restored all variables from" in done.stdout + done.stderr
    assert (tmp_path / "bundles" / "dka_busi_cls" / "predictions" / "predictions.csv").is_file()


def test_a_bundle_root_that_is_not_the_bundle_is_refused_before_any_work(tmp_path):
    result = run_bundle("bundles/dka_busi_cls/train.json", *TINY, "--bundle_root", str(tmp_path), check=False)
    assert result.returncode != 0 and "is not the folder of bundle 'dka_busi_cls'" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_inference_refuses_settings_other_than_the_models_training(tmp_path):
    out = tmp_path / "run"
    run_bundle("bundles/dka_busi_seg/train.json", *TINY, "--demo_options", SMALL_DEMO["dka_busi_seg"],
               "--max_epochs", "1", "--output_dir", str(out), "--image_size", "64", "--progress", "False")
    args = ["bundles/dka_busi_seg/inference.json", *TINY, "--demo_options", SMALL_DEMO["dka_busi_seg"],
            "--model_file", str(out / "models" / "model.pt"), "--demo_dir", str(tmp_path / "demo_data"),
            "--progress", "False"]
    refused = run_bundle(*args, "--image_size", "96", "--output_dir", str(tmp_path / "refused"), check=False)
    assert refused.returncode != 0 and "trained with other settings" in refused.stderr
    assert "input_size: trained with 64, this run 96" in refused.stderr
    assert not (tmp_path / "refused").exists()
    told = run_bundle(*args, "--image_size", "96", "--check_model_settings", "False", "--output_dir",
                      str(tmp_path / "told"))
    assert "trained with other settings" in told.stdout + told.stderr and list((tmp_path / "told").glob("*_pred.png"))
    run_bundle(*args, "--image_size", "64", "--output_dir", str(tmp_path / "same"))
    assert list((tmp_path / "same").glob("*_pred.png"))


@pytest.mark.parametrize("bundle", BUNDLES)
def test_default_bundle_trains_at_most_its_share_of_the_model(bundle):
    """The papers' scale: a default dense-prediction bundle trains at most 25 % of its model,
    a classification bundle at most 5 %, head and decoder included (DKA on ViT-B: about 10 %
    and 1 %)."""
    from medadapt.engine.bundle import parsed
    from medadapt.injection import count_parameters
    from medadapt.tasks import get_task

    files = REPO / "bundles" / bundle / "train.json"
    network = parsed(files, "network_def")
    counts = count_parameters(network)
    trainable, total = counts["trainable"], counts["total"]
    limit = 0.25 if get_task(parsed(files, "task")).dense else 0.05
    assert trainable / total <= limit, f"{bundle}: {trainable:,} of {total:,} parameters trainable"
