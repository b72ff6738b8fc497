"""The viewers' side of the label server: 3D Slicer's MONAI Label module and OHIF, against a real server.

3D Slicer's module talks through `monailabel.client.MONAILabelClient`, used here as it is; its
request bodies are rebuilt from what the module sends: infer ``params`` JSON with the model's
config options, ``label_info`` (the user's segments), ``result_extension`` (".nrrd", its
default), ``result_dtype``, ``client_id``, DeepGrow ``foreground`` / ``background`` click lists
in IJK starting from ONE click, an ROI; labels saved in the user's format (NRRD or NIfTI, a
(W, H, 1) volume for a 2D image); local volumes uploaded as sessions. OHIF's MONAI Label
extension posts ``output=image`` with ``result_extension`` ".nrrd", ``result_dtype`` "uint16"
and ``result_compress`` false in its params. Both list only the model types in `VIEWER_TYPES`.

Then the server under load: ``/info/``, the datastore and other models answer within a second
while a model or a training is busy, queues are bounded (429 with Retry-After), and 100 mixed
clients, some idle or slow, all get answers (`medadapt.monailabel.loadtest`).
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from monailabel_server import Server, running_server

from medadapt.monailabel.queues import PER_MODEL_PENDING

pytestmark = pytest.mark.xdist_group("monailabel_clients")  # one server for the file

VIEWER_TYPES = {"segmentation", "deepgrow", "deepedit"}  # the types both viewers list; no other is shown
SEGMENTATION_MODELS = ("seg_trained", "cls_tiny", "brats_tiny", "mni3d_tiny")
MODEL_IMAGES = {"seg_trained": "mni_slice", "cls_tiny": "mni_slice", "brats_tiny": "mni_volume",
                "mni3d_tiny": "mni_t1", "litemedsam_box": "mni_slice", "litemedsam_box3d": "mni_slab"}
SINGLE_SEQUENCE = {"mni3d_tiny": ("dka_mni152_tissue_3d", {"image_size": 32})}


def _add_single_channel_volumes(studies: Path, facts: dict) -> None:
    """The T1 channel alone (a plain single-channel volume) and a slab of three axial slices
    through the middle of the brain for the 3D box model (one LiteMedSAM pass per slice)."""
    import nibabel as nib

    t1 = np.ascontiguousarray(facts["volume"][..., 0])
    nib.save(nib.Nifti1Image(t1, facts["volume_affine"]), studies / "mni_t1.nii.gz")
    middle = t1.shape[2] // 2
    nib.save(nib.Nifti1Image(np.ascontiguousarray(t1[:, :, middle - 1:middle + 2]), facts["volume_affine"]),
             studies / "mni_slab.nii.gz")
    facts["t1"], facts["slab"] = t1, t1[:, :, middle - 1:middle + 2]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel_clients")
    with running_server(root, add_studies=_add_single_channel_volumes, extra_models=SINGLE_SEQUENCE,
                        include_box3d=True) as running:
        yield running


@pytest.fixture(scope="module")
def info(server):
    return server.get("/info/").json()


@pytest.fixture()
def client(server, tmp_path, monkeypatch):
    from monailabel.client import MONAILabelClient

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # its session upload goes through requests
    return MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id="slicer-user")


# ---------------------------------------------------------------------------- what the clients send
def _slicer_params(info: dict, model: str, **extra) -> dict:
    """Params as 3D Slicer's module sends them: the model's config options (a list: the chosen,
    first, entry), the user's segments, the result format it asks for, its client id."""
    config = {k: (v[0] if isinstance(v, list) and v else v) for k, v in info["models"][model]["config"].items()}
    labels = info["models"][model]["labels"]
    label_info = [{"name": name, "idx": idx} for name, idx in labels.items()]
    return {**config, "label_info": label_info, "result_extension": ".nrrd", "result_dtype": "uint8",
            "client_id": "slicer-user", **extra}


def _ohif_infer(server: Server, model: str, image: str, **params):
    """OHIF's MONAI Label extension: output=image, its result format in the params form field."""
    params = {**params, "result_extension": ".nrrd", "result_dtype": "uint16", "result_compress": False}
    return server.post(f"/infer/{model}", params={"image": image, "output": "image"},
                       files={"params": (None, json.dumps(params))})


def _read_volume(path: str | Path):
    """A label file as ITK (and so 3D Slicer) reads it: (array in (i, j, k) order, image)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)), image


def _nrrd_answer(response, folder: Path, name: str = "answer.nrrd"):
    assert response.status_code == 200, response.text[:500]
    path = folder / name
    path.write_bytes(response.content)
    return _read_volume(path)


def _same_grid(label, image_file: Path) -> None:
    import SimpleITK as sitk

    reference = sitk.ReadImage(str(image_file))
    assert label.GetSize()[:3] == reference.GetSize()[:3]
    np.testing.assert_allclose(label.GetOrigin(), reference.GetOrigin()[:3], atol=1e-4)
    np.testing.assert_allclose(label.GetSpacing(), reference.GetSpacing()[:3], atol=1e-5)
    np.testing.assert_allclose(np.reshape(label.GetDirection(), (3, 3)),
                               np.reshape(reference.GetDirection(), (reference.GetDimension(),) * 2)[:3, :3],
                               atol=1e-5)


# ---------------------------------------------------------------------------- models and types
def test_every_model_is_listed_with_a_type_the_viewers_show(client, info):
    listed = client.info()["models"]
    assert set(listed) == {*SEGMENTATION_MODELS, "seg_tiny", "cls_wrong_base", "litemedsam_box", "litemedsam_box3d"}
    for name, model in listed.items():
        assert model["type"] in VIEWER_TYPES, (name, model["type"])
    # Classifiers are segmentation models whose label paints the image with the class: values 1..K.
    assert listed["cls_tiny"]["type"] == "segmentation"
    assert listed["cls_tiny"]["labels"] == {"benign": 1, "malignant": 2, "normal": 3}
    # The box models take the viewers' DeepGrow clicks, in 2D and 3D.
    assert (listed["litemedsam_box"]["type"], listed["litemedsam_box"]["dimension"]) == ("deepgrow", 2)
    assert (listed["litemedsam_box3d"]["type"], listed["litemedsam_box3d"]["dimension"]) == ("deepgrow", 3)


def test_slicer_segmentation_requests_get_nrrd_labels_on_the_images_grid(server, client, info, tmp_path):
    height, width = server.facts["slice_shape"]
    for model in SEGMENTATION_MODELS:
        image = MODEL_IMAGES[model]
        path, result = client.infer(model, image, _slicer_params(info, model))
        assert path and path.endswith(".nrrd"), (model, path)
        label, itk = _read_volume(path)
        values = set(info["models"][model]["labels"].values())
        assert set(np.unique(label).tolist()) <= values | {0}, model
        if model in ("seg_trained", "cls_tiny"):
            # A PNG as 3D Slicer loads it: (W, H, 1), column i, row j.
            assert label.shape == (width, height, 1), model
        else:
            _same_grid(itk, server.studies / f"{image}.nii.gz")
        if model == "cls_tiny":  # the whole image painted with the class's value, the scores beside it
            assert (label == info["models"][model]["labels"][result["class"]]).all()
            assert sum(p["score"] for p in result["prediction"]) == pytest.approx(1.0, abs=1e-4)
    # OHIF: 16-bit labels, uncompressed NRRD; NIfTI too.
    label, itk = _nrrd_answer(_ohif_infer(server, "brats_tiny", "mni_volume"), tmp_path)
    assert label.dtype == np.uint16 and label.shape == server.facts["volume_shape"]
    answer = server.post("/infer/seg_trained", params={"image": "mni_slice", "output": "image"},
                         files={"params": (None, json.dumps({"result_extension": ".nii.gz"}))})
    assert answer.status_code == 200
    (tmp_path / "label.nii.gz").write_bytes(answer.content)
    assert _read_volume(tmp_path / "label.nii.gz")[0].shape == (width, height, 1)
    for params, field in (({"result_extension": ".exe"}, "result_extension"), ({"result_dtype": "complex"}, "result_dtype"),
                          ({"result_compress": "maybe"}, "result_compress")):
        answer = server.post("/infer/seg_trained", params={"image": "mni_slice"},
                             files={"params": (None, json.dumps(params))})
        assert answer.status_code == 400 and field in answer.json()["detail"], answer.text


def test_a_single_sequence_model_takes_a_single_channel_volume(server, info, tmp_path):
    """dka_mni152_tissue_3d reads one T1 and repeats it for its 3-channel encoder: a plain
    single-channel volume is its input, a 4-channel one is refused naming what it needs."""
    label, _ = _nrrd_answer(_ohif_infer(server, "mni3d_tiny", "mni_t1"), tmp_path)
    assert label.shape == server.facts["t1"].shape
    refused = server.post("/infer/mni3d_tiny", params={"image": "mni_volume"})
    assert refused.status_code == 422 and "single-channel volume" in refused.json()["detail"], refused.text


def test_slicer_and_ohif_clicks_on_the_box_models(server, client, info, tmp_path):
    facts = server.facts
    x0, y0, x1, y1 = facts["brain_box"]
    centre = [(x0 + x1) // 2, (y0 + y1) // 2, 0]  # IJK of the PNG as Slicer loads it: column, row, 0
    # Slicer's first DeepGrow click: one foreground point, no background yet.
    path, result = client.infer("litemedsam_box", "mni_slice",
                                _slicer_params(info, "litemedsam_box", foreground=[centre], background=[], label="object"))
    mask = _read_volume(path)[0][:, :, 0].T > 0  # (row, column)
    rows, columns = np.nonzero(mask)
    assert mask.any() and rows.min() <= centre[1] <= rows.max() and columns.min() <= centre[0] <= columns.max()
    # Two clicks: the corners of a box; a background click removes the part it lies on.
    corners = [[x0, y0, 0], [x1 - 1, y1 - 1, 0]]
    path, _ = client.infer("litemedsam_box", "mni_slice", _slicer_params(info, "litemedsam_box", foreground=corners))
    boxed = _read_volume(path)[0][:, :, 0].T > 0
    assert boxed.sum() > 0 and boxed[y0:y1, x0:x1].sum() >= 0.95 * boxed.sum()
    row, column = (int(v) for v in np.argwhere(boxed)[len(np.argwhere(boxed)) // 2])
    path, _ = client.infer("litemedsam_box", "mni_slice", _slicer_params(
        info, "litemedsam_box", foreground=corners, background=[[column, row, 0]]))
    pruned = _read_volume(path)[0][:, :, 0].T > 0
    assert not pruned[row, column] and pruned.sum() < boxed.sum()

    # 3D: Slicer's single click on the slab's middle slice, then OHIF's clicks (uint16 NRRD).
    slab = facts["slab"]
    i, j = (int(v) for v in np.argwhere(slab[:, :, 1] >= np.percentile(slab[:, :, 1], 95))[0])
    path, result = client.infer("litemedsam_box3d", "mni_slab",
                                _slicer_params(info, "litemedsam_box3d", foreground=[[i, j, 1]], background=[]))
    label, itk = _read_volume(path)
    _same_grid(itk, server.studies / "mni_slab.nii.gz")
    assert label[:, :, 1].any() and 1 in result["prompted_slices"]
    label, _ = _nrrd_answer(_ohif_infer(server, "litemedsam_box3d", "mni_slab", foreground=[[i, j, 1]],
                                        background=[[0, 0, 1]]), tmp_path)
    assert label.dtype == np.uint16 and label.shape == slab.shape and label[:, :, 1].any()


def _itk_label(array_ijk: np.ndarray, reference: Path | None, path: Path) -> Path:
    """Write a label as 3D Slicer does: on the reference image's grid (a PNG's: spacing 1)."""
    import SimpleITK as sitk

    label = sitk.GetImageFromArray(np.transpose(array_ijk, (2, 1, 0)).astype(np.uint8))
    if reference is not None:
        label.CopyInformation(sitk.ReadImage(str(reference)))
    sitk.WriteImage(label, str(path), True)
    return path


def test_slicer_saves_labels_in_its_formats(server, client, tmp_path):
    from monailabel.client.client import MONAILabelClientException
    from PIL import Image

    mask = (server.facts["slice"] > 40).astype(np.uint8)  # (H, W)
    as_volume = mask.T[:, :, None]  # (W, H, 1): 3D Slicer's label of a PNG
    sent = {
        "nrrd (W, H, 1)": _itk_label(as_volume, None, tmp_path / "slice.nrrd"),
        "nifti (W, H, 1)": _itk_label(as_volume, None, tmp_path / "slice.nii.gz"),
    }
    import nibabel as nib

    nib.save(nib.Nifti1Image(mask.T.copy(), np.eye(4)), tmp_path / "slice2d.nii.gz")
    sent["nifti (W, H)"] = tmp_path / "slice2d.nii.gz"
    for what, path in sent.items():
        client.save_label("mni_slice", str(path), tag="final", params={"label_info": [{"name": "lesion", "idx": 1}]})
        stored = server.get("/datastore/label", params={"label": "mni_slice", "tag": "final"})
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored.content))), mask), what
    # A volume's label as NRRD: stored as NIfTI on the volume's grid.
    volume_label = (server.facts["volume"][..., 0] > 0.5).astype(np.uint8)
    nrrd = _itk_label(volume_label, server.studies / "mni_t1.nii.gz", tmp_path / "volume.nrrd")
    client.save_label("mni_t1", str(nrrd), tag="final")
    stored = nib.load(str(server.studies / "labels" / "final" / "mni_t1.nii.gz"))
    assert np.array_equal(np.asarray(stored.dataobj), volume_label)
    np.testing.assert_allclose(stored.affine, server.facts["volume_affine"], atol=1e-4)
    # Refused, naming the problem: a 2D label of the wrong shape, an NRRD whose data lies elsewhere.
    wrong = _itk_label(np.zeros((5, 5, 2), np.uint8), None, tmp_path / "wrong.nrrd")
    detached = tmp_path / "detached.nrrd"
    detached.write_text("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
                        "data file: /etc/hostname\n\n")
    for path, message in ((wrong, "(W, H, 1)"), (detached, "detached")):
        with pytest.raises(MONAILabelClientException) as refused:
            client.save_label("mni_slice", str(path), tag="final")
        assert "Status: 422" in refused.value.msg and message in refused.value.msg, refused.value.msg


def test_sessions_hold_a_local_volume_for_inference(server, client, info, tmp_path):
    import SimpleITK as sitk
    from monailabel.client.client import MONAILabelClientException

    local = tmp_path / "MRHead.nrrd"  # a volume opened in Slicer, saved as it uploads it
    sitk.WriteImage(sitk.ReadImage(str(server.studies / "mni_t1.nii.gz")), str(local), True)
    created = client.create_session(str(local))
    session = created["session_id"]
    assert len(session) == 32 and int(session, 16) >= 0  # made by the server
    folder = server.app_dir / "sessions" / session
    assert folder.is_dir() and [p.name for p in folder.iterdir() if p.name.startswith("image")] == ["image.nii.gz"]
    assert client.get_session(session)["session_id"] == session
    # Slicer names the volume by its node ("MRHead"); the session's image is what runs.
    path, _ = client.infer("mni3d_tiny", "MRHead", _slicer_params(info, "mni3d_tiny"), session_id=session)
    _, itk = _read_volume(path)
    _same_grid(itk, server.studies / "mni_t1.nii.gz")
    assert server.get(f"/session/{session}", params={"image": "true"}).content[:2] == b"\x1f\x8b"  # the NIfTI
    client.remove_session(session)
    assert not folder.exists()
    for bad, status in (("../..", 400), ("x" * 32, 400), (session, 404), ("0" * 32, 404)):
        answer = server.post("/infer/mni3d_tiny", params={"image": "MRHead", "session_id": bad})
        assert answer.status_code == status, (bad, answer.text)
        if "/" not in bad:
            assert server.get(f"/session/{bad}").status_code == status, bad
            assert server.http.delete(f"{server.url}/session/{bad}").status_code == status, bad
    with pytest.raises(MONAILabelClientException):
        client.get_session(session)
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(b"NRRD0004\nnot an nrrd")
    answer = server.put("/session/", files={"files": ("garbage.nrrd", garbage.read_bytes())})
    assert answer.status_code == 422 and "NRRD" in answer.json()["detail"], answer.text
    assert not [p for p in (server.app_dir / "sessions").iterdir() if p.is_dir()]


def test_session_store_is_bounded_in_count_size_and_age(tmp_path, monkeypatch):
    from fastapi import HTTPException

    from medadapt.monailabel import sessions
    from medadapt.monailabel.errors import InvalidInput

    png = tmp_path / "scan.png"
    from PIL import Image

    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(png)

    def upload() -> str:
        copy = tmp_path / f"upload-{time.monotonic_ns()}.png"
        copy.write_bytes(png.read_bytes())
        return str(copy)

    monkeypatch.setattr(sessions, "MAX_SESSIONS", 2)
    store = sessions.SessionStore(tmp_path / "sessions")
    first = store.create(upload(), "a.png")
    store.create(upload(), "b.png", expiry=1)
    with pytest.raises(HTTPException) as full:
        store.create(upload(), "c.png")
    assert full.value.status_code == 503 and int(full.value.headers["Retry-After"]) >= 1
    time.sleep(1.2)  # the second expires: room again
    third = store.create(upload(), "c.png")
    monkeypatch.setattr(sessions, "MAX_SESSION_BYTES", 2 * os.path.getsize(third.image))
    with pytest.raises(HTTPException) as too_big:
        store.create(upload(), "d.png")
    assert too_big.value.status_code == 503
    with pytest.raises(InvalidInput):
        store.create(upload(), "e.png", expiry=10 ** 9)
    # A new store over the folder keeps the live sessions and removes anything else there.
    (tmp_path / "sessions" / "junk").mkdir()
    reopened = sessions.SessionStore(tmp_path / "sessions")
    assert reopened.get(first.session_id).image == first.image
    assert not (tmp_path / "sessions" / "junk").exists()
    assert reopened.owns(first.image) and not reopened.owns(str(png))


def test_every_output_value_gets_a_result_or_a_4xx(server):
    for model in ("seg_trained", "cls_tiny", "mni3d_tiny"):
        image = MODEL_IMAGES[model]
        for output in (None, "image", "json", "all", "dicom_seg", "nonsense"):
            params = {"image": image, **({"output": output} if output else {})}
            answer = server.post(f"/infer/{model}", params=params)
            assert answer.status_code < 500, (model, output, answer.status_code, answer.text[:300])
            if output in (None, "all", "image", "json"):
                assert answer.status_code == 200, (model, output, answer.text[:300])
            if output == "json":
                assert answer.json()["model"] == model
            elif output == "image":
                assert len(answer.content) > 0 and not answer.headers["content-type"].startswith("application/json")


# ---------------------------------------------------------------------------- under load
def _timed(call) -> tuple[int, float]:
    started = time.monotonic()
    status = call().status_code
    return status, time.monotonic() - started


def test_the_server_answers_while_a_model_is_busy_and_bounds_its_queue(server):
    box = {"params": (None, json.dumps({"box": server.facts["brain_box"]}))}
    probes = {
        "info": lambda: server.get("/info/"),
        "datastore": lambda: server.get("/datastore/", params={"output": "all"}),
        "another model": lambda: server.post("/infer/cls_tiny", params={"image": "mni_slice", "output": "json"}),
    }
    for probe in probes.values():  # built and warm
        assert probe().status_code == 200
    with ThreadPoolExecutor(PER_MODEL_PENDING + 2) as pool:
        busy = [pool.submit(server.post, "/infer/litemedsam_box", params={"image": "mni_slice", "output": "json"},
                            files=box) for _ in range(PER_MODEL_PENDING + 2)]
        time.sleep(1.0)
        answered = {name: _timed(probe) for name, probe in probes.items()}
        still_busy = sum(not f.done() for f in busy)
        answers = [f.result() for f in busy]
    for name, (status, seconds) in answered.items():
        assert status == 200 and seconds < 1.0, (name, status, seconds)
    assert still_busy >= 2, "the box model finished before the probes: nothing was measured"
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * PER_MODEL_PENDING + [429] * 2, [a.text[:200] for a in answers]
    for refused in (a for a in answers if a.status_code == 429):
        assert int(refused.headers["Retry-After"]) >= 1 and "try again in" in refused.json()["detail"]


def test_the_server_answers_while_a_training_runs(server):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((server.facts["slice"] > 40).astype(np.uint8)).save(buffer, format="PNG")
    saved = server.put("/datastore/label", params={"image": "mni_slice", "tag": "final"},
                       files={"label": ("mni_slice.png", buffer.getvalue())})
    assert saved.status_code == 200, saved.text
    options = {"max_epochs": 40, "batch_size": 1}  # a few seconds of the tiny model's training
    with ThreadPoolExecutor(2) as pool:
        training = pool.submit(server.post, "/train/seg_tiny", params={"run_sync": "true"}, json=options)
        time.sleep(1.0)
        second = server.post("/train/seg_tiny", params={"run_sync": "true"}, json=options)
        probes = []
        while not training.done():
            probes.append(_timed(lambda: server.get("/info/")))
            probes.append(_timed(lambda: server.get("/datastore/", params={"output": "all"})))
            time.sleep(0.2)
        assert training.result().status_code == 200, training.result().text[:300]
    assert second.status_code == 429 and int(second.headers["Retry-After"]) >= 1, second.text
    assert len(probes) >= 4, "the training finished before the probes"
    assert all(status == 200 and seconds < 1.0 for status, seconds in probes), probes


def test_idle_and_slow_connections_cannot_lock_clients_out(server):
    """40 idle connections (uvicorn answered 503 to everyone beyond 32 before), and slow uploads
    holding every slot for large bodies: other uploads are told to come back, the rest is served."""
    from medadapt.monailabel.limits import MAX_LARGE_BODIES

    host, port = server.url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(40)]
    uploading = [socket.create_connection((host, int(port))) for _ in range(MAX_LARGE_BODIES)]
    try:
        for connection in uploading:  # announce 1 MB, send nothing yet
            connection.sendall(f"PUT /datastore/image?image=big HTTP/1.1\r\nHost: {host}\r\n"
                               "Content-Length: 1000000\r\n\r\n".encode())
        time.sleep(0.5)
        assert server.get("/info/").status_code == 200
        refused = server.put("/datastore/image", params={"image": "big"}, files={"file": ("big.png", bytes(300_000))})
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1, refused.text
    finally:
        for connection in idle + uploading:
            connection.close()


def test_one_hundred_mixed_clients_all_get_answers(server):
    """100 clients for 25 s on the loopback: 80 well-behaved ones (info, datastore, image
    downloads, inferences of two tiny models), 20 idle, slow-head and slow-body ones. The full
    60 s run is `python benchmarks/run.py --only label_load`."""
    from medadapt.monailabel.launch import HEADER_TIMEOUT
    from medadapt.monailabel.limits import STALL_TIMEOUT
    from medadapt.monailabel.loadtest import run

    summary = run(server.url, "mni_slice", ["cls_tiny", "seg_trained"], clients=100, seconds=25)
    print(json.dumps(summary, indent=1))
    assert summary["unanswered"] == 0, summary["unanswered_examples"]
    assert set(summary["statuses"]) <= {"200", "429", "503"}, summary["statuses"]
    assert summary["busy_without_retry_after"] == 0 and summary["answered"] >= 500, summary
    by_kind = summary["by_kind"]
    for kind in ("info", "datastore", "image"):  # never queued: always served
        assert set(by_kind[kind]["statuses"]) == {"200"}, (kind, by_kind[kind])
    # Inferences beyond a model's queue are told when to come back (429 + Retry-After).
    inferences = by_kind["infer"]["statuses"]
    assert inferences.get("200", 0) >= 0.3 * by_kind["infer"]["requests"], by_kind["infer"]
    held = summary["misbehaving_held"]
    assert all(h["connections"] >= 2 for h in held.values()), held  # each kind was closed and came back
    assert held["idle"]["max_s"] <= HEADER_TIMEOUT + 3 and held["slow_head"]["max_s"] <= HEADER_TIMEOUT + 3, held
    assert held["slow_body"]["max_s"] <= STALL_TIMEOUT + 3, held
