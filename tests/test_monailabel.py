"""MONAI Label integration: a real server started by ``medadapt label``, real HTTP requests.

The studies folder holds real anatomy: the MNI152 T1 template (nilearn, shipped with the
package) down-sampled to 4 mm and stacked into a 4-channel volume standing in for BraTS'
four sequences (with its x axis flipped, so the orientation handling is exercised), an axial
MNI slice as PNG, and a corrupt "PNG". The volume, 2D segmentation and classification models
are tiny ConvNeXt-atto networks built through the real code paths from a fixed backbone
checkpoint written here; the box-prompted model is the real LiteMedSAM (256 px).

These tests need the ``[label]`` extra; without it they fail (they are not skipped) with a
message saying so.
"""

from __future__ import annotations

import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from monailabel_server import REPO, _leftover_uploads, _require_monailabel, server  # noqa: F401 (a fixture)

import medadapt
from medadapt.checkpoint import CONFIG_NAME, WEIGHTS_NAME

pytestmark = pytest.mark.xdist_group("monailabel")  # with --dist loadgroup: one server for the file


def _png(response) -> np.ndarray:
    from PIL import Image

    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def _nifti(response, folder: Path):
    import nibabel as nib

    assert response.status_code == 200, response.text
    path = folder / "label.nii.gz"
    path.write_bytes(response.content)
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def _box_params(box) -> dict:
    return {"params": (None, json.dumps({"box": box}))}


# ---------------------------------------------------------------------------- tests
def test_info_lists_models_and_says_what_is_trained(server):
    info = server.get("/info/").json()
    models = info["models"]
    assert set(models) == {"brats_tiny", "seg_tiny", "seg_trained", "cls_tiny", "cls_wrong_base", "litemedsam_box"}
    assert models["brats_tiny"]["dimension"] == 3 and models["seg_tiny"]["dimension"] == 2
    assert models["brats_tiny"]["labels"] == {"necrotic tumour core": 1, "peritumoral edema": 2, "enhancing tumour": 4}
    # No adapters trained: the fresh model is served and the description says so.
    for name in ("brats_tiny", "seg_tiny", "litemedsam_box"):
        assert models[name]["trained"] is False
        assert "No trained adapters yet" in models[name]["description"]
    assert "pretrained litemedsam" in models["litemedsam_box"]["description"]
    assert models["cls_tiny"]["trained"] is True
    assert models["cls_tiny"]["adapters"].endswith("cls_tiny/adapters")
    # Classification labels cannot come from a label-image datastore: no trainer for it.
    assert set(info["trainers"]) == {"brats_tiny", "seg_tiny", "seg_trained", "litemedsam_box"}


def test_volume_segmentation_returns_a_brats_label_map_of_the_volume(server, tmp_path):
    data, affine = _nifti(server.post("/infer/brats_tiny", params={"image": "mni_volume", "output": "image"}), tmp_path)
    # Resampled to 5 mm and RAS for the model, inverted back to the 4 mm LAS grid of the input.
    assert data.shape == server.facts["volume_shape"]
    np.testing.assert_allclose(affine, server.facts["volume_affine"], atol=1e-4)
    assert set(np.unique(data).tolist()) <= {0, 1, 2, 4}


def test_image_segmentation_returns_a_png_label_of_the_image_size(server):
    label = _png(server.post("/infer/seg_tiny", params={"image": "mni_slice", "output": "image"}))
    assert label.shape == server.facts["slice_shape"]
    assert set(np.unique(label).tolist()) <= {0, 1}


def test_classification_returns_scores_for_every_class(server):
    response = server.post("/infer/cls_tiny", params={"image": "mni_slice", "output": "json"})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["trained"] is True
    assert sorted(p["label"] for p in result["prediction"]) == ["benign", "malignant", "normal"]
    assert sum(p["score"] for p in result["prediction"]) == pytest.approx(1.0, abs=1e-4)
    assert result["class"] == result["prediction"][0]["label"]


def test_box_prompt_segments_inside_the_box_with_real_litemedsam(server):
    box = server.facts["brain_box"]
    response = server.post("/infer/litemedsam_box", params={"image": "mni_slice", "output": "image"},
                           files=_box_params(box))
    mask = _png(response) > 0
    assert mask.shape == server.facts["slice_shape"]
    x0, y0, x1, y1 = box
    inside = np.zeros_like(mask)
    inside[y0:y1, x0:x1] = True
    brain = server.facts["slice"] > 40
    assert mask.sum() > 0.2 * inside.sum()  # a real part of the box
    assert (mask & inside).sum() >= 0.95 * mask.sum()  # and (almost) nothing outside it
    assert (mask & brain).sum() >= 0.9 * mask.sum()  # on the anatomy, not the background


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(server, tmp_path):
    slice_png = (server.studies / "mni_slice.png").read_bytes()
    garbage = os.urandom(512)
    started = time.time() - 1
    cases = [
        ("unknown model", server.post("/infer/no_such_model", params={"image": "mni_slice"}), 404, "unknown model"),
        ("unknown image", server.post("/infer/seg_tiny", params={"image": "no_such_image"}), 404, "unknown image"),
        ("server path as id", server.post("/infer/seg_tiny", params={"image": str(server.studies / "mni_slice.png")}),
         404, "unknown image"),
        ("corrupt image", server.post("/infer/seg_tiny", params={"image": "corrupt"}), 422, "not a readable"),
        ("2D model, volume", server.post("/infer/seg_tiny", params={"image": "mni_volume"}), 415, "PNG/JPG"),
        ("3D model, image", server.post("/infer/brats_tiny", params={"image": "mni_slice"}), 415, "NIfTI"),
        ("garbage upload", server.put("/datastore/", params={"image": "garbage"},
                                      files={"file": ("garbage.nii.gz", garbage)}),
         422, "not a readable NIfTI"),
        ("text upload", server.put("/datastore/", files={"file": ("notes.txt", b"hello")}),
         415, "unsupported file type"),
        ("path as id", server.put("/datastore/", params={"image": "../escape"},
                                  files={"file": ("x.png", slice_png)}), 400, "plain name"),
        ("infer on garbage file", server.post("/infer/seg_tiny", params={"output": "image"},
                                              files={"file": ("scan.png", b"garbage")}), 422, "uploaded file"),
        ("box outside", server.post("/infer/litemedsam_box", params={"image": "mni_slice"},
                                    files=_box_params([10, 10, 500, 60])), 422, "outside"),
        ("box missing", server.post("/infer/litemedsam_box", params={"image": "mni_slice"}), 400, "needs a box"),
        ("box malformed", server.post("/infer/litemedsam_box", params={"image": "mni_slice"},
                                      files=_box_params(["a", 1, 2, 3])), 400, "four numbers"),
        ("label of wrong shape", server.put("/datastore/label", params={"image": "mni_volume", "tag": "final"},
                                            files={"label": ("mni_volume.png", slice_png)}), 422, "label refused"),
        ("unknown trainer", server.post("/train/no_such_model", params={"run_sync": "true"}), 404, "unknown model"),
    ]
    for what, response, status, message in cases:
        assert response.status_code == status, f"{what}: {response.status_code} {response.text}"
        assert message in response.json()["detail"], f"{what}: {response.text}"
    # Nothing bad was stored or left behind, and the server still answers good requests.
    stored = server.get("/datastore/", params={"output": "all"}).json()["objects"]
    assert set(stored) == {"mni_volume", "mni_slice", "corrupt"}
    assert not _leftover_uploads(started, {garbage, b"hello", b"garbage", slice_png})
    label = _png(server.post("/infer/seg_tiny", params={"image": "mni_slice", "output": "image"}))
    assert label.shape == server.facts["slice_shape"]


def test_adapters_from_another_base_are_refused_loudly(server):
    response = server.post("/infer/cls_wrong_base", params={"image": "mni_slice", "output": "json"})
    assert response.status_code == 500
    assert "base model differs" in response.json()["detail"]
    assert server.post("/infer/cls_tiny", params={"image": "mni_slice", "output": "json"}).status_code == 200


def test_parallel_requests_all_succeed(server, tmp_path):
    requests_ = [
        ("seg_tiny", {}, None),
        ("brats_tiny", {}, None),
        ("litemedsam_box", _box_params(server.facts["brain_box"]), None),
        ("cls_tiny", {}, "json"),
    ]

    def call(item):
        model, files, output = item
        image = "mni_volume" if model == "brats_tiny" else "mni_slice"
        return server.post(f"/infer/{model}", params={"image": image, "output": output or "image"}, files=files or None)

    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(call, requests_))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert _png(responses[0]).shape == server.facts["slice_shape"]
    assert _nifti(responses[1], tmp_path)[0].shape == server.facts["volume_shape"]
    assert _png(responses[2]).shape == server.facts["slice_shape"]
    assert responses[3].json()["prediction"]


def test_training_on_saved_labels_updates_the_served_adapters(server):
    from PIL import Image

    # Nothing labelled yet for the volume model: 409 with a message, not a failed job.
    response = server.post("/train/brats_tiny", params={"run_sync": "true"})
    assert response.status_code == 409 and "no labelled studies" in response.json()["detail"]

    brain = (server.facts["slice"] > 40).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(brain).save(buffer, format="PNG")
    response = server.put("/datastore/label", params={"image": "mni_slice", "tag": "final"},
                          files={"label": ("mni_slice.png", buffer.getvalue())})
    assert response.status_code == 200, response.text

    response = server.post("/train/seg_tiny", params={"run_sync": "true"},
                           json={"max_epochs": 2, "fraction": 1.0, "batch_size": 1})
    assert response.status_code == 200, response.text
    stats = response.json()
    # The bundle's own training ran: its metrics, after its two epochs.
    assert stats["studies_used"] == 1 and stats["studies_labelled"] == 1
    assert stats["metrics"]["epoch"] == 2 and 0.0 <= stats["metrics"]["val_mean_dice"] <= 1.0
    folder = Path(stats["adapters"])
    assert (folder / WEIGHTS_NAME).is_file() and (folder / CONFIG_NAME).is_file()

    model = server.get("/info/").json()["models"]["seg_tiny"]
    assert model["trained"] is True and model["adapters"] == str(folder.resolve())
    result = server.post("/infer/seg_tiny", params={"image": "mni_slice", "output": "json"}).json()
    assert result["trained"] is True and result["label_shape"] == list(server.facts["slice_shape"])

    # The box model trains through the 2D segmentation bundle, with boxes drawn around the label.
    response = server.post("/train/litemedsam_box", params={"run_sync": "true"},
                           json={"max_epochs": 1, "batch_size": 1})
    assert response.status_code == 200, response.text
    box_stats = response.json()
    assert box_stats["metrics"]["epoch"] == 1 and 0.0 <= box_stats["metrics"]["val_mean_dice"] <= 1.0
    assert server.get("/info/").json()["models"]["litemedsam_box"]["trained"] is True
    result = server.post("/infer/litemedsam_box", params={"image": "mni_slice", "output": "json"},
                         files=_box_params(server.facts["brain_box"])).json()
    assert result["trained"] is True and result["adapters"] == str(Path(box_stats["adapters"]).resolve())
    for options, message in (({"box_jitter": -1}, "box_jitter"),
                             ({"method_options": {"bottleneck": 4}}, "default options")):
        bad = server.post("/train/litemedsam_box", params={"run_sync": "true"}, json=options)
        assert bad.status_code == 400 and message in bad.json()["detail"], bad.text

    # A second training in the same server (the first one's run folder is gone by now).
    again = server.post("/train/seg_tiny", params={"run_sync": "true"}, json={"max_epochs": 1, "batch_size": 1})
    assert again.status_code == 200, again.text
    assert again.json()["metrics"]["epoch"] == 1

    # The folder is an ordinary, self-describing adapter folder: the whole model comes back from it.
    overrides = json.loads((server.runs.parent / "models.json").read_text(encoding="utf-8"))["models"]["seg_tiny"]["overrides"]
    fresh = medadapt.load_model(folder, backbone_checkpoint=overrides["backbone_checkpoint"])
    assert medadapt.count_parameters(fresh)["trainable"] > 0


# ---------------------------------------------------------------------------- without a server
def test_label_command_runs_monailabel_start_server(tmp_path, capsys):
    _require_monailabel()
    from medadapt.cli import main

    (tmp_path / "studies").mkdir()
    code = main(["label", "--studies", str(tmp_path / "studies"), "--port", "8123", "--runs", str(tmp_path / "runs"),
                 "--dry-run"])
    assert code == 0
    command = capsys.readouterr().out
    # MONAI Label's start_server, its connections bounded in time (medadapt.monailabel.launch)
    assert "-m medadapt.monailabel.launch start_server --app" in command and "--port 8123" in command
    assert "serve_untrained" not in command  # untrained bundle models are served only when asked for
    app_main = (tmp_path / "runs" / "monailabel_app" / "main.py").read_text(encoding="utf-8")
    assert "from medadapt.monailabel.main import MedAdaptApp" in app_main
    assert main(["label", "--studies", str(tmp_path / "missing"), "--dry-run"]) == 2


def test_bundles_become_served_models():
    from medadapt.monailabel.specs import bundle_models

    models = {m.name: m for m in bundle_models(REPO / "bundles", "runs")}
    assert set(models) >= {"dka_brats", "dka_busi_seg", "dka_isic2018_seg", "dka_busi_cls", "dka_isic2019_cls",
                           "dka_mni152_tissue", "dka_mni152_tissue_3d"}
    brats = models["dka_brats"]
    assert brats.task == "segmentation3d" and brats.in_channels == 4 and brats.dimension == 3
    assert brats.label_values == {"necrotic tumour core": 1, "peritumoral edema": 2, "enhancing tumour": 4}
    parser = brats.parser()
    # Served on the studies it is given: the real-data windows, not the demo's.
    assert parser.get_parsed_content("roi_size") == [240, 240, 4]
    assert parser.get_parsed_content("network_def#num_slices") == 4
    assert models["dka_busi_cls"].task == "classification"
    assert models["dka_busi_cls"].labels == ["benign", "malignant", "normal"]
    assert models["dka_busi_seg"].label_values == {"lesion": 1}
    assert models["dka_mni152_tissue"].label_values == {"grey matter": 1, "white matter": 2}
    for model in models.values():
        # served as they are: the adapters each bundle's train.json published into its own folder
        assert model.adapters == str(REPO / "bundles" / model.name / "models" / "adapters")
        assert model.label_adapters == str(Path("runs") / model.name / "monailabel_adapters")
        assert model.pretrained  # the bundles default to LiteMedSAM, whose weights ship with its package


def test_brats_regions_become_each_releases_label_values():
    from medadapt.datasets.brats.labels import ConvertBraTSLabels
    from medadapt.datasets.brats.transforms import regions_to_labels

    for release, values in (("2021", (1, 2, 4)), ("2023", (1, 2, 3)), ("msd", (2, 1, 3))):
        core, edema, enhancing = values
        label = np.zeros((1, 6, 1, 1), dtype=np.uint8)
        label[0, 1], label[0, 2], label[0, 3] = edema, core, enhancing
        channels = ConvertBraTSLabels(release)(label)
        assert (regions_to_labels(torch.as_tensor(channels, dtype=torch.float32), release).numpy() == label).all()


def test_served_label_is_the_bundles_own_prediction(server, tmp_path):
    """The served model is what the bundle's inference.json builds: on the same image, the
    server's label and the bundle's prediction file agree pixel for pixel."""
    import subprocess
    import sys

    from PIL import Image

    served = _png(server.post("/infer/seg_trained", params={"image": "mni_slice", "output": "image"}))
    images = tmp_path / "images"
    images.mkdir()
    (images / "mni_slice.png").write_bytes((server.studies / "mni_slice.png").read_bytes())
    overrides = json.loads((server.runs.parent / "models.json").read_text(encoding="utf-8"))["models"]["seg_trained"]["overrides"]
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", repr(value) if isinstance(value, (dict, list)) else str(value)]
    # The same adapters as the whole model's weights, which inference.json loads (models/model.pt).
    model = medadapt.load_model(server.runs / "seg_trained" / "adapters", backbone_checkpoint=overrides["backbone_checkpoint"])
    torch.save(model.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "predictions"
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                    str(REPO / "bundles" / "dka_busi_seg" / "inference.json"), *args, "--dataset_dir", str(images),
                    "--model_file", str(tmp_path / "model.pt"), "--output_dir", str(out)],
                   check=True, capture_output=True, timeout=300)
    predicted = np.asarray(Image.open(out / "mni_slice_pred.png")) > 0
    assert served.shape == predicted.shape == server.facts["slice_shape"]
    assert (served > 0).sum() > 0 and np.array_equal(served > 0, predicted)


def test_brats_label_map_keeps_the_whole_tumour_channel_and_nests_the_others():
    """A core voxel outside the predicted whole tumour must not grow the whole tumour in the
    written label map; an enhancing voxel outside the core is dropped too."""
    from medadapt.datasets.brats.transforms import regions_to_labels

    tc = torch.tensor([1, 1, 0, 0, 1], dtype=torch.float32)
    wt = torch.tensor([1, 1, 1, 0, 0], dtype=torch.float32)
    et = torch.tensor([1, 0, 0, 1, 1], dtype=torch.float32)
    labels = regions_to_labels(torch.stack([tc, wt, et]), "2021")[0].tolist()
    assert labels == [4, 1, 2, 0, 0]
